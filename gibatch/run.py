"""The scheduler: one worker per model number, all owned by one task group.

Each worker holds its model number's OS lock, takes the pending job that lets it skip
the most work (affinity), runs the job's steps (`worker.py`) and hands the listed
sections to a finisher that downloads them and writes the completion record, while
the worker starts the next job; a task that would clear a section still being read
waits for its readers (`memory.py`).

Every job has one error boundary (`_settle`): whatever ends an attempt, grouped in an
`ExceptionGroup` or not, becomes that job's outcome. A result that vanished sends the
job back to the queue (a few times); a task that holds its model number past the
limit (`ModelStuck`) sets that model aside and sends the job to another; a full disk
stops the run; a bug fails the job with its traceback in the log and the journal; the
run goes on. Only cancellation (Ctrl-C past the grace period) passes through, and every
job still gets an outcome.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from gibatch import record
from gibatch.errors import (
    DiskFull,
    GibatchError,
    ModelStuck,
    NoModelAvailable,
    ResultVanished,
    leaves,
)
from gibatch.holdings import saving
from gibatch.jobs import Job, Sweep
from gibatch.journal import Event, Journal
from gibatch.memory import ModelMemory, PostOrder
from gibatch.pending import PendingJobs
from gibatch.poller import Poller
from gibatch.site import RemoteFile, Section, SiteClient, TaskState
from gibatch.slots import JobClaim, ModelLock
from gibatch.steps import Stage, Step
from gibatch.transfer import FileRecord, fetch, local_files
from gibatch.worker import Counts, Durations, Interrupted, Listed, ModelWorker

log = logging.getLogger("gibatch")

DEFAULT_GRACE_S = 30.0
MAX_VANISHED = 3  # times a job's results may vanish unexplained before it fails
# ... and times other people's tasks (or the site losing the job's) may undo it
MAX_UNDONE_ELSEWHERE = 8
EXPLAIN_S = 10.0  # the most a finisher waits for the task list that may explain a 404


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
class Summary:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    models_used: list[int] = field(default_factory=list)
    models_refused: dict[int, str] = field(default_factory=dict)
    requests: dict[str, int] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    ended: float = 0.0

    @property
    def tasks_submitted(self) -> int:
        return self.counts.tasks_submitted

    @property
    def steps_skipped(self) -> int:
        return self.counts.steps_skipped

    @property
    def dispatch_delays_s(self) -> list[float]:
        return self.counts.dispatch_delays_s

    def count(self, outcome: Outcome) -> int:
        return sum(1 for o in self.outcomes.values() if o is outcome)

    @property
    def exit_code(self) -> int:
        if not self.models_used and self.models_refused:
            return 3
        bad = (Outcome.FAILED, Outcome.INVALID, Outcome.NOT_RUN)
        return 1 if any(o in bad for o in self.outcomes.values()) else 0


Listener = Callable[[str, dict[str, object]], None]


@dataclass
class _Early:
    """A job's interaction section downloaded while its plots run (see `_start_early`)."""

    model: int
    folder: str
    mark: int  # foreign tasks seen on the model when it was listed
    section: Section | None = None
    files: list[FileRecord] | None = None  # None: not (yet) whole
    done: anyio.Event = field(default_factory=anyio.Event)


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
        self.posts = PostOrder()  # gibatch's POSTs on all its model numbers, in order
        self.summary = Summary()
        self.durations = Durations(journal)
        self.pending = PendingJobs()
        self.reserved: dict[int, Job] = {}  # model -> a job already its own at the start
        self.early: dict[str, _Early] = {}  # job -> its section downloaded ahead
        self._tg: TaskGroup | None = None
        self.claims: dict[str, JobClaim] = {}
        self.vanished: dict[str, int] = {}
        self.undone: dict[str, int] = {}  # vanishings someone else's task explains
        self.finishing: set[str] = set()  # jobs whose downloads are under way
        # Jobs a worker is running: one may come back (its model set aside, `ModelStuck`).
        self.running: set[str] = set()
        # Workers still squaring their model with the site (`reconcile`), which may wait
        # on a task (an adopted one, or one started elsewhere) up to `stuck_after_s`.
        self.settling: dict[int, anyio.CancelScope] = {}
        self.transfers = anyio.Semaphore(max(1, options.concurrency))
        self.stopping = False
        self._listener = listener
        self._changed = anyio.Event()  # the queue or the set of finishers changed
        self.open = False  # idle workers wait for `add` until `close` (see hold_open)

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

    # -- jobs that arrive while it runs (an adaptive search writes them one by one)

    def hold_open(self) -> None:
        """Before `execute`: keep the run going, idle workers waiting, until `close`."""
        self.open = True

    def add(self, job: Job) -> None:
        """Queue a job while the run goes on (or before `execute`, which queues only the
        sweep's own jobs); an idle worker takes it at once.

        Only jobs added before `execute` take part in its start-of-run reservation
        (`_reserve_own`): add a job a crash may have left on a model number first."""
        self.pending.append(job)
        self._notify()

    def close(self) -> None:
        """No more `add`: workers end when the queue and the finishers are done."""
        self.open = False
        self._notify()

    # -- entry point

    async def execute(self) -> Summary:
        """Run every job of the sweep; returns what became of each."""
        for problem_job, reason in self.sweep.reasons().items():
            self.summary.outcomes[problem_job] = Outcome.INVALID
            self.summary.reasons[problem_job] = reason
        done = record.whole(self.sweep.root, self.sweep.jobs)  # as is_complete, remembered
        for job in self.sweep.jobs:
            if job.name in done:
                self.summary.outcomes[job.name] = Outcome.ALREADY_COMPLETE
            else:
                self.pending.append(job)
        workers = await self._lock_models()
        self._reserve_own(workers)
        if not workers:
            self.summary.ended = time.monotonic()
            raise NoModelAvailable("every requested model number is held by another gibatch: "
                                   + "; ".join(f"model {m}: {why}" for m, why in
                                               self.summary.models_refused.items()))
        to_run = len(self.pending) + len(self.reserved)
        self.emit(Event.RUN_START, detail=f"{to_run} jobs to run",
                  jobs=to_run, models=[w.model for w in workers])
        try:
            if to_run or self.open:
                await self.client.login()
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self.poller.run)
                    outer.start_soon(self._watch_signals, outer)
                    async with anyio.create_task_group() as tg:
                        self._tg = tg
                        for worker in workers:
                            worker.on_ready = partial(self._start_early, worker)
                            tg.start_soon(self._work, worker, tg)
                    outer.cancel_scope.cancel()
        finally:
            for worker in workers:
                worker.lock.release()
            for claim in self.claims.values():
                claim.release()
            for job in self.sweep.jobs:
                self.summary.outcomes.setdefault(job.name, Outcome.NOT_RUN)
            self.summary.ended = time.monotonic()
            self.summary.requests = dict(self.client.requests)
            self.emit(Event.RUN_END, detail=self._summary_line())
        return self.summary

    def _reserve_own(self, workers: list[ModelWorker]) -> None:
        """Before any worker picks, give each model the job that is already its own:
        the one whose task a crash left on it (it adopts the task when it reconciles),
        else its best job if it holds more of it than any other model does (a crash cut
        that job's later steps or its downloads). A model that reconciled sooner must
        not take such a job and run its tasks again.
        """
        cost = self.durations.estimates
        for worker in workers:
            intent = self.journal.intent(self.site, worker.model)
            job = self.pending.take(intent.job) if intent is not None else None
            best = None if job is not None else self.pending.best(worker.memory.held, cost)
            if best is not None:
                here = saving(worker.memory.held, best, cost)
                if here > 0 and all(here > saving(other.memory.held, best, cost)
                                    for other in workers if other is not worker):
                    job = self.pending.take(best.name)
            if job is not None:
                self.reserved[worker.model] = job

    def _summary_line(self) -> str:
        s = self.summary
        return ", ".join(f"{o.value}: {s.count(o)}" for o in Outcome if s.count(o))

    async def _lock_models(self) -> list[ModelWorker]:
        workers = []
        for model in self.options.models:
            lock = ModelLock(self.site, model, self.options.jobs_dir)
            if await anyio.to_thread.run_sync(lock.acquire):
                memory = ModelMemory.load(model, self.site, self.journal, posts=self.posts)
                workers.append(ModelWorker(self.client, self.poller, memory, lock,
                                           self.durations, self.summary.counts, self.emit,
                                           lambda: self.stopping))
                self.summary.models_used.append(model)
            else:
                holder = lock.holder()
                why = f"held by another gibatch ({holder})" if holder else "held by another gibatch"
                self.summary.models_refused[model] = why
                log.warning("model %d is %s; going on without it", model, why)
        return workers

    async def _watch_signals(self, outer: TaskGroup) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.stopping:
                    log.warning("second signal: stopping now")
                    outer.cancel_scope.cancel()
                    return
                self._stop(f"{signal.Signals(signum).name}: no new tasks; finishing what is "
                           f"in flight (grace {self.options.grace_s:.0f} s)")
                outer.start_soon(self._grace_then_cancel, outer)

    def _stop(self, why: str) -> None:
        self.stopping = True
        log.warning("%s", why)
        self._notify()

    async def _grace_then_cancel(self, outer: TaskGroup) -> None:
        await anyio.sleep(self.options.grace_s)
        log.warning("grace period over: cancelling what is left")
        outer.cancel_scope.cancel()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- one model number

    async def _work(self, worker: ModelWorker, tg: TaskGroup) -> None:
        with anyio.CancelScope() as settling:
            self.settling[worker.model] = settling
            try:
                await worker.reconcile()
            except BaseException as exc:  # the model cannot be used: its jobs go elsewhere
                self._model_lost(worker, exc)
                return
            finally:
                del self.settling[worker.model]
                self._notify()
        if settling.cancelled_caught:
            why = "still busy with a task when every job was done"
            log.warning("model %d %s", worker.model, why)
            self.summary.models_refused[worker.model] = why
            return
        while not self.stopping:
            job = self._pick(worker)
            if job is None:
                if self.finishing or self.running or self.reserved or self.open:
                    # A finisher or worker may yet send a job back; a model still settling
                    # may give up its reserved job (`_model_lost`).
                    await self._changed.wait()
                    continue
                for scope in self.settling.values():  # waiting on a task, with nothing to do
                    scope.cancel()
                return
            self.running.add(job.name)
            try:
                listed = await worker.run_job(job)
            except BaseException as exc:
                self._settle(job, worker.model, exc)
                if any(isinstance(e, ModelStuck) for e in leaves(exc)):
                    self._model_lost(worker, exc)
                    return
                continue
            finally:
                self.running.discard(job.name)
                self._notify()
            names = [s.name for s in listed.chosen.values()]
            worker.memory.hold(names)
            self.finishing.add(job.name)
            tg.start_soon(self._finish, worker, job, listed, names)

    def _model_lost(self, worker: ModelWorker, exc: BaseException) -> None:
        if any(isinstance(e, anyio.get_cancelled_exc_class()) for e in leaves(exc)):
            raise exc
        log.error("model %d cannot be used: %s", worker.model, _describe(exc))
        self.summary.models_refused[worker.model] = _describe(exc)
        job = self.reserved.pop(worker.model, None)
        if job is not None:  # its task stays where it is; another model runs the job
            self.pending.appendleft(job)
            self._notify()

    def _pick(self, worker: ModelWorker) -> Job | None:
        """Claim the job reserved for this model at the start (`_reserve_own`), else the
        pending job with the most work already done here (ties: natural order).

        Choosing and claiming happen without an await in between, so two workers of
        this process never take one job; the claim's non-blocking flock keeps other
        processes off it.
        """
        while (job := self.reserved.pop(worker.model, None)
               or self.pending.take_best(worker.memory.held,
                                         self.durations.estimates)) is not None:
            if job.name not in self.claims:
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

    def _release(self, job: Job) -> None:
        claim = self.claims.pop(job.name, None)
        if claim:
            claim.release()

    # -- the end of a job attempt

    def _settle(self, job: Job, model: int, exc: BaseException) -> None:
        """The one boundary of a job attempt: turn whatever ended it into its outcome.

        Cancellation is re-raised (after recording the job as not run); everything
        else stays here.
        """
        found = leaves(exc)
        if any(not isinstance(e, Exception) for e in found):  # cancelled, KeyboardInterrupt
            self._end(job, model, Outcome.NOT_RUN, "interrupted; the next run goes on")
            raise exc
        bugs = [e for e in found if not isinstance(e, GibatchError)]
        if bugs:
            trace = "".join(traceback.format_exception(bugs[0]))
            log.error("internal error in job %s", job.name, exc_info=bugs[0])
            self._end(job, model, Outcome.FAILED, f"internal error: {bugs[0]!r}\n{trace}")
            return
        full = next((e for e in found if isinstance(e, DiskFull)), None)
        if full is not None:
            self._end(job, model, Outcome.FAILED, str(full))
            self._stop(f"{full}: stopping the run (nothing more can be saved)")
            return
        stop = next((e for e in found if isinstance(e, Interrupted)), None)
        if stop is not None:
            self._end(job, model, Outcome.NOT_RUN, str(stop))
            return
        stuck = next((e for e in found if isinstance(e, ModelStuck)), None)
        if stuck is not None and not self.stopping:  # the model is set aside (`_work`)
            self.emit(Event.JOB_REQUEUED, job.name, model,
                      detail=f"{stuck}; the job goes to another model number")
            self.pending.appendleft(job)
            self._notify()
            return
        gone = next((e for e in found if isinstance(e, ResultVanished)), None)
        if gone is not None and all(isinstance(e, ResultVanished) for e in found):
            elsewhere = all(e.elsewhere for e in found if isinstance(e, ResultVanished))
            counts, most = ((self.undone, MAX_UNDONE_ELSEWHERE) if elsewhere
                            else (self.vanished, MAX_VANISHED))
            counts[job.name] = counts.get(job.name, 0) + 1
            if counts[job.name] <= most and not self.stopping:
                self.emit(Event.JOB_REQUEUED, job.name, model,
                          detail=f"{gone}; running what is missing again")
                self.pending.appendleft(job)
                self._notify()
                return
            why = "tasks started elsewhere kept undoing it" if elsewhere else \
                "results kept vanishing"
            self._end(job, model, Outcome.FAILED,
                      f"{why} ({counts[job.name]} times); last: {gone}")
            return
        self._end(job, model, Outcome.FAILED, "; ".join(_describe(e) for e in found))

    def _end(self, job: Job, model: int, outcome: Outcome, reason: str) -> None:
        self.summary.outcomes[job.name] = outcome
        self.summary.reasons[job.name] = reason
        event = Event.JOB_INTERRUPTED if outcome is Outcome.NOT_RUN else Event.JOB_FAILED
        self.emit(event, job.name, model, detail=reason)
        self._release(job)

    # -- downloading a job's interaction while its plots run

    def _start_early(self, worker: ModelWorker, job: Job, step: Step, name: str) -> None:
        """The model holds `job`'s interaction and plots come next: download it now,
        so that the next interaction on this model waits for less (`_finish` reuses it
        when the job's final listing names the very same files). Held against clearing
        from now on; one at a time per job."""
        if step.stage is not Stage.INTERACT or step == job.steps[-1] or self._tg is None:
            return
        running = self.early.get(job.name)
        if running is not None and not running.done.is_set():
            return
        early = self.early[job.name] = _Early(worker.model, step.section,
                                              len(worker.memory.foreign))
        worker.memory.hold([name])
        self._tg.start_soon(self._download_early, worker, job, name, early)

    async def _download_early(self, worker: ModelWorker, job: Job, name: str,
                              early: _Early) -> None:
        try:
            found = next((s for s in await self.client.sections(worker.model)
                          if s.name == name), None)
            if (found is not None and found.state is TaskState.COMPLETED
                    and not worker.memory.disturbed(early.mark, [name])):
                early.section = found
                files = await self._download(job, {early.folder: found})
                early.files = files[early.folder]
        except Exception as exc:  # an optimisation only: the finisher fetches it anyway
            log.info("job %s: %s not downloaded ahead (%s); it will be with the rest",
                     job.name, name, _describe(exc))
        finally:
            early.done.set()
            worker.memory.release([name])

    async def _reuse_early(self, worker: ModelWorker, job: Job, chosen: dict[str, Section]
                           ) -> dict[str, list[FileRecord]]:
        """The folders of `chosen` already downloaded ahead, removed from `chosen`: only
        if the final listing names the same files on the same model and no foreign task
        may have touched them since they were listed. Waits for one still under way
        (never two downloads into one folder)."""
        early = self.early.get(job.name)
        if early is None:
            return {}
        await early.done.wait()
        section = chosen.get(early.folder)
        if (section is None or early.files is None or early.model != worker.model
                or early.section != section
                or worker.memory.disturbed(early.mark, [section.name])):
            return {}
        del chosen[early.folder]
        return {early.folder: early.files}

    async def _finish(self, worker: ModelWorker, job: Job, listed: Listed,
                      names: list[str]) -> None:
        # Every section stays held until the record is written: released as each was
        # saved, the model's next task could clear one before the record, and a crash
        # in between left the job without its record or its results on the site (it
        # ran again).
        reading = set(names)
        try:
            chosen = dict(listed.chosen)
            ahead = await self._reuse_early(worker, job, chosen)
            files = {**await self._download(job, chosen), **ahead}
            await self.poller.refresh()  # files of a section replaced meanwhile are not its
            if worker.memory.disturbed(listed.foreign_mark, names):
                for name in names:
                    worker.memory.forget(name)
                raise ResultVanished("a task started elsewhere replaced results while they "
                                     "downloaded", job=job.name, model=worker.model,
                                     elsewhere=True)
            # No await from here on: the record is written whole or not at all.
            record.prune(job, {k: {f.name for f in v} for k, v in files.items()})
            record.write(job, files, self.site, worker.model, listed.started)
            self.summary.outcomes[job.name] = Outcome.COMPLETE
            self.summary.reasons.pop(job.name, None)
            n = sum(len(v) for v in files.values())
            self.emit(Event.JOB_COMPLETE, job.name, worker.model,
                      detail=f"{n} files in {time.time() - listed.started:.1f} s")
            self._release(job)
        except BaseException as exc:
            found = leaves(exc)
            for e in found:
                if isinstance(e, ResultVanished) and e.section:
                    worker.memory.forget(e.section)
            if all(isinstance(e, ResultVanished) and not e.elsewhere for e in found):
                await self._explain(worker, listed, names, found)
            self._settle(job, worker.model, exc)
        finally:
            worker.memory.release(reading)
            self.finishing.discard(job.name)
            early = self.early.get(job.name)
            if early is not None and early.done.is_set():
                del self.early[job.name]
            self._notify()

    async def _explain(self, worker: ModelWorker, listed: Listed, names: list[str],
                       vanished: list[BaseException]) -> None:
        """A file that answered 404: mark it `elsewhere` if a task started elsewhere
        since the listing may have replaced it (a poll now shows what the last did not).
        """
        # Bounded, and shielded so that a cancel arriving meanwhile does not skip the job's
        # boundary: a site that does not answer now leaves the 404 unexplained.
        with anyio.move_on_after(EXPLAIN_S, shield=True), contextlib.suppress(Exception):
            await self.poller.refresh()
        if worker.memory.disturbed(listed.foreign_mark, names):
            for e in vanished:
                if isinstance(e, ResultVanished):
                    e.elsewhere = True

    async def _download(self, job: Job, chosen: dict[str, Section]
                        ) -> dict[str, list[FileRecord]]:
        """Every file of every chosen section, concurrently (bounded by `transfers`),
        the latest stage first. A foreign task replacing one meanwhile is caught by the
        caller's check."""
        record.real_folders(job, chosen)
        files: dict[str, list[FileRecord]] = {}

        async def one(folder: str, section: Section, remote: RemoteFile, local: str) -> None:
            try:
                got = await fetch(self.client, remote, job.output / folder, self.transfers,
                                  local)
            except ResultVanished as exc:
                raise ResultVanished(f"{section.name}/{remote.name}: {exc}",
                                     section=section.name, job=job.name) from exc
            files[folder].append(got)

        async with anyio.create_task_group() as tg:
            for folder, section in reversed(chosen.items()):  # chain order: plots last
                files[folder] = []
                for remote, local in local_files(section.files):  # a name twice: two files
                    tg.start_soon(one, folder, section, remote, local)
        return files


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, GibatchError) else f"{type(exc).__name__}: {exc}"
