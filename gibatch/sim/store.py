"""The local site's state in SQLite: accounts, tasks and the result sections per model.

A restarted site keeps every model's results and history. All access goes through one
connection guarded by a lock; the web layer calls it from a worker thread.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from gibatch.database import Database
from gibatch.steps import Stage, Step, section_stage


class TaskStatus(StrEnum):
    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    FAILED = "Failed"

    @property
    def active(self) -> bool:
        return self in (TaskStatus.QUEUED, TaskStatus.RUNNING)


@dataclass(frozen=True)
class Task:
    job_id: int
    username: str
    model: int
    step: str
    job_type: str
    section: str
    payload: str
    status: TaskStatus
    submitted: str


@dataclass(frozen=True)
class Submission:
    """A task taken, and the earlier tasks whose results it replaced or cleared (a model
    number holds only its current results, so those tasks' files are to be deleted);
    None if it waits in the model's queue and has not started."""

    job_id: int
    replaced: tuple[int, ...] | None


# A task waiting in a model's queue has not taken its section: its `section` column
# holds this mark and the section it asks for (`Plot ?`: the next plot).
_WAITING = "?"
_NEXT_PLOT = "Plot ?"
_STAGE_OF_TASK = {"galaxy1": Stage.GALAXY, "galaxy2": Stage.GALAXY, "merge": Stage.MERGE,
                 "interact": Stage.INTERACT, "plot": Stage.PLOT}


def _section_hint(step: Step, plot_number: int | None) -> str:
    if step.stage is not Stage.PLOT:
        return step.section
    return _NEXT_PLOT if plot_number is None else f"Plot {plot_number}"


@dataclass(frozen=True)
class Section:
    name: str
    job_id: int
    status: TaskStatus


_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    username TEXT PRIMARY KEY, salt BLOB NOT NULL, hash BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    username TEXT NOT NULL, model INTEGER NOT NULL, step TEXT NOT NULL,
    job_type TEXT NOT NULL, section TEXT NOT NULL, payload TEXT NOT NULL,
    status TEXT NOT NULL, submitted TEXT NOT NULL, started TEXT, finished TEXT);
CREATE INDEX IF NOT EXISTS tasks_by_model ON tasks (username, model, job_id);
CREATE TABLE IF NOT EXISTS sections (
    username TEXT NOT NULL, model INTEGER NOT NULL, name TEXT NOT NULL,
    job_id INTEGER NOT NULL, PRIMARY KEY (username, model, name));
CREATE TABLE IF NOT EXISTS produced (
    job_id INTEGER NOT NULL, name TEXT NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, PRIMARY KEY (job_id, name));
CREATE TABLE IF NOT EXISTS inputs (
    job_id INTEGER NOT NULL, input_job_id INTEGER NOT NULL);
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _hash(password: str, salt: bytes) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 100_000)


class Busy(Exception):
    """The model number's current task is still queued or running (409)."""


class Store(Database):
    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA)

    # accounts
    def set_password(self, username: str, password: str) -> None:
        salt = secrets.token_bytes(16)
        with self._lock:
            self._db.execute(
                "INSERT INTO accounts VALUES (?, ?, ?) ON CONFLICT(username) "
                "DO UPDATE SET salt = excluded.salt, hash = excluded.hash",
                (username, salt, _hash(password, salt)),
            )

    def check_password(self, username: str, password: str) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT salt, hash FROM accounts WHERE username = ?", (username,)
            ).fetchone()
        if row is None:
            _hash(password, b"0" * 16)  # same cost either way: no user enumeration by timing
            return False
        return hmac.compare_digest(_hash(password, row[0]), row[1])

    # tasks
    def _row(self, row: tuple[object, ...]) -> Task:
        job_id, user, model, step, job_type, section, payload, status, submitted = row
        return Task(int(str(job_id)), str(user), int(str(model)), str(step), str(job_type),
                    str(section), str(payload), TaskStatus(str(status)), str(submitted))

    _TASK_COLS = "job_id, username, model, step, job_type, section, payload, status, submitted"

    def submit(
        self, username: str, model: int, step: Step, payload: str, plot_number: int | None = None,
        queue: bool = False,
    ) -> Submission:
        """Take a task, atomically. On a free model number it starts at once (see
        `_start_unlocked`); on a busy one it raises Busy, or with `queue` waits, listed as
        Queued, until `start` is called for it when the tasks before it have ended."""
        with self.transaction() as db:
            busy = self._busy_unlocked(username, model)
            if busy and not queue:
                raise Busy()
            if plot_number is not None:
                self._plot_section_unlocked(username, model, plot_number)  # checked now
            cur = db.execute(
                f"INSERT INTO tasks ({self._TASK_COLS.replace('job_id, ', '')}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (username, model, step.name if step.stage is not Stage.PLOT else "plot",
                 step.job_type, _WAITING + _section_hint(step, plot_number), payload,
                 TaskStatus.QUEUED.value, _now()),
            )
            job_id = int(cur.lastrowid or 0)
            replaced = None if busy else self._start_unlocked(job_id)
        return Submission(job_id, replaced)

    def start(self, job_id: int) -> tuple[int, ...]:
        """A queued task's turn has come: it takes its section now (see `submit`)."""
        with self.transaction():
            return self._start_unlocked(job_id)

    def _plot_section_unlocked(self, username: str, model: int, plot_number: int | None) -> str:
        """`Plot k`: k = plot_number when given (replacing it), else one more than the
        plots the model holds since its last interaction."""
        held = sum(1 for name, _ in self._sections_unlocked(username, model)
                   if section_stage(name) is Stage.PLOT)
        if plot_number is not None and not 1 <= plot_number <= held + 1:
            raise ValueError(f"plot_number: must be between 1 and {held + 1}")
        return f"Plot {plot_number or held + 1}"

    def _start_unlocked(self, job_id: int) -> tuple[int, ...]:
        """Give a task its section and apply downstream invalidation; returns the earlier
        tasks whose results it replaced or cleared. A queued plot's number was checked
        when it was taken: if plots were cleared meanwhile, it becomes the next one."""
        username, model, step_name, hint = self._db.execute(
            "SELECT username, model, step, section FROM tasks WHERE job_id = ?", (job_id,)
        ).fetchone()
        hint = str(hint).removeprefix(_WAITING)
        stage = _STAGE_OF_TASK[str(step_name)]
        section = hint
        if stage is Stage.PLOT:
            wanted = int(hint.rsplit(" ", 1)[-1]) if hint != _NEXT_PLOT else None
            try:
                section = self._plot_section_unlocked(username, model, wanted)
            except ValueError:
                section = self._plot_section_unlocked(username, model, None)
        replaced = []
        for name, old in self._sections_unlocked(username, model):
            if name == section:
                replaced.append(int(old))
            elif (held := section_stage(name)) is not None and held > stage:
                replaced.append(int(old))
                self._db.execute(
                    "DELETE FROM sections WHERE username = ? AND model = ? AND name = ?",
                    (username, model, name),
                )
        self._db.execute("INSERT OR REPLACE INTO sections VALUES (?, ?, ?, ?)",
                         (username, model, section, job_id))
        self._db.execute("UPDATE tasks SET section = ? WHERE job_id = ?", (section, job_id))
        return tuple(replaced)

    def waiting(self) -> list[int]:
        """Tasks taken but not yet started (a queue of a restarted site), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id FROM tasks WHERE status = ? AND substr(section, 1, 1) = ? "
                "ORDER BY job_id", (TaskStatus.QUEUED.value, _WAITING)).fetchall()
        return [int(r[0]) for r in rows]

    def lose(self, username: str, model: int, step: Step, payload: str) -> int:
        """A task the site takes and then loses: its id is used up, nothing is listed or run
        (the `lost` fault). AUTOINCREMENT never hands the id out again."""
        with self.transaction() as db:
            cur = db.execute(
                f"INSERT INTO tasks ({self._TASK_COLS.replace('job_id, ', '')}) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (username, model, step.name, step.job_type, step.section, payload,
                 TaskStatus.QUEUED.value, _now()),
            )
            job_id = int(cur.lastrowid or 0)
            db.execute("DELETE FROM tasks WHERE job_id = ?", (job_id,))
        return job_id

    def is_busy(self, username: str, model: int) -> bool:
        """Whether the model number's current task is still queued or running."""
        with self._lock:
            return self._busy_unlocked(username, model)

    def _busy_unlocked(self, username: str, model: int) -> bool:
        row = self._db.execute(
            "SELECT status FROM tasks WHERE username = ? AND model = ? "
            "ORDER BY job_id DESC LIMIT 1", (username, model),
        ).fetchone()
        return row is not None and TaskStatus(row[0]).active

    def set_status(self, job_id: int, status: TaskStatus) -> None:
        column = "started" if status is TaskStatus.RUNNING else "finished"
        with self._lock:
            self._db.execute(
                f"UPDATE tasks SET status = ?, {column} = ? WHERE job_id = ?",
                (status.value, _now(), job_id),
            )

    def finished(self, job_id: int) -> str | None:
        """When the task ended (ISO 8601), None while it has not."""
        with self._lock:
            row = self._db.execute(
                "SELECT finished FROM tasks WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None or row[0] is None else str(row[0])

    def status(self, job_id: int) -> TaskStatus | None:
        with self._lock:
            row = self._db.execute(
                "SELECT status FROM tasks WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else TaskStatus(row[0])

    # the ledger: what each task produced and read, kept after its files are deleted, so
    # tests and benchmarks can check a client's downloads byte for byte, chain and all
    def record_output(self, job_id: int, files: list[tuple[str, int, str]],
                      inputs: list[int]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO produced VALUES (?, ?, ?, ?)",
                                 [(job_id, *f) for f in files])
            self._db.executemany("INSERT INTO inputs VALUES (?, ?)",
                                 [(job_id, i) for i in inputs])

    def produced(self, job_id: int) -> dict[str, tuple[int, str]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, size, sha256 FROM produced WHERE job_id = ?", (job_id,)
            ).fetchall()
        return {str(n): (int(size), str(sha)) for n, size, sha in rows}

    def inputs_of(self, job_id: int) -> list[int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT input_job_id FROM inputs WHERE job_id = ?", (job_id,)).fetchall()
        return [int(r[0]) for r in rows]

    def task(self, job_id: int) -> Task | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {self._TASK_COLS} FROM tasks WHERE job_id = ?", (job_id,)
            ).fetchone()
        return None if row is None else self._row(row)

    def tasks(self, username: str) -> list[Task]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._TASK_COLS} FROM tasks WHERE username = ? ORDER BY job_id",
                (username,),
            ).fetchall()
        return [self._row(r) for r in rows]

    def unfinished(self) -> list[Task]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {self._TASK_COLS} FROM tasks WHERE status IN (?, ?) ORDER BY job_id",
                (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value),
            ).fetchall()
        return [self._row(r) for r in rows]

    def task_count(self, username: str | None = None) -> int:
        with self._lock:
            if username is None:
                return int(self._db.execute("SELECT COUNT(*) FROM tasks").fetchone()[0])
            return int(self._db.execute(
                "SELECT COUNT(*) FROM tasks WHERE username = ?", (username,)
            ).fetchone()[0])

    # sections
    def _sections_unlocked(self, username: str, model: int) -> list[tuple[str, int]]:
        return self._db.execute(
            "SELECT name, job_id FROM sections WHERE username = ? AND model = ?",
            (username, model),
        ).fetchall()

    def sections(self, username: str, model: int) -> list[Section]:
        """The model's result sections in chain order (galaxies, merge, interaction, plots)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.name, s.job_id, t.status FROM sections s JOIN tasks t "
                "USING (job_id) WHERE s.username = ? AND s.model = ?",
                (username, model),
            ).fetchall()
        out = [Section(name, job_id, TaskStatus(status)) for name, job_id, status in rows]
        return sorted(out, key=lambda s: (section_stage(s.name) or 0, _plot_no(s.name), s.name))

    def section_job(self, username: str, model: int, name: str) -> int | None:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id FROM sections WHERE username = ? AND model = ? AND name = ?",
                (username, model, name),
            ).fetchone()
        return None if row is None else int(row[0])


def _plot_no(name: str) -> int:
    tail = name.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0
