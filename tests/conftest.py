"""Shared fixtures: example jobs copied into a temporary sweep, and one local site on
127.0.0.1 per test session (a real aiohttp server in a thread of its own)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gibatch.journal import Journal

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE_JOB = EXAMPLES / "base_job"


def read_base() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(BASE_JOB.glob("*.json"))}


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a job folder from the base job, with per-file overrides (None deletes a file)."""

    def make(name: str = "job", root: Path | None = None, **files: Any) -> Path:
        folder = (root or tmp_path / "jobs") / name
        folder.mkdir(parents=True)
        content: dict[str, Any] = {**read_base(), **{k.replace("_json", ".json"): v
                                                     for k, v in files.items()}}
        for fname, obj in content.items():
            if obj is None:
                continue
            text = obj if isinstance(obj, str) else json.dumps(obj)
            (folder / fname).write_text(text)
        return folder

    return make


@pytest.fixture
def example_sweep(tmp_path: Path) -> Iterator[Path]:
    dest = tmp_path / "sweep"
    shutil.copytree(EXAMPLES / "sweep", dest)
    yield dest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


SMALL = {"number_of_particles": 30}


def tiny_job_files(**changes: dict[str, Any]) -> dict[str, Any]:
    base = read_base()
    for g in ("galaxy1.json", "galaxy2.json"):
        base[g] = {**base[g], "disk": {**base[g]["disk"], **SMALL}, "bulge": SMALL,
                   "halo": {**base[g]["halo"], **SMALL}}
    base["interact.json"] = {**base["interact.json"], "duration": 0.1, "nFrames": 4}
    for p in ("plot1.json", "plot2.json"):
        base[p] = {**base[p], "plot_size": "small"}
    for name, update in changes.items():
        base[name] = {**base[name], **update}
    return base


def write_job(root: Path, name: str, files: dict[str, Any]) -> None:
    (root / name).mkdir(parents=True)
    for fname, obj in files.items():
        (root / name / fname).write_text(json.dumps(obj))


def gibatch(log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """gibatch as a real process; output to a file (the site's worker processes may
    outlive a killed gibatch briefly, and would hold a pipe open)."""
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gibatch", *args], stdout=out, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, **(env or {})},
        )


def wait_for_event(jobs: Path, event: str, step: str | None, deadline_s: float) -> None:
    """Bounded wait until the journal shows `event` (a condition, not a sleep)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        db = jobs / ".gibatch" / "journal.db"
        if db.exists():
            journal = Journal(jobs)
            try:
                if any(e.event == event and (step is None or e.step == step)
                       for e in journal.events()):
                    return
            finally:
                journal.close()
        time.sleep(0.05)
    raise AssertionError(f"no {event} {step} within {deadline_s} s")
