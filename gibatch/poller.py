"""One shared poller of the site's task list for every model-number worker.

Every answer goes first to the observers (each model's memory accounts for its new
rows there, so a foreign task is seen whoever polled), then to the waiters, each with
its own condition. A poll that fails past its retries fails every waiter with that
error: each job's boundary decides what it means for the job.

The interval keeps a constant relative precision: a task that has run t seconds is
polled again after PRECISION * t (within POLL_INTERVAL_MIN_S..POLL_INTERVAL_MAX_S), so
noticing its end costs at most PRECISION of its duration, whether it lasts 1 s or an
hour, and the polls per task grow as ln(T) / PRECISION, not with T, until the cap of
one per POLL_INTERVAL_MAX_S (the old course script's rate). A floor F, the shortest
recent duration of the same step, skips the polls before EARLY_FRACTION * F, when the
task cannot have ended; a floor that overstates (the parameters changed) is the only
way to lose more, so it is a minimum, never a mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio

from gibatch.site import SiteClient, TaskRow

POLL_INTERVAL_MIN_S = 0.05
POLL_INTERVAL_MAX_S = 10.0
PRECISION = 0.03  # of a task's age: the most its end can go unnoticed
EARLY_FRACTION = 0.6  # of the floor: no poll before, the task cannot have ended

T = TypeVar("T")
Observer = Callable[[list[TaskRow]], object]


@dataclass
class _Waiter:
    check: Callable[[list[TaskRow]], Any]
    since: float
    floor_s: float
    result: Any = None
    error: BaseException | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


def next_interval(elapsed_s: float, floor_s: float) -> float:
    """Seconds until the next poll for one task that has run `elapsed_s` and is known to
    take at least about `floor_s` (0: nothing known)."""
    early = EARLY_FRACTION * floor_s
    if elapsed_s < early:
        return min(POLL_INTERVAL_MAX_S, early - elapsed_s)
    return min(POLL_INTERVAL_MAX_S, max(POLL_INTERVAL_MIN_S, PRECISION * elapsed_s))


class Poller:
    def __init__(self, client: SiteClient) -> None:
        self.client = client
        self.rows: list[TaskRow] = []
        self.polled_at = float("-inf")
        self.polls = 0
        self._observers: list[tuple[Callable[[], int], Observer]] = []
        self._waiters: list[_Waiter] = []
        self._wake = anyio.Event()

    async def refresh(self) -> list[TaskRow]:
        """Poll now; the answer goes to every observer, then to every waiter."""
        rows = await self.client.tasks()
        self.rows, self.polled_at = rows, time.monotonic()
        self.polls += 1
        for _, observe in sorted(((rank(), i), see) for i, (rank, see)
                                 in enumerate(self._observers)):
            observe(rows)
        for w in list(self._waiters):
            found = w.check(rows)
            if found is not None:
                w.result = found
                w.done.set()
                self._waiters.remove(w)
        return rows

    def observe(self, see: Observer, rank: Callable[[], int] = lambda: 0) -> None:
        """Give every answer to `see`, before the waiters; observers of a lower `rank()`
        (asked at each answer) see it first, the others in the order they came."""
        self._observers.append((rank, see))

    async def recent(self, max_age_s: float) -> list[TaskRow]:
        """The task list, polled anew only if the last answer is older than `max_age_s`."""
        if time.monotonic() - self.polled_at <= max_age_s:
            return self.rows
        return await self.refresh()

    async def wait(self, check: Callable[[list[TaskRow]], T | None], floor_s: float) -> T:
        """Poll until `check(rows)` gives a value (not None) and return it; `floor_s`: the
        least the awaited task is expected to take (0: unknown)."""
        waiter = _Waiter(check, time.monotonic(), floor_s)
        self._waiters.append(waiter)
        self._wake.set()
        try:
            await waiter.done.wait()
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if waiter.error is not None:
            raise waiter.error
        result: T = waiter.result
        return result

    async def run(self) -> None:
        """Poll while anyone waits; sleep until someone does."""
        while True:
            if not self._waiters:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            now = time.monotonic()
            delay = min(next_interval(now - w.since, w.floor_s) for w in self._waiters)
            woken = False
            with anyio.move_on_after(delay):
                await self._wake.wait()
                woken = True
            if woken:  # a new waiter: its wishes may move the next poll
                self._wake = anyio.Event()
                continue
            try:
                await self.refresh()
            except Exception as exc:
                for w in self._waiters:
                    w.error = exc
                    w.done.set()
                self._waiters.clear()


def newest(rows: list[TaskRow], model: int) -> TaskRow | None:
    """The model's current task: its row with the highest id."""
    mine = [r for r in rows if r.model == model]
    return max(mine, key=lambda r: r.job_id) if mine else None
