"""A sweep's jobs, validated once and remembered: a second `check`, `plan`, `run`,
`status` or `report` of an unchanged sweep reads no JSON.

Each valid job is kept in the journal's database (`JOBS/.gibatch/journal.db`, table
`known_jobs`) with a signature of its folder:
- `files`: the names of its `.json` entries, and `stats`: inode, size, modification
  and change times of each (of a symlink's target: that is what is read).
  The change time (ctime) cannot be set back by `touch`, `cp -p` or `rsync -t`, so an
  edit that keeps size and mtime is still seen;
- `folder`: the folder's own device, inode, modification and change times. Adding,
  removing, renaming or replacing an entry changes them, so while they hold, the
  folder's `.json` names are still `files` and need not be listed again: its files
  are stat'ed by name. Editing a file in place does not change its folder; its own
  stat does, which is why the files are stat'ed either way.

A folder whose signature differs is read and validated again; so is one that cannot be
listed. Invalid jobs are not kept: their problems are found anew each time, as the
user fixes them. The natural order of the job names is kept too (`job_order`): sorting
100,000 names by `natural_key` costs more than listing them.

Timestamps are coarse (a clock tick; up to seconds on some filesystems): an entry
added in the same tick as the last change seen would leave the folder's times as they
were. So a folder's own stat is trusted only once it is older than `SETTLE_NS` when
listed; a younger one is listed again next time (git's "racily clean" entries, met the
same way). A file edited twice within one tick, to the same size, after it was read,
is the one change no stat-based cache can see.

If the cache cannot be opened (a read-only jobs folder, a damaged database), the
sweep is read in full, as without it: the cache may make things faster, never wrong.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gibatch import jobs
from gibatch.database import Database
from gibatch.jobs import STATE_DIR, Job, JobInvalid, Sweep, job_names, load_job, natural_key
from gibatch.steps import Stage, Step

CACHE_FILE = "journal.db"  # beside the journal's own tables
SETTLE_NS = 2_000_000_000  # FAT's 2 s timestamps are the coarsest in common use
_SCHEMA = """
CREATE TABLE IF NOT EXISTS known_jobs (
    name TEXT PRIMARY KEY, folder TEXT NOT NULL, files TEXT NOT NULL, stats TEXT NOT NULL,
    steps TEXT NOT NULL, lineage TEXT NOT NULL, payloads TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS job_order (
    id INTEGER PRIMARY KEY CHECK (id = 0), names TEXT NOT NULL);
"""
_COLUMNS = {"known_jobs": ["name", "folder", "files", "stats", "steps", "lineage", "payloads"],
            "job_order": ["id", "names"]}

# name -> (folder, files, stats, steps, lineage, payloads): a known_jobs row
Known = tuple[str, str, str, str, str, str]


@dataclass(frozen=True, slots=True)
class Signature:
    """What changes whenever a job file of a folder may have changed (module docstring)."""

    folder: str  # "" when too recent to stand for the folder's listing
    files: str  # the `.json` names, sorted, joined by "/" (which no name holds)
    stats: str  # the stat of each, in the same order

    def same_files(self, other: Signature | Known) -> bool:
        if isinstance(other, Signature):
            return self.files == other.files and self.stats == other.stats
        return self.files == other[1] and self.stats == other[2]


def _folder_stat(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def stat_text(stats: Iterable[os.stat_result]) -> str:
    """Inode, size, modification and change times of each, as one text. Whatever
    changes a file's content, type or mode sets its ctime to now; so does replacing it
    (a new inode); the rest is cheap insurance."""
    return "/".join(f"{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}" for s in stats)


def signature(folder: str) -> Signature | None:
    """`folder`'s signature, listing it; None if it cannot be listed or stat'ed."""
    try:
        listed_ns = clock_ns()
        st = os.stat(folder)  # before the listing: a change during it shows next time
        with os.scandir(folder) as it:
            found = sorted((e.name, e.stat()) for e in it if e.name.endswith(".json"))
    except OSError:
        return None
    return Signature(_folder_stat(st) if settled(listed_ns, st) else "",
                     "/".join(n for n, _ in found), stat_text(s for _, s in found))


def settled(seen_ns: int, *stats: os.stat_result) -> bool:
    """Whether each of `stats`, taken at `seen_ns` or later, was last changed long enough
    before that for any later change to show in its times (module docstring)."""
    return all(max(st.st_mtime_ns, st.st_ctime_ns) < seen_ns - SETTLE_NS for st in stats)


def clock_ns() -> int:
    """Now, as `settled` compares it: tests move it on, to make files look settled."""
    return time.time_ns()


def current(folder: str, known: Known | None) -> Signature | None:
    """`folder`'s signature now: without listing it when `known`'s folder stat still
    holds (its files are then `known`'s, stat'ed by name), else by `signature`."""
    if known is not None and known[0]:
        with contextlib.suppress(OSError):  # listed below, which tells what is wrong
            if _folder_stat(os.stat(folder)) == known[0]:
                names = known[1].split("/") if known[1] else []
                return Signature(known[0], known[1],
                                 stat_text([os.stat(f"{folder}/{n}") for n in names]))
    return signature(folder)


def _encode(job: Job) -> tuple[str, str, str]:
    """The job's steps, lineages and payloads as texts for `known_jobs` (`_decode`)."""
    return (",".join(f"{int(s.stage)}.{s.number}" for s in job.lineage),
            ",".join(job.lineage.values()),
            json.dumps(list(job.payloads.values()), separators=(",", ":")))


@functools.cache
def _steps(text: str) -> tuple[Step, ...]:
    """Shared Step objects per chain shape: 100,000 jobs have a handful of shapes."""
    return tuple(Step(Stage(int(stage)), int(number))
                 for stage, number in (link.split(".") for link in text.split(",")))


def _decode(name: str, path: Path, row: Known) -> Job:
    lineage = dict(zip(_steps(row[3]), map(sys.intern, row[4].split(",")), strict=True))
    return Job(name, path, lineage, row[5])


class JobCache(Database):
    def __init__(self, root: Path) -> None:
        folder = root / STATE_DIR
        folder.mkdir(exist_ok=True)
        super().__init__(folder / CACHE_FILE, _SCHEMA, _COLUMNS)

    def load(self) -> tuple[dict[str, Known], list[str]]:
        """Every job remembered, and the job names in the natural order last found."""
        with self._lock:  # row by row: no list of 100,000 rows beside the dictionary
            known = {r[0]: r[1:] for r in self._db.execute("SELECT * FROM known_jobs")}
            order = self._db.execute("SELECT names FROM job_order").fetchall()
        return known, (order[0][0].split("/") if order else [])

    def store(self, fresh: list[tuple[str, ...]], gone: list[str],
              restated: list[tuple[str, str]], order: list[str] | None) -> None:
        """Remember `fresh` rows, forget `gone` names, give the folders of `restated`
        (folder stat, name) their new stat, keep `order` (unless None: unchanged)."""
        if not (fresh or gone or restated or order is not None):
            return  # no write lock taken while a run may be writing
        with self.transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO known_jobs VALUES (?, ?, ?, ?, ?, ?, ?)", fresh)
            db.executemany("DELETE FROM known_jobs WHERE name = ?", [(n,) for n in gone])
            db.executemany("UPDATE known_jobs SET folder = ? WHERE name = ?", restated)
            if order is not None:
                db.execute("INSERT OR REPLACE INTO job_order VALUES (0, ?)", ("/".join(order),))


def _open(root: Path) -> JobCache | None:
    try:
        return JobCache(root)
    except (OSError, sqlite3.Error):
        return None


def iter_jobs(root: Path, cache: JobCache) -> Iterator[Job | JobInvalid]:
    """Every job folder of `root` in natural order: from the cache where its signature
    still holds, else read and validated (and remembered, if valid)."""
    known, order = cache.load()
    names = job_names(root)
    same_names = len(order) == len(names) and set(order) == set(names)
    if not same_names:
        order = sorted(names, key=natural_key)
    fresh: list[tuple[str, ...]] = []
    restated: list[tuple[str, str]] = []  # (folder stat, name) of folders found unchanged
    forget: list[str] = []  # found no longer valid, or changed while read
    top = os.fspath(root)
    for name in order:
        path = f"{top}/{name}"
        hit = known.pop(name, None)  # a row is dropped once used: less memory at the peak
        sig = current(path, hit)
        if sig is not None and hit is not None and sig.same_files(hit):
            if sig.folder != hit[0]:
                restated.append((sig.folder, name))
            yield _decode(name, root / name, hit)
            continue
        try:
            job = load_job(root / name)
        except JobInvalid as exc:
            forget.append(name)
            yield exc
            continue
        after = signature(path)
        if sig is not None and after is not None and after.same_files(sig):
            folder = sig.folder if after.folder == sig.folder else ""  # remembered: it
            fresh.append((name, folder, sig.files, sig.stats, *_encode(job)))  # held still
        else:
            forget.append(name)
        yield job
    # Names that are not text (undecodable bytes) cannot be kept in SQLite: such a job
    # is read each time, and the order sorted each time.
    fresh = [row for row in fresh if storable(row[0])]
    gone = [*known, *(name for name in forget if storable(name))]  # the rest never was
    keep_order = not same_names and storable("/".join(order))
    # Another process may hold the database a long time: a later command remembers.
    with contextlib.suppress(sqlite3.Error):
        cache.store(fresh, gone, restated, order if keep_order else None)


def storable(text: str) -> bool:
    """Whether SQLite can keep `text` (a name of undecodable bytes holds surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def load_sweep(root: Path) -> Sweep:
    """`jobs.load_sweep` through the cache (or without it, if it cannot be opened)."""
    cache = _open(root)
    if cache is None:
        return jobs.load_sweep(root)
    try:
        return jobs.load_sweep(root, iter_jobs(root, cache))
    finally:
        cache.close()
