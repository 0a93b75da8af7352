"""The live run display: fed events it renders progress, ETA and one line per model;
and `gibatch run` on a real pseudo-terminal draws it and still ends with its summary."""

from __future__ import annotations

import io
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


def render_terminal(display: RunDisplay) -> str:
    """As a colour terminal gets it: escape sequences (rich's own) included."""
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=200).print(display)
    return buf.getvalue()


@pytest.mark.parametrize("job", ["sweep[theta=45]", "[reverse blink]x", "[/]a[b]"])
def test_a_job_name_is_shown_as_it_is_never_read_as_markup(job: str) -> None:
    d = RunDisplay()
    d("run-start", {"jobs": 1, "models": [1]})
    d("job-start", {"job": job, "model": 1})
    d("step-submitted", {"job": job, "model": 1, "step": "[bold]merge"})
    out = render_terminal(d)
    assert job in out and "[bold]merge" in out
    assert "\x1b[5" not in out and "\x1b[7" not in out  # no blink, no reverse video


def test_a_job_name_sends_no_escape_sequence_to_the_terminal() -> None:
    d = RunDisplay()
    d("run-start", {"jobs": 1, "models": [1]})
    d("job-start", {"job": "j\x1b]0;pwned\x07\x1b[2J", "model": 1})
    out = render_terminal(d)
    assert "\x1b]0;pwned" not in out and "\x1b[2J" not in out
    assert "j\\x1b]0;pwned\\x07\\x1b[2J" in out  # shown escaped, as everywhere


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
