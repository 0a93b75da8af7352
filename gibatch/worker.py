"""One model number's worker: runs a job's steps on it, in chain order, and lists its results.

It speaks to the site through the client and the shared poller, and keeps what the
model holds in its `ModelMemory`. It never decides a job's outcome: whatever goes
wrong is raised to the job's boundary in `run.py`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import anyio

from gibatch import record
from gibatch.errors import (
    AmbiguousSubmit,
    GibatchError,
    JobFailed,
    ModelBusy,
    ModelStuck,
    ResultVanished,
    SessionExpired,
    TransientError,
)
from gibatch.jobs import Job
from gibatch.journal import Event, Intent, Journal
from gibatch.memory import Expected, ModelMemory, Posting, inputs_of
from gibatch.poller import Poller, newest
from gibatch.site import Section, SiteClient, TaskRow, TaskState
from gibatch.slots import ModelLock
from gibatch.steps import GALAXY1, GALAXY2, INTERACT, MERGE, Stage, Step, plot
from gibatch.transfer import fetch

log = logging.getLogger("gibatch")

FRESH_ROWS_S = 1.0  # a task list this recent is as good as a new poll before a job
MAX_FOREIGN_RESTARTS = 8  # a model someone keeps using cannot hold a job forever

Emit = Callable[..., None]


class Interrupted(GibatchError):
    """A stop was asked for (Ctrl-C, SIGTERM) before the job's next task was sent."""


class _Overdue(Enum):
    """What an own task's wait found instead of its end."""

    UNLISTED = "never listed"  # the site accepted it, then lost it
    STUCK = "not ended"  # it holds the model number past `stuck_after_s`


class _ForeignRestart(Exception):
    """A foreign task held the model when a step was posted: start the job over."""


@dataclass
class Durations:
    """Seconds per task: stage means for ranking jobs, recent floors for polling.

    Ranking uses the journal's measured mean per stage (defaults where none). Polling
    uses, per step ("galaxy2", "plot1"), the shortest of its last FLOOR_WINDOW durations
    in this run: a galaxy 2 may take a tenth of galaxy 1, and an interaction a third of
    the one before, so a mean would hold back noticing a short task by the difference.
    """

    FLOOR_WINDOW = 5

    journal: Journal
    estimates: dict[Stage, float] = field(default_factory=dict)
    measured: set[Stage] = field(default_factory=set)
    recent: dict[str, deque[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.estimates = self.journal.stage_estimates()
        self.measured = {Stage(k) for k in self.journal.mean_durations()}

    def poll_floor(self, step: Step) -> float:
        seen = self.recent.get(step.name)
        return min(seen) if seen else 0.0

    def learn(self, step: Step, seconds: float) -> None:
        self.recent.setdefault(step.name, deque(maxlen=self.FLOOR_WINDOW)).append(seconds)
        self.estimates[step.stage] = (0.7 * self.estimates[step.stage] + 0.3 * seconds
                                      if step.stage in self.measured else seconds)
        self.measured.add(step.stage)
        self.journal.add_duration(int(step.stage), seconds)


@dataclass(frozen=True)
class Listed:
    """A job whose every step is on the model: the sections to download, by output folder."""

    chosen: dict[str, Section]
    foreign_mark: int  # foreign tasks seen when the listing was taken
    started: float


@dataclass
class Counts:
    tasks_submitted: int = 0
    steps_skipped: int = 0
    dispatch_delays_s: list[float] = field(default_factory=list)


class ModelWorker:
    def __init__(self, client: SiteClient, poller: Poller, memory: ModelMemory,
                 lock: ModelLock, durations: Durations, counts: Counts, emit: Emit,
                 stopping: Callable[[], bool]) -> None:
        self.client = client
        self.poller = poller
        self.memory = memory
        self.lock = lock
        self.durations = durations
        self.counts = counts
        self.emit = emit
        self.stopping = stopping
        self.model = memory.model
        # Told of each step the model holds for the job (run or skipped) as soon as it
        # does: the scheduler may start downloading that section while later steps run.
        self.on_ready: Callable[[Job, Step, str], None] | None = None
        self._last_finish: float | None = None
        poller.observe(self._observe, rank=memory.observe_rank)

    @property
    def journal(self) -> Journal:
        return self.memory.journal

    def _observe(self, rows: list[TaskRow]) -> None:
        for row in self.memory.observe(rows):
            self.emit(Event.MEMORY_VOID, model=self.model,
                      detail=f"task {row.job_id} ({row.job_type}, {row.status}) was started "
                             "elsewhere; what it replaced is no longer counted as held")

    # -- before any job

    async def reconcile(self) -> None:
        """Square the remembered state with the site: adopt a task posted just before a
        crash, account for everything newer, learn section names if unknown."""
        intent = self.journal.intent(self.memory.site, self.model)
        own = None
        if intent is not None:
            own = self.memory.expect(_step_named(intent.step), intent.lineage, None,
                                     intent.after_task_id)
            self.memory.answered(own, before_run=True)  # maybe: the first matching row is it
        await self.poller.refresh()
        if intent is not None and own is not None:
            if own.job_id is not None:
                self.emit(Event.STEP_ADOPTED, intent.job, self.model, intent.step,
                          f"task {own.job_id} found after a restart")
                stuck_by = self._stuck_by()
                ended = await self.poller.wait(
                    lambda _rows: own.row or (time.monotonic() > stuck_by or None), 0.0)
                if not isinstance(ended, TaskRow):
                    raise self._stuck(f"task {own.job_id} ({intent.step} of job {intent.job}, "
                                      "posted before a restart)")
            self.memory.done_expecting()
            self.journal.clear_intent(self.memory.site, self.model)
        if self.memory.last_task_id < 0:  # never seen this model: nothing is known held
            self.memory.last_task_id = max((r.job_id for r in self.poller.rows
                                            if r.model == self.model), default=0)
            self.memory.void()
        await self._settle()

    async def _settle(self) -> None:
        """Until the model is idle (a foreign task running ends) and its names are known."""
        rows = await self.poller.recent(FRESH_ROWS_S)
        top = newest(rows, self.model)
        if top is not None and top.state is TaskState.ACTIVE:
            self.emit(Event.MEMORY_VOID, model=self.model,
                      detail=f"waiting for task {top.job_id} ({top.job_type}) started elsewhere")
            await self._wait_idle()
        while not self.memory.names_known:
            sections = await self.client.sections(self.model)
            mark = len(self.memory.foreign)
            await self.poller.refresh()
            if len(self.memory.foreign) == mark:
                self.memory.learn_names(s.name for s in sections)

    async def _wait_idle(self) -> None:
        """Until the model's current task (someone else's) has ended; ModelStuck if it
        has not within `stuck_after_s`."""
        stuck_by = self._stuck_by()

        def idle(rows: list[TaskRow]) -> TaskRow | bool | None:
            top = newest(rows, self.model)
            if top is None or top.state is not TaskState.ACTIVE:
                return True
            return top if time.monotonic() > stuck_by else None

        found = await self.poller.wait(idle, 0.0)
        if isinstance(found, TaskRow):
            raise self._stuck(f"task {found.job_id} ({found.job_type}), started elsewhere "
                              f"and still {found.status},")

    def _stuck_by(self) -> float:
        """When a task queued or running from now on holds the model for good."""
        return time.monotonic() + self.client.retry.stuck_after_s

    def _stuck(self, task: str, job: str | None = None) -> ModelStuck:
        return ModelStuck(f"{task} has not ended within "
                          f"{self.client.retry.stuck_after_s:.0f} s", job=job, model=self.model)

    # -- one job

    async def run_job(self, job: Job) -> Listed:
        """Every step of `job` on this model (skipping what it holds), then its listing.

        A foreign task seen meanwhile sends the job back to its first step, where every
        step the model still holds for sure is skipped again.
        """
        started = time.time()
        self.emit(Event.JOB_START, job.name, self.model)
        partials_dropped = False
        for _ in range(MAX_FOREIGN_RESTARTS):
            await self._settle()
            mark = len(self.memory.foreign)
            if not partials_dropped and any(self.memory.holds(job, s) is None
                                            for s in job.steps):
                # New results are coming: no old partial file may be resumed with their
                # bytes. Dropped now, before a held step starts an early download
                # (`on_ready`) whose own partial files this must not delete. (What the
                # model holds changes only while a step runs, so a step found held here
                # is still held when the loop below reaches it, or one before it ran.)
                await anyio.to_thread.run_sync(record.drop_partials, job)
                partials_dropped = True
            placed: dict[Step, str] = {}
            for step in job.steps:
                held = self.memory.holds(job, step)
                if held is not None:
                    placed[step] = held
                    self.counts.steps_skipped += 1
                    self.emit(Event.STEP_SKIPPED, job.name, self.model, step.name,
                              f"model holds it as {held!r}")
                    if self.on_ready is not None:
                        self.on_ready(job, step, held)
                    continue
                if self.stopping():
                    raise Interrupted(f"stopped before submitting {step.name}; "
                                      "the next run goes on from there")
                try:
                    placed[step] = await self._run_step(job, step, placed)
                except _ForeignRestart:
                    break
                if len(self.memory.foreign) != mark:
                    break
                if self.on_ready is not None:
                    self.on_ready(job, step, placed[step])
            else:
                listed = await self._listing(job, placed, mark, started)
                if listed is not None:
                    return listed
        raise JobFailed(f"model {self.model} kept being changed by tasks started elsewhere "
                        f"({len(self.memory.foreign)} seen); giving up on this job for now")

    async def _listing(self, job: Job, placed: dict[Step, str], mark: int,
                       started: float) -> Listed | None:
        """The sections of `placed`, checked against a task list polled after them."""
        sections = {s.name: s for s in await self.client.sections(self.model)}
        await self.poller.refresh()
        if len(self.memory.foreign) != mark:
            return None
        unseen = self.memory.unaccounted(sections)
        if unseen:  # a task ran that no listing showed: which plot is whose is unknown
            self.emit(Event.MEMORY_VOID, job.name, self.model, detail=(
                f"the site shows {', '.join(map(repr, unseen))}, made by a task no listing "
                "showed (one row per model number?); no plot is taken for sure"))
            return None
        chosen: dict[str, Section] = {}
        for step, name in placed.items():
            found = sections.get(name)
            if found is None or found.state is not TaskState.COMPLETED:
                self.memory.forget(name)
                raise ResultVanished(
                    f"the site no longer shows {name!r} ({step.name}) as completed on "
                    f"model {self.model}", section=name, job=job.name, model=self.model)
            chosen[step.section] = found
        return Listed(chosen, mark, started)

    async def _run_step(self, job: Job, step: Step, placed: dict[Step, str]) -> str:
        await self.memory.wait_readers(step)  # never clear a section still being downloaded
        own = self.memory.expect(step, job.lineage[step], inputs_of(job, placed, step))
        intent = Intent(job.name, step.name, step.section, step.job_type, job.lineage[step],
                        own.after_task_id)
        submitted = time.monotonic()
        if self._last_finish is not None:
            self.counts.dispatch_delays_s.append(submitted - self._last_finish)
        try:
            await self._submit(job, step, intent)
            self.counts.tasks_submitted += 1
            self.emit(Event.STEP_SUBMITTED, job.name, self.model, step.name)
            listed_by = time.monotonic() + self.client.retry.listing_grace_s
            stuck_by = self._stuck_by()

            def outcome(_rows: list[TaskRow]) -> TaskRow | _Overdue | None:
                if own.row is not None:
                    return own.row
                now = time.monotonic()
                if not own.listed and (own.gone is not None or now > listed_by):
                    return _Overdue.UNLISTED
                return _Overdue.STUCK if now > stuck_by else None

            row = await self.poller.wait(outcome, self.durations.poll_floor(step))
            if row is _Overdue.UNLISTED:  # accepted, yet never listed: the site lost it
                self.memory.refused(own)
                raise ResultVanished(
                    f"the site accepted {step.name} (task {own.job_id or 'id unknown'}) but "
                    + (f"no listed task can be it: {own.gone}" if own.gone else
                       f"never listed it within {self.client.retry.listing_grace_s:.0f} s"),
                    job=job.name, model=self.model, elsewhere=True)
            if not isinstance(row, TaskRow):  # its intent stays: a later run adopts it
                raise self._stuck(f"its {step.name} task {own.job_id or '(id unknown)'}",
                                  job.name)
        except BaseException:
            # A task that may be on the site keeps its intent, for the next run to adopt.
            if own.posting is Posting.UNSENT:
                self.journal.clear_intent(self.memory.site, self.model)
            raise
        finally:
            self.memory.done_expecting()
        self.journal.clear_intent(self.memory.site, self.model)
        finished = time.monotonic()
        self._last_finish = finished
        self.durations.learn(step, finished - submitted)
        assert own.section is not None
        if not own.intact:  # a foreign task changed its inputs: not the job's result
            if own.unknown is not None:
                self.emit(Event.MEMORY_VOID, job.name, self.model, step.name,
                          f"{own.unknown}: its result is not taken; running it again")
            raise _ForeignRestart()
        if row.state is not TaskState.COMPLETED:
            self.emit(Event.STEP_FAILED, job.name, self.model, step.name, row.status)
            await self._save_error(job, step, own.section)
            raise JobFailed(f"the site's {step.name} task {row.job_id} failed on model "
                            f"{self.model} (see output/{step.section}/error.txt)")
        self.emit(Event.STEP_COMPLETED, job.name, self.model, step.name,
                  f"task {row.job_id} in {finished - submitted:.1f} s as {own.section!r}")
        return own.section

    async def _submit(self, job: Job, step: Step, intent: Intent) -> None:
        """POST the expected task; after an ambiguous answer, adopt it if the site has it.

        Refused or ambiguous POSTs are retried with the client's backoff policy, then
        the job fails. A 409 means someone else's task is running: wait for it to end
        (the foreign task is accounted for) and post again. The journal holds the intent
        exactly while a POST may be on the site untaken-for: from just before each
        attempt until it is refused (a crash in the backoff that follows, or while a
        409's task is waited out, must not have the next run adopt a task of that type
        started elsewhere meanwhile).
        """
        own = self.memory.expected
        assert own is not None
        give_up = time.monotonic() + self.client.retry.give_up_after_s
        delay = self.client.retry.base_s
        while True:
            self.journal.set_intent(self.memory.site, self.model, intent)
            self.memory.sending(own)
            try:
                job_id = await self.client.submit(step, self.model, job.payload(step))
            except ModelBusy as exc:
                self._not_taken(own)
                await self.poller.refresh()
                await self._wait_idle()
                raise _ForeignRestart() from exc
            except AmbiguousSubmit as exc:
                last: Exception = exc
                self.memory.answered(own)  # maybe: the first matching new row is it
                await self.poller.refresh()
                if own.job_id is not None:
                    self.emit(Event.STEP_ADOPTED, job.name, self.model, step.name,
                              f"task {own.job_id}: the site had queued it despite: {exc}")
                    return
                self._not_taken(own)
            except (TransientError, SessionExpired) as exc:  # nothing was sent
                last = exc
                self._not_taken(own, sent=False)
            except BaseException:
                self.memory.refused(own)  # (the caller keeps or clears the intent)
                raise
            else:
                self.memory.answered(own, job_id)
                return
            if time.monotonic() + delay > give_up:
                raise JobFailed(f"the site kept refusing {step.name} on model {self.model}: "
                                f"{last}")
            log.info("retrying %s of job %s in %.1f s after: %s", step.name, job.name,
                     delay, last)
            await anyio.sleep(delay)
            delay = min(self.client.retry.cap_s, delay * 2)

    def _not_taken(self, own: Expected, sent: bool = True) -> None:
        """The POST was not taken: no row is its own, and no next run looks for one."""
        self.memory.refused(own, sent)
        self.journal.clear_intent(self.memory.site, self.model)

    async def _save_error(self, job: Job, step: Step, section: str) -> None:
        sections = {s.name: s for s in await self.client.sections(self.model)}
        found = sections.get(section)
        for remote in found.files if found else ():
            if remote.name == "error.txt":
                await fetch(self.client, remote, job.output / step.section,
                            anyio.Semaphore(1))


def _step_named(name: str) -> Step:
    """A step from its job-folder stem (galaxy1, merge, plot2), as kept in intents."""
    fixed = {"galaxy1": GALAXY1, "galaxy2": GALAXY2, "merge": MERGE, "interact": INTERACT}
    return fixed.get(name) or plot(int(name.removeprefix("plot")))


__all__ = ["Counts", "Durations", "Interrupted", "Listed",
           "ModelWorker"]
