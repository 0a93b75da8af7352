"""A dry run of the scheduler: which job each model number would take, which steps it
would submit or skip, and how long the night would take, without a single POST.

It replays the scheduler's own rules (`holdings.py`) on a simulated clock: each model
number, when free, takes the pending job that lets it skip the most work, and stays busy
for the estimated site time of the steps it must submit.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from gibatch.holdings import Holdings, after_task, held_section, new_section
from gibatch.jobs import Job
from gibatch.pending import PendingJobs, Queue
from gibatch.steps import Stage, Step


@dataclass(frozen=True)
class Assignment:
    job: str
    model: int
    start_s: float
    end_s: float
    run: tuple[Step, ...]
    skipped: tuple[Step, ...]


@dataclass
class Plan:
    assignments: list[Assignment] = field(default_factory=list)
    estimates: dict[Stage, float] = field(default_factory=dict)

    @property
    def tasks(self) -> int:
        return sum(len(a.run) for a in self.assignments)

    @property
    def job_steps(self) -> int:
        return sum(len(a.run) + len(a.skipped) for a in self.assignments)

    @property
    def makespan_s(self) -> float:
        return max((a.end_s for a in self.assignments), default=0.0)

    def by_model(self) -> dict[int, list[Assignment]]:
        out: dict[int, list[Assignment]] = {}
        for a in self.assignments:
            out.setdefault(a.model, []).append(a)
        return out


def make_plan(jobs: Sequence[Job], holdings: Mapping[int, Holdings],
              cost: Mapping[Stage, float],
              queue: Callable[[Sequence[Job]], Queue] = PendingJobs) -> Plan:
    """Assign `jobs` (natural order) to the model numbers of `holdings`.

    Models become free in order of their simulated clock; at equal times the lower
    model number goes first, as the scheduler's workers start in that order.
    """
    plan = Plan(estimates=dict(cost))
    held = {model: dict(h) for model, h in holdings.items()}
    pending = queue(jobs)
    free: list[tuple[float, int]] = [(0.0, model) for model in sorted(held)]
    heapq.heapify(free)
    while pending and free:
        now, model = heapq.heappop(free)
        job = pending.take_best(held[model], cost)
        if job is None:
            break
        run: list[Step] = []
        skipped: list[Step] = []
        for step in job.steps:
            if held_section(held[model], job, step) is not None:
                skipped.append(step)
                continue
            run.append(step)
            held[model] = after_task(held[model], step, new_section(held[model], step),
                                     job.lineage[step], completed=True)
        end = now + sum(cost[step.stage] for step in run)
        plan.assignments.append(Assignment(job.name, model, now, end, tuple(run), tuple(skipped)))
        heapq.heappush(free, (end, model))
    return plan
