"""A sweep's jobs, validated once and remembered: a second `check`, `plan`, `run`,
`status` or `report` of an unchanged sweep reads no JSON.

Each valid job is kept in the journal's database (`JOBS/.gibatch/journal.db`, table
`known_jobs`) with a signature of its folder: name, type, size, modification time and
inode of every `.json` entry in it. A folder whose signature differs (a file edited,
added, removed, replaced) is read and validated again; so is one that cannot be listed.
Invalid jobs are not kept: their problems are found anew each time, as the user fixes
them.

If the cache cannot be opened (a read-only jobs folder, a damaged database), the
sweep is read in full, as without it: the cache may make things faster, never wrong.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from gibatch import jobs
from gibatch.database import Database
from gibatch.jobs import STATE_DIR, Job, JobInvalid, Sweep, discover, load_job

CACHE_FILE = "journal.db"  # beside the journal's own tables
_SCHEMA = """
CREATE TABLE IF NOT EXISTS known_jobs (
    name TEXT PRIMARY KEY, signature TEXT NOT NULL, chain TEXT NOT NULL,
    payloads TEXT NOT NULL);
"""
_COLUMNS = ["name", "signature", "chain", "payloads"]


def signature(folder: Path) -> str | None:
    """What changes whenever a job file of `folder` may have changed; None if unknown."""
    try:
        with os.scandir(folder) as it:
            # follows a symlink: its target is what is read
            found = [(e.name, e.stat()) for e in it if e.name.endswith(".json")]
    except OSError:
        return None
    found.sort()
    return repr([(n, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino) for n, st in found])


class JobCache(Database):
    def __init__(self, root: Path) -> None:
        folder = root / STATE_DIR
        folder.mkdir(exist_ok=True)
        super().__init__(folder / CACHE_FILE, _SCHEMA)
        columns = [row[1] for row in self._db.execute("PRAGMA table_info(known_jobs)")]
        if columns != _COLUMNS:  # made by another version: a cache is rebuilt, not migrated
            self._db.execute("DROP TABLE known_jobs")
            self._db.executescript(_SCHEMA)

    def load(self) -> dict[str, tuple[str, str, str]]:
        """name -> (signature, chain, payloads) of every job remembered."""
        with self._lock:
            rows = self._db.execute(
                "SELECT name, signature, chain, payloads FROM known_jobs").fetchall()
        return {n: (sig, chain, body) for n, sig, chain, body in rows}

    def store(self, fresh: list[tuple[str, str, str, str]], gone: list[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO known_jobs VALUES (?, ?, ?, ?)",
                                     fresh)
                self._db.executemany("DELETE FROM known_jobs WHERE name = ?",
                                     [(n,) for n in gone])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise


def _open(root: Path) -> JobCache | None:
    try:
        return JobCache(root)
    except (OSError, sqlite3.Error):
        return None


def iter_jobs(root: Path, cache: JobCache) -> Iterator[Job | JobInvalid]:
    """Every job folder of `root` in natural order: from the cache where its signature
    still holds, else read and validated (and remembered, if valid)."""
    known = cache.load()
    fresh: list[tuple[str, str, str, str]] = []
    forget = set(known)  # what is not found again, or no longer valid
    for folder in discover(root):
        name = folder.name
        sig = signature(folder)
        hit = known.get(name)
        if sig is not None and hit is not None and hit[0] == sig:
            forget.discard(name)
            yield Job.from_record(name, folder, hit[1], hit[2])
            continue
        try:
            job = load_job(folder)
        except JobInvalid as exc:
            yield exc
            continue
        if sig is not None and signature(folder) == sig:  # unchanged while it was read
            forget.discard(name)
            fresh.append((name, sig, *job.record()))
        yield job
    # Another process may hold the database a long time: a later command remembers.
    with contextlib.suppress(sqlite3.Error):
        cache.store(fresh, sorted(forget))


def load_sweep(root: Path) -> Sweep:
    """`jobs.load_sweep` through the cache (or without it, if it cannot be opened)."""
    cache = _open(root)
    if cache is None:
        return jobs.load_sweep(root)
    try:
        return jobs.load_sweep(root, iter_jobs(root, cache))
    finally:
        cache.close()
