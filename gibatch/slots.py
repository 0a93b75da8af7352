"""OS file locks: one per (site, account, model number), one per job folder.

The kernel releases a lock when its process dies (fcntl/flock via `filelock`), so a
`kill -9` never leaves a model number or a job stuck. Beside each model lock, a small
JSON file names its holder (pid, jobs folder, since) for the message others see.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from gibatch.jobs import STATE_DIR

LOCK_DIR_ENV = "GIBATCH_LOCK_DIR"


def lock_dir() -> Path:
    """Shared by every gibatch of this user: $GIBATCH_LOCK_DIR, else the cache dir."""
    env = os.environ.get(LOCK_DIR_ENV)
    base = Path(env) if env else Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    ) / "gibatch" / "locks"
    base.mkdir(parents=True, exist_ok=True)
    return base


@dataclass(frozen=True)
class Holder:
    pid: int
    jobs: str
    since: float

    def __str__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid}, jobs folder {self.jobs}, since {when}"


class ModelLock:
    """Exclusive hold of one model number of one site account."""

    def __init__(self, site_key: str, model: int, jobs_dir: Path) -> None:
        tag = hashlib.sha256(site_key.encode()).hexdigest()[:16]
        self.model = model
        self.path = lock_dir() / f"{tag}-model{model}.lock"
        self.info = self.path.with_suffix(".json")
        # Not thread-local: acquired in a worker thread, released on the event loop.
        self._lock = FileLock(self.path, timeout=0, thread_local=False)
        self._jobs_dir = jobs_dir

    def acquire(self) -> bool:
        try:
            self._lock.acquire()
        except Timeout:
            return False
        holder = {"pid": os.getpid(), "jobs": str(self._jobs_dir.resolve()), "since": time.time()}
        tmp = self.info.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(holder))
        os.replace(tmp, self.info)
        return True

    def holder(self) -> Holder | None:
        try:
            data = json.loads(self.info.read_text())
            return Holder(int(data["pid"]), str(data["jobs"]), float(data["since"]))
        except (OSError, ValueError, KeyError):
            return None

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()


class JobClaim:
    """Exclusive hold of one job folder, so that two runs on one sweep never share a job."""

    def __init__(self, jobs_dir: Path, job: str) -> None:
        folder = jobs_dir / STATE_DIR / "claims"
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256(os.fsencode(job)).hexdigest()[:24]  # any folder name
        self._lock = FileLock(folder / f"{name}.lock", timeout=0, thread_local=False)

    def acquire(self) -> bool:
        try:
            self._lock.acquire()
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
