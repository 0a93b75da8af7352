"""The live run display: fed events it renders progress, ETA and one line per model;
and `gibatch run` on a real pseudo-terminal draws it and still ends with its summary."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from gibatch.display import RunDisplay, format_duration
from tests.conftest import tiny_job_files, write_job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def render(display: RunDisplay) -> str:
    console = Console(width=100, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(display)
    text = console.export_text()
    console.file.close()
    return text


def test_progress_eta_and_model_lines() -> None:
    clock = Clock()
    d = RunDisplay(clock)
    d("run-start", {"jobs": 4, "models": [1, 2]})
    assert "ETA ?" in render(d)  # no job finished yet: no rate to speak of
    d("job-start", {"job": "a", "model": 1})
    d("step-skipped", {"job": "a", "model": 1, "step": "galaxy1"})
    d("step-submitted", {"job": "a", "model": 1, "step": "merge"})
    d("job-start", {"job": "b", "model": 2})
    clock.now += 60
    d("job-complete", {"job": "a", "model": 1})
    text = render(d)
    assert "1/4 jobs" in text
    assert "elapsed 0:01:00" in text and "ETA 0:03:00" in text  # 3 left at 60 s each
    assert re.search(r"1\s+a\s+merge\s+running on the site", text)
    assert re.search(r"2\s+b\s+-\s+starting", text)
    assert "done 1  failed 0  tasks submitted 1  steps skipped 1" in text
    d("job-failed", {"job": "b", "model": 2, "detail": "x"})
    assert "failed 1" in render(d)


def test_format_duration() -> None:
    assert format_duration(None) == "?"
    assert format_duration(3725.4) == "1:02:05"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_run_on_a_terminal_shows_the_live_display(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "only", tiny_job_files())
    primary, secondary = pty.openpty()
    env = {**os.environ, "GIBATCH_LOCK_DIR": str(tmp_path / "locks"), "COLUMNS": "120"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gibatch", "run", "--jobs", str(jobs), "--models", "1"],
        stdin=secondary, stdout=secondary, stderr=secondary, env=env)
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(primary, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        os.close(primary)
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert proc.returncode == 0, out
    assert "1/1 jobs" in out and "ETA 0:00:00" in out
    assert re.search(r"1\s+only\s+plot2", out)
    assert "1 jobs in" in out and "1 complete" in out  # the summary after the display
