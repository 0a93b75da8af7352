"""One SQLite file in WAL mode, shared by the threads of a process behind one lock.

WAL lets readers in other processes (`gibatch status`) read beside the writer;
synchronous=NORMAL keeps every commit safe from a crash of the process (`kill -9`),
and loses at most the last commits on a power cut.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


class Database:
    """`caches`: tables (name -> columns) that only remember what can be found again;
    one made by another version is dropped and made anew, not migrated."""

    def __init__(self, path: Path, schema: str,
                 caches: Mapping[str, list[str]] | None = None) -> None:
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None,
                                   timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(schema)
        for table, expected in (caches or {}).items():
            columns = [row[1] for row in self._db.execute(f"PRAGMA table_info({table})")]
            if columns != expected:
                self._db.execute(f"DROP TABLE {table}")
                self._db.executescript(schema)
        self._lock = threading.Lock()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection, inside one write transaction under the lock: committed when the
        block ends, rolled back if it raises (whatever it raises)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()
