"""The completion record: written last, atomically, as a dot-file inside `output/`.

A job is complete when, and only when, this record exists and every file it lists is
on disk with the listed size (jobs.md). An `output/` without it is an interrupted job.

`completed` answers the same for a whole sweep without reading 100,000 records each
time `status`, `report` or `plan` asks: what it needs of each whole record (its lineage
and model number) is kept in the journal's database (table `completions`) beside a
signature of the record and of its section folders. While that signature holds, the
record is the same and no file was added to, removed from or renamed in a section (a
download lands by renaming its `.part`; `prune` and `invalidate` remove), so the job is
judged from the database. Not seen that way: a listed file whose size changes in place.
Signatures younger than `discovery.SETTLE_NS` are not kept (coarse timestamps, as in
`discovery`). `completions` hands each signature on: the report remembers a job's
plots by it.

The signature costs a stat of the record and of each section folder (7 for a job of 6
steps): about 3 s of a warm `status` of 100,000 jobs here, most of what is left.

`run` decides what to skip by `whole`, which sees every size, as `is_complete` does,
without reading a remembered record: the same row keeps the files the record lists
(`listing`, in table `listings`, shared by the records that list the same files) and a
`proof`, a digest of the record's stat, its lineage hashed as the job's, and each
listed size. A job is skipped unread only if the record's stat, the job's lineage and
the size of every listed file on disk give that digest again; anything else, a file
missing or of another size included, is judged by reading the record, as before. The
record's stat stands for its content as a job file's does in `discovery` (and only once
settled). What is left is one stat per listed file, which `is_complete` makes too:
about 2,100,000 for 100,000 jobs of 6 steps, most of a warm `run`'s start after
discovery.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

from gibatch import discovery
from gibatch.database import Database
from gibatch.errors import LocalError
from gibatch.jobs import OUTPUT_DIR, STATE_DIR, Job, read_regular
from gibatch.transfer import PART_SUFFIX, FileRecord

RECORD_FILE = ".gibatch-complete.json"
RECORD_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    name TEXT PRIMARY KEY, sections TEXT NOT NULL, signature TEXT NOT NULL,
    lineage TEXT NOT NULL, model INTEGER, listing INTEGER, proof TEXT);
CREATE TABLE IF NOT EXISTS listings (id INTEGER PRIMARY KEY, files TEXT NOT NULL UNIQUE);
"""
# `lineage`: the record's lineage hashed as `_record_chain_hash` (a column renamed
# each time that changed, so that rows hashed otherwise are dropped, not misread: it
# was `chain` while a lineage other than the job's was hashed as joined text, which a
# record could make read as the job's). `listing`, `proof`:
# for `whole` (module docstring), NULL when the record's names cannot be kept as text;
# `listing` is the id of the record's files in `listings`, which most records share
# (400 bytes a record, 40 MB at 100,000 jobs if each row held them).
_COLUMNS = {"completions": ["name", "sections", "signature", "lineage", "model", "listing",
                            "proof"],
            "listings": ["id", "files"]}
# a completions row after its name: sections, signature, lineage, model, files, proof
Row = tuple[str, str, str, int | None, str | None, str | None]
Stored = tuple[str, str, str, str, int | None, str | None, str | None]  # name, *Row
_FILES_SEP = "\n"  # between a record's files (`section/name`): in no name kept


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


MAX_RECORD_BYTES = 64 << 20  # about 500,000 listed files: more is no record of ours


def read(job: Job) -> dict[str, Any] | None:
    """The record as JSON, or None: missing, not a regular file (a FIFO there must not
    hang, a link to /dev/zero not fill the memory), too large, or not JSON at all."""
    try:
        raw = read_regular(record_path(job), MAX_RECORD_BYTES + 1)
        if len(raw) > MAX_RECORD_BYTES:
            return None
        data = json.loads(raw)
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _lineage(job: Job) -> dict[str, str]:
    return {s.name: job.lineage[s] for s in job.steps}


def _whole(job: Job, data: dict[str, Any]) -> bool:
    """Every file the record lists is on disk with the listed size (False for a record
    of another shape)."""
    sections = data.get("sections", {})
    if not isinstance(sections, dict):
        return False
    output = os.fspath(job.output)
    for section, files in sections.items():
        if not isinstance(files, list):
            return False
        for f in files:
            if not (isinstance(f, dict) and isinstance(f.get("name"), str)
                    and isinstance(f.get("size"), int)):
                return False
            name = f["name"]
            # A text joined costs less than two Paths (4,000,000 for a cold 100k sweep)
            # and names the same file, unless a name is empty or holds "/" (absolute,
            # a trailing slash), which Path joins otherwise.
            path = (f"{output}/{section}/{name}" if name and section
                    and "/" not in name and "/" not in section
                    else job.output / section / name)
            try:
                if os.stat(path).st_size != f["size"]:
                    return False
            except (OSError, ValueError):  # ValueError: a NUL in the name
                return False
    return True


def complete_record(job: Job) -> dict[str, Any] | None:
    """The record, if it matches this job's parameters and every file it lists is whole."""
    data = read(job)
    if data is None or data.get("lineage") != _lineage(job) or not _whole(job, data):
        return None
    return data


def is_complete(job: Job) -> bool:
    """The record exists, matches this job's parameters, and every file is whole."""
    return complete_record(job) is not None


# -- the same for a whole sweep, remembered (module docstring)

class _Completions(Database):
    def __init__(self, root: Path) -> None:
        folder = root / STATE_DIR
        folder.mkdir(exist_ok=True)
        super().__init__(folder / discovery.CACHE_FILE, _SCHEMA, _COLUMNS)

    def load(self) -> dict[str, tuple[str, str, str, int | None]]:
        """name -> (sections, signature, chain, model) of every record remembered."""
        shared: dict[str, str] = {}  # most jobs list the same sections
        with self._lock:  # row by row: no list of 100,000 rows beside the dictionary
            return {r[0]: (shared.setdefault(r[1], r[1]), r[2], r[3], r[4]) for r in
                    self._db.execute("SELECT name, sections, signature, lineage, model "
                                     "FROM completions")}

    def proofs(self) -> dict[str, tuple[list[str], str]]:
        """name -> (the record's files, each as `/section/name`, and proof) of every
        record remembered with them (one list for all records listing the same files)."""
        # One read transaction: both tables from one snapshot, so a listing id that
        # another process's `store` freed and gave to other files meanwhile cannot pair
        # a record's proof with files it does not list.
        with self._lock:
            self._db.execute("BEGIN")
            try:
                listings = {i: [f"/{f}" for f in files.split(_FILES_SEP)] if files else []
                            for i, files in self._db.execute("SELECT id, files FROM listings")}
                rows = self._db.execute("SELECT name, listing, proof FROM completions "
                                        "WHERE proof IS NOT NULL").fetchall()
            finally:
                self._db.execute("COMMIT")
        return {name: (listings[i], proof) for name, i, proof in rows if i in listings}

    def store(self, fresh: list[Stored], gone: list[str]) -> None:
        if not (fresh or gone):
            return  # no write lock taken while a run may be writing
        with self.transaction() as db:
            ids: dict[str | None, int | None] = {None: None}
            for files in {row[5] for row in fresh} - {None}:
                db.execute("INSERT OR IGNORE INTO listings (files) VALUES (?)", (files,))
                ids[files] = db.execute("SELECT id FROM listings WHERE files = ?",
                                        (files,)).fetchone()[0]
            db.executemany(
                "INSERT OR REPLACE INTO completions VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(*row[:5], ids[row[5]], row[6]) for row in fresh])
            db.executemany("DELETE FROM completions WHERE name = ?", [(n,) for n in gone])
            db.execute("DELETE FROM listings WHERE id NOT IN (SELECT listing "
                       "FROM completions WHERE listing IS NOT NULL)")


def _hash(text: str) -> str:
    """Only compared for equality: a short digest keeps 100,000 rows small."""
    return hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=12).hexdigest()


def _chain_hash(job: Job) -> str:
    """The job's lineage in chain order, hashed: asked of each of 100,000 jobs by a warm
    `status`, so neither a dictionary nor a sort."""
    return _hash(";".join([f"{s.name}={h}" for s, h in job.lineage.items()]))


def _record_chain_hash(job: Job, lineage: dict[str, str]) -> str:
    """What `_chain_hash(job)` is while the record's `lineage` is the job's, and never
    is otherwise: another lineage is hashed as JSON text, which no job's chain text is
    (joined as the job's, a record's step hash holding `;` and `=` could read as the
    job's whole chain)."""
    if lineage == _lineage(job):
        return _chain_hash(job)
    return _hash(json.dumps(sorted(lineage.items())))


def _stat_key(stats: list[os.stat_result]) -> str:
    """Inode, size, modification and change times of each, as `discovery.stat_text`
    says, reduced to one number: a warm `status` of 100,000 jobs compares about 700,000
    stats, and formatting each as text cost more than the stat itself. A tuple of ints
    hashes the same in every process (only str and bytes hashes are salted); a
    different Python may hash it differently, which only makes the records be read
    once again."""
    return str(hash(tuple([(s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                           for s in stats])))


def _stats(output: str, sections: list[str]) -> list[os.stat_result] | None:
    """The record's stat, then each section folder's, under the job's `output` folder
    (a text: 100,000 jobs); None if one is missing."""
    try:
        return [os.stat(f"{output}/{RECORD_FILE}"),
                *[os.stat(f"{output}/{section}") for section in sections]]
    except (OSError, ValueError):  # ValueError: a NUL in a name
        return None


def _listed(sections: dict[str, Any]) -> tuple[str, list[int]] | None:
    """The files a whole record lists (`section/name` joined by `_FILES_SEP`) and their
    sizes, in the record's order; None if a name would not be read back the same."""
    paths: list[str] = []
    sizes: list[int] = []
    for section, files in sections.items():
        for f in files:
            if "/" in f["name"] or _FILES_SEP in f["name"] or _FILES_SEP in section:
                return None
            paths.append(f"{section}/{f['name']}")
            sizes.append(f["size"])
    text = _FILES_SEP.join(paths)
    return (text, sizes) if discovery.storable(text) else None


def _proof(record_stat: os.stat_result, chain: str, sizes: Iterable[int]) -> str:
    """A digest of the record's stat, a lineage hash and the listed files' sizes: what
    `whole` asks again of the disk (module docstring)."""
    return _hash(f"{discovery.stat_text([record_stat])}|{chain}|{','.join(map(str, sizes))}")


def _proven(output: str, files: list[str], proof: str, chain: str) -> bool:
    """Whether the record under the job's `output` folder (a text) is the one `proof`
    was made of, its lineage hashes to `chain`, and each of its `files` (`/section/name`)
    has the size listed."""
    try:
        head = os.stat(f"{output}/{RECORD_FILE}")
        sizes = [os.stat(output + f).st_size for f in files]
    except (OSError, ValueError):  # ValueError: a NUL in a name
        return False
    return _proof(head, chain, sizes) == proof


def _examine(job: Job, seen_ns: int) -> tuple[dict[str, Any] | None, Row | None]:
    """The record if the job is complete (`complete_record`), and what to remember of
    the record (None: not whole, of another shape, or changed too recently)."""
    try:
        before = discovery.stat_text([os.stat(record_path(job))])
    except OSError:
        return None, None
    data = read(job)
    if data is None:
        return None, None
    lineage: Any = data.get("lineage")
    sections: Any = data.get("sections")
    model: Any = data.get("model_number")
    shaped = (isinstance(lineage, dict) and isinstance(sections, dict)
              and all(isinstance(v, str) for v in lineage.values())
              and all("/" not in name for name in sections)
              and discovery.storable("/".join(sections)))
    names = sorted(sections) if shaped else []
    stats = _stats(os.fspath(job.output), names) if shaped else None  # before the files
    whole = _whole(job, data)
    complete = data if whole and lineage == _lineage(job) else None
    if (not whole or stats is None or discovery.stat_text(stats[:1]) != before
            or not discovery.settled(seen_ns, *stats)):
        return complete, None
    chain = _record_chain_hash(job, lineage)
    listed = _listed(sections)
    return complete, ("/".join(names), _stat_key(stats), chain,
                      model if isinstance(model, int) else None,
                      None if listed is None else listed[0],
                      None if listed is None else _proof(stats[0], chain, listed[1]))


class Completion(NamedTuple):
    model: int | None  # None if the record has none
    # The stat signature of the record and its section folders (None: changed just
    # now, see `discovery.SETTLE_NS`): while it holds, so do the record and the listing
    # of each section, which is what the report remembers a job's plots by.
    signature: str | None


def completed(root: Path, jobs: Iterable[Job]) -> dict[str, int | None]:
    """name -> model number (None if the record has none) of each of `jobs` that is
    complete: `completions` without the signatures."""
    return {name: done.model for name, done in completions(root, jobs).items()}


def completions(root: Path, jobs: Iterable[Job]) -> dict[str, Completion]:
    """name -> completion of each of `jobs` that is complete, as `complete_record`
    says; reads only the records that are new or changed since the last call (module
    docstring). Without a usable database, reads them all.

    `jobs` are all the valid jobs of the sweep at `root`: what is remembered of any
    other name is forgotten."""
    try:
        cache: _Completions | None = _Completions(root)
    except (OSError, sqlite3.Error):
        cache = None
    known: dict[str, tuple[str, str, str, int | None]] = {}
    if cache is not None:
        with contextlib.suppress(sqlite3.Error):  # then every record is read
            known = cache.load()
    done: dict[str, Completion] = {}
    fresh: list[Stored] = []
    gone = set(known)  # rows of records no longer found whole
    seen_ns = discovery.clock_ns()
    split: dict[str, list[str]] = {}  # most jobs list the same sections
    top = os.fspath(root)
    for job in jobs:
        hit = known.get(job.name)
        if hit is not None:
            sections, signature, chain, model = hit
            names = split.get(sections)
            if names is None:
                names = split[sections] = sections.split("/") if sections else []
            # `job.path` is `root / name` (discovery): a text built here costs less.
            stats = _stats(f"{top}/{job.name}/{OUTPUT_DIR}", names)
            if stats is not None and _stat_key(stats) == signature:
                gone.discard(job.name)
                if chain == _chain_hash(job):
                    done[job.name] = Completion(model, signature)
                continue
        data, row = _examine(job, seen_ns)
        if data is not None:
            number = data.get("model_number")
            done[job.name] = Completion(number if isinstance(number, int) else None,
                                        None if row is None else row[1])
        if row is not None and discovery.storable(job.name):
            gone.discard(job.name)
            fresh.append((job.name, *row))
    if cache is not None:
        try:
            with contextlib.suppress(sqlite3.Error):  # a later call remembers
                cache.store(fresh, sorted(gone))
        finally:
            cache.close()
    return done


def whole(root: Path, jobs: Iterable[Job]) -> set[str]:
    """The names of `jobs` that are complete, as `is_complete` says of each: a job whose
    remembered proof holds is judged without reading its record, every other one by
    reading it (module docstring); records found whole are remembered.

    `jobs` are jobs of the sweep at `root` (all or some): rows of other names are kept."""
    try:
        cache: _Completions | None = _Completions(root)
    except (OSError, sqlite3.Error):
        cache = None
    known: dict[str, tuple[list[str], str]] = {}
    if cache is not None:
        with contextlib.suppress(sqlite3.Error):  # then every record is read
            known = cache.proofs()
    done: set[str] = set()
    fresh: list[Stored] = []
    gone: list[str] = []  # remembered, read again, and found not whole
    seen_ns = discovery.clock_ns()
    top = os.fspath(root)
    for job in jobs:
        hit = known.pop(job.name, None)  # a row is dropped once used: less memory
        if hit is not None:
            files, proof = hit
            # `job.path` is `root / name` (discovery): a text built here costs less.
            if _proven(f"{top}/{job.name}/{OUTPUT_DIR}", files, proof, _chain_hash(job)):
                done.add(job.name)
                continue
        data, row = _examine(job, seen_ns)
        if data is not None:
            done.add(job.name)
        if not discovery.storable(job.name):
            continue
        if row is not None:
            fresh.append((job.name, *row))
        elif hit is not None:
            gone.append(job.name)
    if cache is not None:
        try:
            with contextlib.suppress(sqlite3.Error):  # a later call remembers
                cache.store(fresh, gone)
        finally:
            cache.close()
    return done


def real_folders(job: Job, folders: Iterable[str]) -> None:
    """LocalError unless output/ and each of its `folders` that exists is a real folder.

    Results are saved, and stale files deleted (`prune`), only inside the job's own
    output/: through a symbolic link (`output -> ~/shared`, `ln -s . output`) gibatch
    would write, and clean up, in a folder that holds other people's files."""
    for path in (job.output, *(job.output / f for f in folders)):
        if path.is_symlink():
            raise LocalError(f"{path} is a symbolic link: gibatch saves results only in a "
                             "real folder of the job (remove the link: gibatch makes the folder)",
                             job=job.name)


def prune(job: Job, keep: dict[str, set[str]]) -> None:
    """Leave in output/ exactly the job's sections and files (no stale Plot 4, no .part).
    Never through a symbolic link: a link is removed, not what it points to."""
    if job.output.is_symlink() or not job.output.is_dir():
        return
    for entry in job.output.iterdir():
        if entry.name.startswith("."):
            if entry.name != RECORD_FILE:
                _remove(entry)
            continue
        if entry.name not in keep or entry.is_symlink() or not entry.is_dir():
            _remove(entry)
            continue
        for f in entry.iterdir():
            if f.name not in keep[entry.name] or f.name.endswith(PART_SUFFIX):
                _remove(f)


def drop_partials(job: Job) -> None:
    """Delete the job's partial downloads: its tasks are about to produce new results,
    and a `.part` of an old one must never be resumed with bytes of a new one."""
    if job.output.is_symlink() or not job.output.is_dir():
        return
    for section in job.output.iterdir():
        if not section.is_symlink() and section.is_dir():
            for part in section.glob(f"*{PART_SUFFIX}"):
                part.unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def invalidate(job: Job) -> None:
    record_path(job).unlink(missing_ok=True)
