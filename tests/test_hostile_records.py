"""Completion records as a disk may hold them after a crash, an edit or a prank: none
is a traceback, a hang or a job taken for complete, whichever of `run`'s paths reads it
(`record.whole`, cold and warm), `status`'s (`completions`) or `is_complete`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from gibatch import record
from gibatch.discovery import load_sweep
from gibatch.jobs import Job, Sweep
from tests.conftest import tiny_job_files, write_job
from tests.test_scale_paths import finish, settled

__all__ = ["settled"]  # a fixture, used by name


def one_job(root: Path) -> tuple[Sweep, Job]:
    write_job(root, "j0", tiny_job_files())
    sweep = load_sweep(root)
    finish(sweep.jobs[0])
    return sweep, sweep.jobs[0]


def assert_not_complete(root: Path, sweep: Sweep, job: Job) -> None:
    assert not record.is_complete(job)
    assert record.whole(root, sweep.jobs) == set()  # cold: read, and remembered
    assert record.whole(root, sweep.jobs) == set()  # warm
    assert record.completions(root, sweep.jobs) == {}


def test_a_nul_in_a_listed_name_is_no_traceback(tmp_path: Path, settled: None) -> None:
    """os.stat raises ValueError, not OSError, for a name holding NUL."""
    sweep, job = one_job(tmp_path)
    path = record.record_path(job)
    data = json.loads(path.read_text())
    first = next(iter(data["sections"]))
    data["sections"][first].append({"name": "a\x00b", "size": 1, "sha256": "-"})
    path.write_text(json.dumps(data))
    assert_not_complete(tmp_path, sweep, job)


def test_a_deeply_nested_record_is_no_traceback(tmp_path: Path, settled: None) -> None:
    sweep, job = one_job(tmp_path)
    record.record_path(job).write_text("[" * 200_000)
    assert_not_complete(tmp_path, sweep, job)


def test_a_fifo_or_a_device_as_the_record_is_no_record(tmp_path: Path, settled: None) -> None:
    """A FIFO in the record's place hung `run` and `status` at the start; a link to
    /dev/zero would fill the memory. In a process of its own, bounded by a timeout."""
    _, job = one_job(tmp_path)
    path = record.record_path(job)
    path.unlink()
    os.mkfifo(path)
    code = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from gibatch import record
        from gibatch.discovery import load_sweep
        root = Path({str(tmp_path)!r})
        sweep = load_sweep(root)
        assert record.whole(root, sweep.jobs) == set()
        assert not record.is_complete(sweep.jobs[0])
        path = record.record_path(sweep.jobs[0])
        path.unlink()
        os.symlink("/dev/zero", path)
        assert record.whole(root, sweep.jobs) == set()
        assert record.completions(root, sweep.jobs) == {{}}
    """)
    done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
