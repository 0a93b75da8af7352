"""One shared poller of the site's task list for every model-number worker.

Its interval adapts: with a measured estimate E of a task's duration it waits until
about 0.6 E, then polls every POLL_INTERVAL_MIN_S, backing off past E by a tenth of
the overrun up to POLL_INTERVAL_MAX_S (with no estimate, E = 0: the interval grows
with the task's age, so the time lost noticing its end stays a small fraction of it).
A poll answers every waiting worker at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import anyio

from gibatch.site import SiteClient, TaskRow, TaskState

POLL_INTERVAL_MIN_S = 0.1
POLL_INTERVAL_MAX_S = 5.0
EARLY_FRACTION = 0.6
OVERRUN_BACKOFF = 0.1  # extra seconds of interval per second past the estimate


@dataclass
class _Waiter:
    model: int
    after_task_id: int
    since: float
    estimate_s: float
    found: TaskRow | None = None
    done: anyio.Event = field(default_factory=anyio.Event)


def next_interval(elapsed_s: float, estimate_s: float) -> float:
    """Seconds until the next poll for one task that has run `elapsed_s`."""
    early = EARLY_FRACTION * estimate_s
    if elapsed_s < early:
        return min(POLL_INTERVAL_MAX_S, max(POLL_INTERVAL_MIN_S, early - elapsed_s))
    over = max(0.0, elapsed_s - estimate_s)
    return min(POLL_INTERVAL_MAX_S, POLL_INTERVAL_MIN_S + OVERRUN_BACKOFF * over)


class Poller:
    def __init__(self, client: SiteClient) -> None:
        self.client = client
        self.rows: list[TaskRow] = []
        self.polled_at = float("-inf")
        self.polls = 0
        self._waiters: list[_Waiter] = []
        self._wake = anyio.Event()

    async def refresh(self) -> list[TaskRow]:
        """Poll now and hand the answer to every waiter."""
        self.rows = await self.client.tasks()
        self.polled_at = time.monotonic()
        self.polls += 1
        for w in list(self._waiters):
            row = newest(self.rows, w.model)
            finished = row is not None and row.state is not TaskState.ACTIVE
            if row is not None and finished and row.job_id > w.after_task_id:
                w.found = row
                w.done.set()
                self._waiters.remove(w)
        return self.rows

    async def recent(self, max_age_s: float) -> list[TaskRow]:
        """The task list, polled anew only if the last answer is older than `max_age_s`."""
        if time.monotonic() - self.polled_at <= max_age_s:
            return self.rows
        return await self.refresh()

    async def wait_finished(self, model: int, after_task_id: int, estimate_s: float) -> TaskRow:
        """The first task of `model` newer than `after_task_id`, once it is no longer active."""
        waiter = _Waiter(model, after_task_id, time.monotonic(), estimate_s)
        self._waiters.append(waiter)
        self._wake.set()
        await waiter.done.wait()
        assert waiter.found is not None
        return waiter.found

    async def run(self) -> None:
        """Poll while anyone waits; sleep until someone does."""
        while True:
            if not self._waiters:
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            now = time.monotonic()
            delay = min(next_interval(now - w.since, w.estimate_s) for w in self._waiters)
            woken = False
            with anyio.move_on_after(delay):
                await self._wake.wait()
                woken = True
            if woken:  # a new waiter: its wishes may move the next poll
                self._wake = anyio.Event()
                continue
            await self.refresh()


def newest(rows: list[TaskRow], model: int) -> TaskRow | None:
    """The model's current task: its row with the highest id."""
    mine = [r for r in rows if r.model == model]
    return max(mine, key=lambda r: r.job_id) if mine else None
