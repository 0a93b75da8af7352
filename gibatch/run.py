"""The scheduler: one worker per model number, all owned by one task group.

Each worker holds its model number's OS lock, takes the pending job that lets it skip
the most work (affinity), runs the job's steps in chain order, skipping every step whose
lineage the model already holds, and hands the finished job to a finisher that
downloads its sections and writes the completion record. The worker meanwhile starts
the next job; a task that would clear a section still downloading waits for it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from gibatch import record
from gibatch.errors import (
    AmbiguousSubmit,
    GibatchError,
    NoModelAvailable,
    PermanentError,
    TransientError,
)
from gibatch.holdings import after_task, best_job, held_section, new_section, section_step
from gibatch.jobs import Job, Sweep
from gibatch.journal import Event, Intent, Journal
from gibatch.poller import Poller, newest
from gibatch.site import ModelBusy, RemoteFile, Section, SiteClient, TaskRow, TaskState
from gibatch.slots import JobClaim, ModelLock
from gibatch.steps import Stage, Step, survives
from gibatch.transfer import FileRecord, fetch

log = logging.getLogger("gibatch")

SUBMIT_RETRY_S = 2.0
FRESH_ROWS_S = 1.0  # a task list this recent is as good as a new poll before a job
DEFAULT_GRACE_S = 30.0


class Outcome(StrEnum):
    COMPLETE = "complete"
    ALREADY_COMPLETE = "already complete"
    FAILED = "failed"
    INVALID = "invalid"
    ELSEWHERE = "claimed by another gibatch"
    NOT_RUN = "not run"


@dataclass
class Options:
    jobs_dir: Path
    models: list[int]
    concurrency: int = 4
    grace_s: float = DEFAULT_GRACE_S


@dataclass
class ModelState:
    """What one model number holds: section name -> lineage, and its last known task."""

    model: int
    lock: ModelLock
    held: dict[str, str] = field(default_factory=dict)
    last_task_id: int = 0
    downloading: dict[str, anyio.Event] = field(default_factory=dict)


@dataclass
class Summary:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    tasks_submitted: int = 0
    steps_skipped: int = 0
    models_used: list[int] = field(default_factory=list)
    models_refused: dict[int, str] = field(default_factory=dict)
    dispatch_delays_s: list[float] = field(default_factory=list)
    requests: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes.values() if o is outcome)

    @property
    def exit_code(self) -> int:
        if not self.models_used and self.models_refused:
            return 3
        bad = (Outcome.FAILED, Outcome.INVALID, Outcome.NOT_RUN)
        return 1 if any(o in bad for o in self.outcomes.values()) else 0


class JobFailed(GibatchError):
    pass


class Interrupted(GibatchError):
    """A stop was asked for (Ctrl-C, SIGTERM) before the job's next task was sent."""


Listener = Callable[[str, dict[str, object]], None]


class Scheduler:
    def __init__(
        self, client: SiteClient, sweep: Sweep, options: Options, journal: Journal,
        listener: Listener | None = None,
    ) -> None:
        self.client = client
        self.sweep = sweep
        self.options = options
        self.journal = journal
        self.site = client.site_key
        self.poller = Poller(client)
        self.summary = Summary()
        self.pending: list[Job] = []
        self.claims: dict[str, JobClaim] = {}
        self.transfers = anyio.Semaphore(max(1, options.concurrency))
        self.estimates = journal.stage_estimates()  # for affinity: defaults are fine
        # Only measured durations may delay polling: a default that overstates a short
        # task would hold back the next submission by the difference.
        self.measured = {Stage(k) for k in journal.mean_durations()}
        self.stopping = False
        self._listener = listener
        self._last_finish: dict[int, float] = {}

    # -- reporting

    def emit(self, event: Event, job: str | None = None, model: int | None = None,
             step: str | None = None, detail: str | None = None, **extra: object) -> None:
        """Journal `event`, log it, and tell the listener (with `extra` fields)."""
        self.journal.record(event, job, model, step, detail)
        parts = [p for p in (f"job {job}" if job else "", f"model {model}" if model else "",
                             step or "") if p]
        log.info("%s %s%s", event.value, " ".join(parts), f": {detail}" if detail else "")
        if self._listener:
            self._listener(event.value, {"job": job, "model": model, "step": step,
                                         "detail": detail, **extra})

    # -- entry point

    async def execute(self) -> Summary:
        """Run every job of the sweep; returns what became of each."""
        for problem_job in self.sweep.invalid_jobs:
            self.summary.outcomes[problem_job] = Outcome.INVALID
            self.summary.reasons[problem_job] = "; ".join(
                str(p) for p in self.sweep.problems if p.job == problem_job)
        for job in self.sweep.jobs:
            if record.is_complete(job):
                self.summary.outcomes[job.name] = Outcome.ALREADY_COMPLETE
            else:
                self.pending.append(job)
        states = await self._lock_models()
        if not states:
            self.summary.ended = time.monotonic()
            raise NoModelAvailable("every requested model number is held by another gibatch: "
                                   + "; ".join(f"model {m}: {why}" for m, why in
                                               self.summary.models_refused.items()))
        self.emit(Event.RUN_START, detail=f"{len(self.pending)} jobs to run",
                  jobs=len(self.pending), models=[s.model for s in states])
        try:
            if self.pending:
                await self.client.login()
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self.poller.run)
                    outer.start_soon(self._watch_signals, outer)
                    async with anyio.create_task_group() as workers:
                        for state in states:
                            workers.start_soon(self._worker, state, workers)
                    outer.cancel_scope.cancel()
        finally:
            for state in states:
                state.lock.release()
            for claim in self.claims.values():
                claim.release()
            for job in self.pending:
                self.summary.outcomes.setdefault(job.name, Outcome.NOT_RUN)
            self.summary.ended = time.monotonic()
            self.summary.requests = dict(self.client.requests)
            self.emit(Event.RUN_END, detail=self._summary_line())
        return self.summary

    def _summary_line(self) -> str:
        s = self.summary
        return ", ".join(f"{o.value}: {s.count(o)}" for o in Outcome if s.count(o))

    async def _lock_models(self) -> list[ModelState]:
        states = []
        for model in self.options.models:
            lock = ModelLock(self.site, model, self.options.jobs_dir)
            if await anyio.to_thread.run_sync(lock.acquire):
                held = self.journal.held(self.site, model)
                last = self.journal.last_task_id(self.site, model)
                states.append(ModelState(model, lock, held, last if last is not None else -1))
                self.summary.models_used.append(model)
            else:
                holder = lock.holder()
                why = f"held by another gibatch ({holder})" if holder else "held by another gibatch"
                self.summary.models_refused[model] = why
                log.warning("model %d is %s; going on without it", model, why)
        return states

    async def _watch_signals(self, outer: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stopping:
                    log.warning("second signal: stopping now")
                    outer.cancel_scope.cancel()
                    return
                self.stopping = True
                log.warning("%s: no new tasks; finishing what is in flight (grace %.0f s)",
                            signal.Signals(signum).name, self.options.grace_s)
                outer.start_soon(self._grace_then_cancel, outer)

    async def _grace_then_cancel(self, outer: TaskGroup) -> None:
        await anyio.sleep(self.options.grace_s)
        log.warning("grace period over: cancelling what is left")
        outer.cancel_scope.cancel()

    # -- one model number

    async def _worker(self, state: ModelState, tg: TaskGroup) -> None:
        await self._reconcile(state)
        while not self.stopping:
            job = await self._pick(state)
            if job is None:
                return
            try:
                await self._run_job(state, job, tg)
            except (PermanentError, JobFailed) as exc:
                self._fail(job, state.model, str(exc))
            except Interrupted as exc:
                self.summary.outcomes[job.name] = Outcome.NOT_RUN
                self.summary.reasons[job.name] = str(exc)
                self.emit(Event.JOB_INTERRUPTED, job.name, state.model, detail=str(exc))
                self._release(job)

    def _fail(self, job: Job, model: int, reason: str) -> None:
        self.summary.outcomes[job.name] = Outcome.FAILED
        self.summary.reasons[job.name] = reason
        self.emit(Event.JOB_FAILED, job.name, model, detail=reason)
        self._release(job)

    def _release(self, job: Job) -> None:
        claim = self.claims.pop(job.name, None)
        if claim:
            claim.release()

    async def _pick(self, state: ModelState) -> Job | None:
        """Claim the pending job with the most work already done here (ties: natural order).

        Choosing and claiming happen without an await in between, so two workers of
        this process never take one job; the claim's non-blocking flock keeps other
        processes off it.
        """
        while self.pending:
            job = self.pending.pop(best_job(self.pending, state.held, self.estimates))
            claim = JobClaim(self.options.jobs_dir, job.name)
            if not claim.acquire():
                self.summary.outcomes[job.name] = Outcome.ELSEWHERE
                continue
            self.claims[job.name] = claim
            if record.is_complete(job):  # another run finished it meanwhile
                self.summary.outcomes[job.name] = Outcome.ALREADY_COMPLETE
                self._release(job)
                continue
            return job
        return None

    def _persist(self, state: ModelState) -> None:
        self.journal.set_held(self.site, state.model, state.held, state.last_task_id)

    async def _reconcile(self, state: ModelState) -> None:
        """Square the remembered state of a model number with what the site shows."""
        rows = await self.poller.refresh()
        intent = self.journal.intent(self.site, state.model)
        if intent is not None:
            adopted = _adoptable(rows, state.model, intent.after_task_id, intent.job_type)
            if adopted is not None:
                self.emit(Event.STEP_ADOPTED, intent.job, state.model, intent.step,
                          f"task {adopted.job_id} found after a restart")
                stage = section_step(intent.section).stage
                row = await self._finish_wait(state, adopted, stage)
                self._apply(state, intent.section, row, intent.lineage)
            self.journal.clear_intent(self.site, state.model)
        top = newest(self.poller.rows, state.model)
        if top is not None and top.state is TaskState.ACTIVE:
            top = await self.poller.wait_finished(state.model, top.job_id - 1, 0.0)
        top_id = top.job_id if top else 0
        if state.last_task_id < 0 or top_id > state.last_task_id:
            if state.held:
                self.emit(Event.MEMORY_VOID, model=state.model,
                          detail=f"task {top_id} on the site was not submitted by this gibatch")
            state.held = {}
            state.last_task_id = top_id
        self._persist(state)

    async def _finish_wait(self, state: ModelState, row: TaskRow, stage: Stage) -> TaskRow:
        if row.state is TaskState.ACTIVE:
            row = await self.poller.wait_finished(state.model, row.job_id - 1,
                                                  self._poll_estimate(stage))
        return row

    def _apply(self, state: ModelState, section: str, row: TaskRow, lineage: str) -> None:
        """Record a finished task of ours: invalidation downstream, then its own section."""
        state.held = after_task(state.held, section_step(section), section, lineage,
                                row.state is TaskState.COMPLETED)
        state.last_task_id = max(state.last_task_id, row.job_id)
        self._persist(state)

    # -- one job

    async def _run_job(self, state: ModelState, job: Job, tg: TaskGroup) -> None:
        started = time.time()
        self.emit(Event.JOB_START, job.name, state.model)
        await self._check_foreign(state)
        placed: dict[Step, str] = {}
        for step in job.steps:
            held = held_section(state.held, job, step)
            if held is not None:
                placed[step] = held
                self.summary.steps_skipped += 1
                self.emit(Event.STEP_SKIPPED, job.name, state.model, step.name,
                          f"model holds it as {held!r}")
                continue
            if self.stopping:
                raise Interrupted(f"stopped before submitting {step.name}; "
                                  "the next run goes on from there")
            placed[step] = await self._run_step(state, job, step)
        await self._collect(state, job, placed, started, tg)

    async def _check_foreign(self, state: ModelState) -> None:
        rows = await self.poller.recent(FRESH_ROWS_S)
        top = newest(rows, state.model)
        if top is not None and top.job_id > state.last_task_id:
            self.emit(Event.MEMORY_VOID, model=state.model,
                      detail=f"task {top.job_id} ({top.job_type}) appeared behind our back")
            if top.state is TaskState.ACTIVE:
                await self.poller.wait_finished(state.model, top.job_id - 1, 0.0)
            state.held = {}
            state.last_task_id = top.job_id
            self._persist(state)

    async def _run_step(self, state: ModelState, job: Job, step: Step) -> str:
        for name, done in list(state.downloading.items()):
            if not survives(name, step):
                await done.wait()  # never clear a section still being downloaded
        section = new_section(state.held, step)
        before = state.last_task_id
        self.journal.set_intent(self.site, state.model, Intent(
            job.name, step.name, section, step.job_type, job.lineage[step], before))
        submitted = time.monotonic()
        if state.model in self._last_finish:
            self.summary.dispatch_delays_s.append(submitted - self._last_finish[state.model])
        await self._submit(state, job, step, before)
        self.summary.tasks_submitted += 1
        self.emit(Event.STEP_SUBMITTED, job.name, state.model, step.name, section)
        row = await self.poller.wait_finished(state.model, before,
                                              self._poll_estimate(step.stage))
        finished = time.monotonic()
        self._last_finish[state.model] = finished
        self._learn(step.stage, finished - submitted)
        self._apply(state, section, row, job.lineage[step])
        self.journal.clear_intent(self.site, state.model)
        if row.state is not TaskState.COMPLETED:
            self.emit(Event.STEP_FAILED, job.name, state.model, step.name, row.status)
            await self._save_error(state, job, step, section)
            raise JobFailed(f"the site's {step.name} task {row.job_id} failed"
                            f" (see output/{step.section}/error.txt)")
        self.emit(Event.STEP_COMPLETED, job.name, state.model, step.name,
                  f"task {row.job_id} in {finished - submitted:.1f} s")
        return section

    def _poll_estimate(self, stage: Stage) -> float:
        return self.estimates[stage] if stage in self.measured else 0.0

    def _learn(self, stage: Stage, seconds: float) -> None:
        if stage in self.measured:
            self.estimates[stage] = 0.7 * self.estimates[stage] + 0.3 * seconds
        else:
            self.estimates[stage] = seconds
            self.measured.add(stage)
        self.journal.add_duration(int(stage), seconds)

    async def _submit(self, state: ModelState, job: Job, step: Step, before: int) -> None:
        """POST once; after an ambiguous failure, adopt the task if the site has it."""
        while True:
            try:
                await self.client.submit(step, state.model, job.payload(step))
                return
            except (AmbiguousSubmit, ModelBusy) as exc:
                rows = await self.poller.refresh()
                if _adoptable(rows, state.model, before, step.job_type) is not None:
                    self.emit(Event.STEP_ADOPTED, job.name, state.model, step.name,
                              f"the site had queued it despite: {exc}")
                    return
                top = newest(rows, state.model)
                if top is not None and top.state is TaskState.ACTIVE:
                    raise JobFailed(f"model {state.model} is busy with task {top.job_id}, "
                                    "which this gibatch did not submit") from exc
                log.info("retrying %s of job %s after: %s", step.name, job.name, exc)
                await anyio.sleep(SUBMIT_RETRY_S)
            except TransientError as exc:  # the token page failed: nothing was sent
                log.info("retrying %s of job %s after: %s", step.name, job.name, exc)
                await anyio.sleep(SUBMIT_RETRY_S)

    async def _save_error(self, state: ModelState, job: Job, step: Step, section: str) -> None:
        sections = {s.name: s for s in await self.client.sections(state.model)}
        found = sections.get(section)
        for remote in found.files if found else ():
            if remote.name == "error.txt":
                await fetch(self.client, remote, job.output / step.section, self.transfers)

    async def _collect(self, state: ModelState, job: Job, placed: dict[Step, str],
                       started: float, tg: TaskGroup) -> None:
        """List the job's sections once, then download them in the background."""
        listing = {s.name: s for s in await self.client.sections(state.model)}
        chosen: dict[str, Section] = {}
        for step, site_name in placed.items():
            section = listing.get(site_name)
            if section is None or section.state is not TaskState.COMPLETED:
                state.held = {}
                self._persist(state)
                raise JobFailed(f"the site does not show {site_name!r} as completed; "
                                "the model's memory is void, the job will be rerun")
            chosen[step.section] = section
        events = {}
        for site_name in placed.values():
            ev = state.downloading.get(site_name) or anyio.Event()
            state.downloading[site_name] = events[site_name] = ev
        tg.start_soon(self._finish, state, job, chosen, started, events)

    async def _finish(self, state: ModelState, job: Job, chosen: dict[str, Section],
                      started: float, events: dict[str, anyio.Event]) -> None:
        try:
            files: dict[str, list[FileRecord]] = {}
            async with anyio.create_task_group() as tg:
                for folder, section in chosen.items():
                    files[folder] = []
                    for remote in section.files:
                        tg.start_soon(self._fetch_into, remote, job.output / folder,
                                      files[folder])
            # No await from here on: the record is written whole or not at all.
            record.prune(job, {k: {f.name for f in v} for k, v in files.items()})
            record.write(job, files, self.site, state.model, started)
            self.summary.outcomes[job.name] = Outcome.COMPLETE
            n = sum(len(v) for v in files.values())
            self.emit(Event.JOB_COMPLETE, job.name, state.model,
                      detail=f"{n} files in {time.time() - started:.1f} s")
        except GibatchError as exc:
            self._fail(job, state.model, f"download failed: {exc}")
        finally:
            for name, ev in events.items():
                ev.set()
                if state.downloading.get(name) is ev:
                    del state.downloading[name]
            self._release(job)

    async def _fetch_into(self, remote: RemoteFile, folder: Path, out: list[FileRecord]) -> None:
        out.append(await fetch(self.client, remote, folder, self.transfers))


def _adoptable(rows: list[TaskRow], model: int, after: int, job_type: str) -> TaskRow | None:
    mine = [r for r in rows if r.model == model and r.job_id > after and r.job_type == job_type]
    return min(mine, key=lambda r: r.job_id) if mine else None

