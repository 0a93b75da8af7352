"""The sweep's journal: SQLite (WAL) in JOBS/.gibatch/journal.db. No secrets, ever.

It keeps what a run must not forget when it is killed:
- events: one row per job and step transition (what `status` shows);
- held: per (site, account, model number), which result section holds which lineage,
  and the highest task id gibatch has accounted for on that model (anything newer that
  gibatch did not submit voids that memory);
- intents: a task POST about to be sent, so that after a crash the task it may have
  created is found on the site and adopted instead of submitted twice;
- durations: measured seconds per stage, for polling and estimates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gibatch.database import Database
from gibatch.jobs import STATE_DIR
from gibatch.steps import DEFAULT_STAGE_COST_S, Stage

JOURNAL_FILE = "journal.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, pid INTEGER NOT NULL,
    job TEXT, model INTEGER, step TEXT, event TEXT NOT NULL, detail TEXT);
-- `status` asks for each job's last event of a kind: at 100,000 jobs a scan per question
CREATE INDEX IF NOT EXISTS events_by_job ON events (job, event);
CREATE TABLE IF NOT EXISTS held (
    site TEXT NOT NULL, model INTEGER NOT NULL, section TEXT NOT NULL,
    lineage TEXT NOT NULL, PRIMARY KEY (site, model, section));
CREATE TABLE IF NOT EXISTS accounted (
    site TEXT NOT NULL, model INTEGER NOT NULL, last_task_id INTEGER NOT NULL,
    PRIMARY KEY (site, model));
CREATE TABLE IF NOT EXISTS intents (
    site TEXT NOT NULL, model INTEGER NOT NULL, job TEXT NOT NULL, step TEXT NOT NULL,
    section TEXT NOT NULL, job_type TEXT NOT NULL, lineage TEXT NOT NULL,
    after_task_id INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (site, model));
CREATE TABLE IF NOT EXISTS durations (
    stage INTEGER NOT NULL, seconds REAL NOT NULL, at REAL NOT NULL);
"""


class Event(StrEnum):
    RUN_START = "run-start"
    RUN_END = "run-end"
    JOB_START = "job-start"
    STEP_SKIPPED = "step-skipped"
    STEP_SUBMITTED = "step-submitted"
    STEP_ADOPTED = "step-adopted"
    STEP_COMPLETED = "step-completed"
    STEP_FAILED = "step-failed"
    JOB_COMPLETE = "job-complete"
    JOB_FAILED = "job-failed"
    JOB_INVALID = "job-invalid"
    JOB_INTERRUPTED = "job-interrupted"
    JOB_REQUEUED = "job-requeued"
    MEMORY_VOID = "memory-void"


@dataclass(frozen=True)
class Intent:
    job: str
    step: str
    section: str
    job_type: str
    lineage: str
    after_task_id: int


@dataclass(frozen=True)
class EventRow:
    at: float
    pid: int
    job: str | None
    model: int | None
    step: str | None
    event: str
    detail: str | None


def _stored(text: str | None) -> str | bytes | None:
    """Text as SQLite keeps it. A job folder's name of undecodable bytes (an archive
    from another system) holds lone surrogates, which SQLite's UTF-8 refuses: such text
    is kept as its file-system bytes, and `_loaded` gives back the same str."""
    if text is None:
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def _loaded(value: object) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else str(value)


def _event(row: tuple[object, ...]) -> EventRow:
    fields = [v if v is None or i not in (2, 6) else _loaded(v) for i, v in enumerate(row)]
    return EventRow(*fields)  # type: ignore[arg-type]


class Journal(Database):
    """Thread-safe; callers on the event loop go through `anyio.to_thread`."""

    def __init__(self, jobs_dir: Path) -> None:
        folder = jobs_dir / STATE_DIR
        folder.mkdir(exist_ok=True)
        super().__init__(folder / JOURNAL_FILE, _SCHEMA)

    def _exec(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def record(
        self, event: Event, job: str | None = None, model: int | None = None,
        step: str | None = None, detail: str | None = None,
    ) -> None:
        self._exec(
            "INSERT INTO events (at, pid, job, model, step, event, detail) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (time.time(), os.getpid(), _stored(job), model, step, event.value, _stored(detail)),
        )

    def events(self, limit: int | None = None) -> list[EventRow]:
        sql = "SELECT at, pid, job, model, step, event, detail FROM events ORDER BY id"
        if limit:
            sql = ("SELECT * FROM (SELECT id, at, pid, job, model, step, event, detail FROM "
                   f"events ORDER BY id DESC LIMIT {int(limit)}) ORDER BY id")
            return [_event(r[1:]) for r in self._exec(sql)]
        return [_event(r) for r in self._exec(sql)]

    # What `status` needs of a journal with a million events, without loading them all.
    def run_events(self) -> list[EventRow]:
        """Every run's start and end, in order."""
        return self._events_where("event IN (?, ?)",
                                  (Event.RUN_START.value, Event.RUN_END.value))

    def last_job_events(self, kinds: Collection[Event]) -> dict[str, EventRow]:
        """job -> its last event (events of invalid jobs aside), for the jobs whose last
        event is of one of `kinds`."""
        marks = ", ".join("?" * len(kinds))
        rows = self._events_where(
            f"id IN (SELECT MAX(id) FROM events WHERE job IS NOT NULL AND event != ? "
            f"GROUP BY job) AND event IN ({marks})",
            (Event.JOB_INVALID.value, *(k.value for k in kinds)))
        return {e.job: e for e in rows if e.job is not None}

    def last_failures(self) -> dict[str, EventRow]:
        """`last_job_events({Event.JOB_FAILED})`, for a journal no run is writing to:
        a failure is rare, so each one is checked for a later event of its job (through
        `events_by_job`) instead of finding every job's last event (a million events at
        100,000 jobs: about half the time)."""
        rows = self._events_where(
            "event = ? AND job IS NOT NULL AND NOT EXISTS (SELECT 1 FROM events AS later "
            "WHERE later.job = events.job AND later.id > events.id AND later.event != ?)",
            (Event.JOB_FAILED.value, Event.JOB_INVALID.value))
        return {e.job: e for e in rows if e.job is not None}

    def count_events(self, event: Event, since: float) -> int:
        rows = self._exec("SELECT COUNT(*) FROM events WHERE event = ? AND at >= ?",
                          (event.value, since))
        return int(str(rows[0][0]))

    def _events_where(self, where: str, args: tuple[str, ...]) -> list[EventRow]:
        sql = f"SELECT at, pid, job, model, step, event, detail FROM events WHERE {where} " \
              "ORDER BY id"
        return [_event(r) for r in self._exec(sql, args)]

    # what each model number holds
    def held(self, site: str, model: int) -> dict[str, str]:
        rows = self._exec("SELECT section, lineage FROM held WHERE site = ? AND model = ?",
                          (site, model))
        return {str(s): str(lineage) for s, lineage in rows}

    def set_held(self, site: str, model: int, held: dict[str, str], last_task_id: int) -> None:
        """Replace the memory of one model number, atomically."""
        with self.transaction() as db:
            db.execute("DELETE FROM held WHERE site = ? AND model = ?", (site, model))
            db.executemany(
                "INSERT INTO held VALUES (?, ?, ?, ?)",
                [(site, model, s, lineage) for s, lineage in held.items()],
            )
            db.execute(
                "INSERT OR REPLACE INTO accounted VALUES (?, ?, ?)", (site, model, last_task_id)
            )

    def last_task_id(self, site: str, model: int) -> int | None:
        rows = self._exec("SELECT last_task_id FROM accounted WHERE site = ? AND model = ?",
                          (site, model))
        return int(rows[0][0]) if rows else None  # type: ignore[call-overload]

    # intents
    def set_intent(self, site: str, model: int, intent: Intent) -> None:
        self._exec(
            "INSERT OR REPLACE INTO intents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (site, model, _stored(intent.job), intent.step, intent.section, intent.job_type,
             intent.lineage, intent.after_task_id, time.time()),
        )

    def intent(self, site: str, model: int) -> Intent | None:
        rows = self._exec(
            "SELECT job, step, section, job_type, lineage, after_task_id FROM intents "
            "WHERE site = ? AND model = ?", (site, model),
        )
        if not rows:
            return None
        job, *rest = rows[0]
        return Intent(_loaded(job), *rest)  # type: ignore[arg-type]

    def clear_intent(self, site: str, model: int) -> None:
        self._exec("DELETE FROM intents WHERE site = ? AND model = ?", (site, model))

    # durations
    def add_duration(self, stage: int, seconds: float) -> None:
        self._exec("INSERT INTO durations VALUES (?, ?, ?)", (stage, seconds, time.time()))

    def mean_durations(self) -> dict[int, float]:
        """Mean of the last 50 measured durations per stage."""
        out: dict[int, float] = {}
        for (stage,) in self._exec("SELECT DISTINCT stage FROM durations"):
            rows = self._exec(
                "SELECT seconds FROM durations WHERE stage = ? ORDER BY at DESC LIMIT 50", (stage,)
            )
            seconds = [float(r[0]) for r in rows]  # type: ignore[arg-type]
            out[int(str(stage))] = sum(seconds) / len(seconds)
        return out

    def stage_estimates(self) -> dict[Stage, float]:
        """Seconds per stage: measured means where known, stated defaults elsewhere."""
        return {**DEFAULT_STAGE_COST_S,
                **{Stage(k): v for k, v in self.mean_durations().items()}}
