"""The pending jobs of a run or a plan, and which one a free model number takes.

The rule (`holdings.best_job`): the job whose steps the model already holds the most
site time of; ties go to the earliest in queue order. Scanning every pending job at each
pick grows with the square of the sweep (a 4,000-job plan took 105 s). `PendingJobs`
answers the same question from an index, in time that depends on what the model holds,
not on how many jobs wait.

Why a handful of candidates suffice. Index the pending jobs in buckets by a lineage
they need: galaxy 1, galaxy 2, both galaxies, merge, interaction, and the interaction
with the exact tuple of the job's plot lineages. A step's lineage hashes everything
upstream of it, so all members of the merge bucket (say) have the same galaxies and
merge, hence the same match on those against any holdings, and can only differ
further down, where matching adds savings. So every member of a bucket saves at least
as much as a job whose deepest matching bucket it is. Let j* be the best job and B its
deepest bucket among those the holdings point to: the earliest member of B saves at
least as much as j* and is no later, so it is j*. The candidates are therefore the
earliest member of each bucket the holdings point to, plus the earliest job overall;
each is scored exactly as `best_job` would, so the choice is the same (tests compare
both on whole sweeps).

Buckets are heaps with lazy deletion: a job taken is dropped from a heap when it
reaches the top; a job put back gets a new, earlier queue position and is pushed again.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator, Mapping
from typing import Protocol

from gibatch.holdings import saving
from gibatch.jobs import Job
from gibatch.steps import GALAXY1, GALAXY2, INTERACT, MERGE, Stage, section_stage

_Entry = tuple[int, int]  # (queue position, job number)
_Group = tuple[str, str, tuple[str, ...]]  # ("plots", interaction, plot lineages)


class Queue(Protocol):
    """What the planner needs of a queue of pending jobs (benchmarks pass a plain scan)."""

    def __bool__(self) -> bool: ...

    def take_best(self, held: Mapping[str, str], cost: Mapping[Stage, float]) -> Job | None:
        ...


class PendingJobs:
    def __init__(self, jobs: Iterable[Job] = ()) -> None:
        self._jobs: list[Job] = []  # job number -> job
        self._number: dict[str, int] = {}  # job name -> job number
        self._position: dict[int, int] = {}  # pending job number -> queue position
        self._first = 0  # the next position at the front
        self._last = 0  # the next position at the back
        self._buckets: dict[Hashable, list[_Entry]] = defaultdict(list)
        self._groups_of_plot: dict[str, set[_Group]] = defaultdict(set)
        self._all: list[_Entry] = []
        for job in jobs:
            self.append(job)

    def __len__(self) -> int:
        return len(self._position)

    def __bool__(self) -> bool:
        return bool(self._position)

    def __iter__(self) -> Iterator[Job]:
        """The pending jobs in queue order."""
        for _, number in sorted((p, n) for n, p in self._position.items()):
            yield self._jobs[number]

    def append(self, job: Job) -> None:
        """Queue `job` after every pending job."""
        self._queue(job, self._last)
        self._last += 1

    def appendleft(self, job: Job) -> None:
        """Queue `job` before every pending job (a job sent back to be run again)."""
        self._first -= 1
        self._queue(job, self._first)

    def take(self, name: str) -> Job | None:
        """Remove and return the pending job called `name` (None: not pending)."""
        number = self._number.get(name)
        if number is None or self._position.pop(number, None) is None:
            return None
        return self._jobs[number]

    def best(self, held: Mapping[str, str], cost: Mapping[Stage, float]) -> Job | None:
        """The job saving the most on a model holding `held` (left pending)."""
        candidates = {self._earliest(self._all)}
        for key in self._keys_held(held):
            candidates.add(self._earliest(self._buckets.get(key, [])))
        candidates.discard(None)
        if not candidates:
            return None
        best = min((c for c in candidates if c is not None), key=lambda e: (
            -saving(held, self._jobs[e[1]], cost), e[0]))
        return self._jobs[best[1]]

    def take_best(self, held: Mapping[str, str], cost: Mapping[Stage, float]) -> Job | None:
        """Remove and return the job saving the most on a model holding `held`."""
        job = self.best(held, cost)
        return None if job is None else self.take(job.name)

    # -- the index

    def _queue(self, job: Job, position: int) -> None:
        number = self._number.get(job.name)
        if number is None:
            number = self._number[job.name] = len(self._jobs)
            self._jobs.append(job)
        if number in self._position:
            raise ValueError(f"job {job.name} is already pending")
        self._position[number] = position
        entry = (position, number)
        heapq.heappush(self._all, entry)
        for key in _keys_of(job):
            heapq.heappush(self._buckets[key], entry)
        plots = _plot_group(job)
        for lineage in plots[2]:
            self._groups_of_plot[lineage].add(plots)

    def _earliest(self, heap: list[_Entry]) -> _Entry | None:
        while heap and self._position.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)  # taken, or queued again at another position
        return heap[0] if heap else None

    def _keys_held(self, held: Mapping[str, str]) -> Iterator[Hashable]:
        g1, g2 = held.get(GALAXY1.section), held.get(GALAXY2.section)
        if g1 is not None:
            yield ("g1", g1)
        if g2 is not None:
            yield ("g2", g2)
        if g1 is not None and g2 is not None:
            yield ("pair", g1, g2)
        if (merge := held.get(MERGE.section)) is not None:
            yield ("merge", merge)
        interaction = held.get(INTERACT.section)
        if interaction is None:
            return
        yield ("interact", interaction)
        seen: set[_Group] = set()
        for section, lineage in held.items():
            if section_stage(section) is not Stage.PLOT:
                continue
            for group in self._groups_of_plot.get(lineage, ()):
                if group not in seen and group[1] == interaction:
                    seen.add(group)
                    yield group


def _keys_of(job: Job) -> list[Hashable]:
    lineage = job.lineage
    return [("g1", lineage[GALAXY1]), ("g2", lineage[GALAXY2]),
            ("pair", lineage[GALAXY1], lineage[GALAXY2]), ("merge", lineage[MERGE]),
            ("interact", lineage[INTERACT]), _plot_group(job)]


def _plot_group(job: Job) -> _Group:
    plots = tuple(job.lineage[s] for s in job.steps if s.stage is Stage.PLOT)
    return ("plots", job.lineage[INTERACT], plots)


__all__ = ["PendingJobs", "Queue"]
