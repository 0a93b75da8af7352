"""The completion record: written last, atomically, as a dot-file inside `output/`.

A job is complete when, and only when, this record exists and every file it lists is
on disk with the listed size (jobs.md). An `output/` without it is an interrupted job.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gibatch.jobs import Job
from gibatch.transfer import PART_SUFFIX, FileRecord

RECORD_FILE = ".gibatch-complete.json"
RECORD_VERSION = 1


def record_path(job: Job) -> Path:
    return job.output / RECORD_FILE


def write(job: Job, files: dict[str, list[FileRecord]], site: str, model: int,
          started: float) -> None:
    """Write the record for `files` (by section folder) atomically (write, fsync, rename)."""
    data: dict[str, Any] = {
        "version": RECORD_VERSION,
        "job": job.name,
        "site": site,
        "model_number": model,
        "started": started,
        "finished": time.time(),
        "lineage": {step.name: job.lineage[step] for step in job.steps},
        "sections": {name: [asdict(f) for f in recs] for name, recs in sorted(files.items())},
    }
    tmp = job.output / (RECORD_FILE + ".tmp")
    with tmp.open("w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, record_path(job))


def read(job: Job) -> dict[str, Any] | None:
    try:
        data = json.loads(record_path(job).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def complete_record(job: Job) -> dict[str, Any] | None:
    """The record, if it matches this job's parameters and every file it lists is whole."""
    data = read(job)
    if data is None or data.get("lineage") != {s.name: job.lineage[s] for s in job.steps}:
        return None
    for section, files in data.get("sections", {}).items():
        for f in files:
            path = job.output / section / f["name"]
            try:
                if path.stat().st_size != f["size"]:
                    return None
            except OSError:
                return None
    return data


def is_complete(job: Job) -> bool:
    """The record exists, matches this job's parameters, and every file is whole."""
    return complete_record(job) is not None


def prune(job: Job, keep: dict[str, set[str]]) -> None:
    """Leave in output/ exactly the job's sections and files (no stale Plot 4, no .part)."""
    if not job.output.is_dir():
        return
    for entry in job.output.iterdir():
        if entry.name.startswith("."):
            if entry.name != RECORD_FILE:
                _remove(entry)
            continue
        if entry.name not in keep or not entry.is_dir():
            _remove(entry)
            continue
        for f in entry.iterdir():
            if f.name not in keep[entry.name] or f.name.endswith(PART_SUFFIX):
                _remove(f)


def drop_partials(job: Job) -> None:
    """Delete the job's partial downloads: its tasks are about to produce new results,
    and a `.part` of an old one must never be resumed with bytes of a new one."""
    if job.output.is_dir():
        for part in job.output.glob(f"*/*{PART_SUFFIX}"):
            part.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def invalidate(job: Job) -> None:
    record_path(job).unlink(missing_ok=True)
