"""Where a sweep stands, read from its journal and its completion records only.

Safe while a run is going on (SQLite WAL lets readers in beside the writer), and from
any terminal: what is done is what the completion records say, what is running is
what the journal's live processes last said.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from enum import StrEnum

from gibatch import record
from gibatch.jobs import Sweep
from gibatch.journal import Event, EventRow, Journal


class JobState(StrEnum):
    COMPLETE = "complete"
    RUNNING = "running"
    FAILED = "failed"
    PENDING = "pending"
    INVALID = "invalid"


@dataclass(frozen=True)
class JobStatus:
    name: str
    state: JobState
    model: int | None = None
    step: str | None = None
    reason: str | None = None
    # A complete job's `record.Completion.signature`: the report's plots remembered by.
    proof: str | None = field(default=None, compare=False)


@dataclass
class SweepStatus:
    jobs: list[JobStatus]
    live_pids: list[int]
    run_started: float | None
    run_ended: float | None
    done_this_run: int  # jobs completed since the live run started; 0 without one (ETA)
    last_events: list[EventRow] = field(default_factory=list)

    def count(self, state: JobState) -> int:
        return sum(1 for j in self.jobs if j.state is state)

    @property
    def elapsed_s(self) -> float | None:
        if self.run_started is None:
            return None
        return (self.run_ended or time.time()) - self.run_started

    @property
    def eta_s(self) -> float | None:
        """Remaining jobs at the rate this run has finished them; None before the first."""
        if not self.live_pids or self.elapsed_s is None:
            return None
        remaining = self.count(JobState.PENDING) + self.count(JobState.RUNNING)
        return eta_s(self.done_this_run, remaining, self.elapsed_s)


def eta_s(done: int, remaining: int, elapsed_s: float) -> float | None:
    """Seconds left if the remaining jobs go at the rate of those done so far."""
    if remaining == 0:
        return 0.0
    if done == 0:
        return None
    return elapsed_s / done * remaining


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_ACTIVE = {Event.JOB_START, Event.STEP_SKIPPED, Event.STEP_SUBMITTED, Event.STEP_ADOPTED,
           Event.STEP_COMPLETED}


def sweep_status(sweep: Sweep, journal: Journal, recent: int = 10) -> SweepStatus:
    """Join the journal's events with the completion records on disk.

    At 100,000 jobs the journal holds about a million events: only the runs' starts
    and ends, each job's last event when it says running or failed, and the last
    `recent` events are read; completion records come through `record.completions`.
    """
    runs: dict[int, tuple[float, float | None]] = {}  # pid -> (start, end) of its last run
    for e in journal.run_events():
        if e.event == Event.RUN_START:
            runs[e.pid] = (e.at, None)
        elif e.pid in runs:
            runs[e.pid] = (runs[e.pid][0], e.at)
    live = sorted(pid for pid, (_, end) in runs.items() if end is None and pid_alive(pid))
    current = [runs[p] for p in live] or ([max(runs.values())] if runs else [])
    started = min((s for s, _ in current), default=None)
    ended = None if live else max((e for _, e in current if e is not None), default=None)
    # Without a live run nothing is running and no ETA is shown: only failures are
    # asked for, and no completion is counted (two fewer passes over the events).
    done_this_run = (0 if started is None or not live
                     else journal.count_events(Event.JOB_COMPLETE, since=started))
    last = (journal.last_job_events(_ACTIVE | {Event.JOB_FAILED}) if live
            else journal.last_failures())
    complete = record.completions(sweep.root, sweep.jobs)

    jobs: list[JobStatus] = []
    for job in sweep.jobs:
        ev = last.get(job.name)
        if (done := complete.get(job.name)) is not None:
            jobs.append(JobStatus(job.name, JobState.COMPLETE, done.model, proof=done.signature))
        elif ev is not None and ev.event in _ACTIVE and ev.pid in live:
            jobs.append(JobStatus(job.name, JobState.RUNNING, ev.model, ev.step))
        elif ev is not None and ev.event == Event.JOB_FAILED:
            jobs.append(JobStatus(job.name, JobState.FAILED, ev.model, reason=ev.detail))
        else:
            jobs.append(JobStatus(job.name, JobState.PENDING))
    jobs.extend(JobStatus(name, JobState.INVALID, reason=reason)
                for name, reason in sweep.reasons().items())
    return SweepStatus(jobs, live, started, ended, done_this_run,
                       journal.events(limit=recent) if recent > 0 else [])
