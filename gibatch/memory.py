"""What one model number holds, which of its tasks are gibatch's own, and who still reads it.

`ModelMemory` is the one home of three rules:

- **Holdings** (`holdings.py` has the pure site rules): section -> lineage of what
  produced it, kept in the journal so that a later run skips what is already there.
- **Know your own task**: after a POST, gibatch's task is the first new row of the
  right job type on this model after the last task it accounted for (or the job id the
  POST answer gave, when the site gives one). When the listing cannot tell (two new
  rows of that type and no id; its row no longer listed while a newer one is), its
  result is not taken and the step runs again. Every other new row, before, between or
  after gibatch's own, in any listing order, is *foreign*: its effect on the sections
  is applied by the site's rules (a foreign plot appends, a foreign galaxy clears
  merge, interaction and plots) with an unknown lineage, so nothing it touched is ever
  taken for a job's result. A task of a type gibatch does not know voids everything.
  gibatch's own task that ran on top of a foreign result is not the job's result either:
  its section is recorded only if its inputs still held the job's lineages. Job ids
  increase across the whole site, so gibatch's tasks on other model numbers rule rows
  out (`PostOrder`): a row no older than a task gibatch posted after this POST's answer
  is not its own.
- **Readers**: a per-section count of jobs still downloading it. No task that would
  replace or clear a section is submitted while its count is above zero.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import anyio

from gibatch.holdings import FAILED_MARK, after_task, held_section, new_section, section_step
from gibatch.jobs import Job
from gibatch.journal import Journal
from gibatch.site import TaskRow, TaskState
from gibatch.steps import (
    GALAXY1,
    GALAXY2,
    INTERACT,
    MERGE,
    Stage,
    Step,
    plot,
    section_stage,
    survives,
)

UNKNOWN = "?unknown"  # a section whose producer gibatch does not know: never a job's result

_STEP_OF_TYPE: dict[str, Step] = {
    GALAXY1.job_type: GALAXY1, GALAXY2.job_type: GALAXY2, MERGE.job_type: MERGE,
    INTERACT.job_type: INTERACT, "Plot": plot(0),
}


def step_of_type(job_type: str) -> Step | None:
    """The step a listed job type stands for (a plot's number is not in its type)."""
    return _STEP_OF_TYPE.get(job_type.strip())


def inputs_of(job: Job, placed: Mapping[Step, str], step: Step) -> dict[str, str]:
    """The sections `step` reads and the lineage each must hold for `job`."""
    wanted = {Stage.MERGE: (GALAXY1, GALAXY2), Stage.INTERACT: (MERGE,),
              Stage.PLOT: (INTERACT,)}.get(step.stage, ())
    return {placed[s]: job.lineage[s] for s in wanted if s in placed}


class Posting(StrEnum):
    """Where gibatch's POST of its task stands: which new rows may be its own."""

    UNSENT = "unsent"  # nothing of ours can be on the site: every new row is foreign
    SENT = "sent"  # in flight: a matching row may be ours, but is not applied yet
    ACCEPTED = "accepted"  # 200, or found on the site after an ambiguous answer


@dataclass
class Expected:
    """gibatch's own task, posted (or about to be) and not yet accounted for.

    `inputs` maps each section the task reads to the lineage it must hold for the
    result to be the job's; None (a task adopted after a crash) means: intact unless a
    foreign task was seen after `foreign_at`.
    """

    step: Step
    lineage: str
    inputs: dict[str, str] | None
    after_task_id: int
    foreign_at: int
    posting: Posting = Posting.UNSENT
    job_id: int | None = None  # from the POST's answer, or once its row is seen
    listed: bool = False  # its row has been seen on the site
    row: TaskRow | None = None  # its row once it has finished
    section: str | None = None  # where the site put its result
    intact: bool = True  # whether it ran on the job's own inputs
    unknown: str | None = None  # why its result cannot be told (then not intact)
    # Its place among gibatch's POSTs on every model number (`PostOrder`): when its
    # first POST went out and when an answer came, and the id its row must be under.
    sent_at: int | None = None
    answered_at: int | None = None
    below: float = float("inf")
    gone: str | None = None  # why no row can be its own any more (then never pinned)


class PostOrder:
    """gibatch's own POSTs on every model number of a run, in the order they went out
    and were answered, and the ids of those whose rows are known.

    Job ids increase across the whole site. A task posted after another POST had its
    answer was made after that POST's task (if the site took it), so it has the higher
    id: a row of this model at least as new as such a task of any model is not this
    POST's, and its own row, if the site has one, came before (so no later row is its
    own either). Without that, a POST the site lost (or one answered 502 and never
    taken), with a browser's task of the same type started on that model a moment later,
    took the browser's task for gibatch's: the only new row of its type.

    The bound only ever rejects: which row is the task's is still decided by the
    listing alone (`ModelMemory.observe`), and a row the bound rejects is foreign. So a
    row known wrongly (a foreign one taken for another POST's task) can only make a
    task of gibatch's count as foreign, and its step run again; it never brings a row
    into consideration. (The other half, "older than a task answered before this POST
    went out", is not used: when both rows first show in one listing, which is known
    first decides, and a wrong pin there could hide a POST's own row behind a foreign
    one.)
    """

    def __init__(self) -> None:
        self._clock = 0
        self._open: list[Expected] = []  # posted and answered, row not yet known

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def sent(self, own: Expected) -> None:
        """A POST of it is going out. For the bounds it gives, the first one's time
        counts (an earlier attempt may be the one the site took); the bound it takes is
        made again from this attempt's answer on."""
        if own.sent_at is None:
            own.sent_at = self._tick()
        own.answered_at, own.below, own.gone = None, float("inf"), None
        self.closed(own)

    def answered(self, own: Expected, before_run: bool = False) -> None:
        """An answer came (accepted or ambiguous). `before_run`: a task posted by an
        earlier run (an intent adopted after a crash), older than all of this run's."""
        if before_run:
            own.sent_at = 0
        own.answered_at = 0 if before_run else self._tick()
        if own not in self._open:
            self._open.append(own)

    def known(self, own: Expected) -> None:
        """Its row's id is known (`own.job_id`): it bounds the POSTs answered before its
        first went out."""
        job_id = own.job_id
        assert job_id is not None
        self.closed(own)
        if own.sent_at is None:
            return
        for other in self._open:
            if other.answered_at is not None and other.answered_at < own.sent_at:
                other.below = min(other.below, job_id)

    def closed(self, own: Expected) -> None:
        """Its row will not be looked for any more (refused, known, or done with)."""
        self._open = [o for o in self._open if o is not own]

    def rank(self, own: Expected | None) -> int:
        """Observe order within one listing: the latest-sent first, so that a task known
        in this listing bounds the earlier POSTs before their rows are looked at."""
        return 0 if own is None or own.sent_at is None else -own.sent_at


@dataclass
class ModelMemory:
    model: int
    site: str
    journal: Journal
    held: dict[str, str] = field(default_factory=dict)
    last_task_id: int = -1  # every task of this model up to this id is accounted for
    names_known: bool = False  # whether `held` names every section the site shows
    expected: Expected | None = None
    foreign: list[Step | None] = field(default_factory=list)  # in the order seen
    readers: Counter[str] = field(default_factory=Counter)
    readonly: bool = False  # `plan` looks without writing: a run may own the journal
    posts: PostOrder = field(default_factory=PostOrder)  # shared by a run's models
    _released: anyio.Event = field(default_factory=anyio.Event)

    @classmethod
    def load(cls, model: int, site: str, journal: Journal, readonly: bool = False,
             posts: PostOrder | None = None) -> ModelMemory:
        last = journal.last_task_id(site, model)
        return cls(model, site, journal, journal.held(site, model),
                   -1 if last is None else last, names_known=last is not None,
                   readonly=readonly, posts=posts or PostOrder())

    def persist(self) -> None:
        if not self.readonly:
            self.journal.set_held(self.site, self.model, self.held, self.last_task_id)

    # -- what the model holds

    def holds(self, job: Job, step: Step) -> str | None:
        return held_section(self.held, job, step)

    def void(self) -> None:
        """Nothing held is known for sure any more, not even the sections' names."""
        self.held, self.names_known = {}, False
        self.persist()

    def learn_names(self, sections: Iterable[str]) -> None:
        """Take the site's section names (after a void), none of them a known result."""
        self.held = {name: self.held.get(name, UNKNOWN) for name in sections}
        self.names_known = True
        self.persist()

    def unaccounted(self, shown: Iterable[str]) -> list[str]:
        """Plot sections the site shows that no task gibatch accounted for made: a task
        went unseen (a listing of one row per model number, no job id in the POST
        answer). Plots are numbered by how many came before, so none is then known to
        be whose: every plot is forgotten and the names learnt again from the site.
        (Other sections keep their names whatever replaced them: not seen here.)"""
        if not self.names_known:
            return []
        extra = [s for s in shown if s not in self.held and section_stage(s) is Stage.PLOT]
        if extra:
            self.held = {s: (UNKNOWN if section_stage(s) is Stage.PLOT else v)
                         for s, v in self.held.items()}
            self.names_known = False
            self.persist()
        return extra

    def forget(self, section: str) -> None:
        """A result vanished: the section and everything after it are no longer held."""
        try:
            step = section_step(section)
        except ValueError:
            self.void()
            return
        self.held = {s: v for s, v in self.held.items() if s != section and survives(s, step)}
        self.persist()

    # -- own and foreign tasks

    def expect(self, step: Step, lineage: str, inputs: dict[str, str] | None,
               after_task_id: int | None = None) -> Expected:
        """Get ready to post `step` (UNSENT until the caller marks it SENT)."""
        self.expected = Expected(
            step, lineage, inputs,
            self.last_task_id if after_task_id is None else after_task_id, len(self.foreign))
        return self.expected

    def sending(self, own: Expected) -> None:
        """Its POST is going out: a matching row may be its own from now on."""
        own.posting = Posting.SENT
        self.posts.sent(own)

    def answered(self, own: Expected, job_id: int | None = None,
                 before_run: bool = False) -> None:
        """The POST had an answer that may mean its task was taken: a 2xx (with the job
        id it gave, if any), an ambiguous one, or (`before_run`) an intent a crash left."""
        own.posting = Posting.ACCEPTED
        self.posts.answered(own, before_run)
        if job_id is not None and job_id > own.after_task_id:
            own.job_id = job_id
            self.posts.known(own)

    def refused(self, own: Expected, sent: bool = True) -> None:
        """The POST was not accepted (409, 4xx, or not found after an ambiguous answer):
        a row taken for it meanwhile is somebody else's. `sent=False`: it never reached
        the site, so its next attempt is its first (`PostOrder.sent`)."""
        own.posting, own.job_id = Posting.UNSENT, None
        if not sent:
            own.sent_at = None
        self.posts.closed(own)

    def done_expecting(self) -> None:
        """The expected task is accounted for, or given up: no row is looked for."""
        if self.expected is not None:
            self.posts.closed(self.expected)
        self.expected = None

    def observe_rank(self) -> int:
        """Where this model's memory comes in a listing's observers (`PostOrder.rank`)."""
        return self.posts.rank(self.expected)

    def observe(self, rows: Iterable[TaskRow]) -> list[TaskRow]:
        """Account, in id order, for this model's rows newer than the last accounted:
        gibatch's expected task (once finished) and foreign ones. Returns the foreign."""
        new = sorted((r for r in rows if r.model == self.model and r.job_id > self.last_task_id),
                     key=lambda r: r.job_id)
        foreign: list[TaskRow] = []
        for row in new:
            own = self.expected
            if own is not None and own.row is None and own.posting is Posting.ACCEPTED:
                self._unattributable(own, row, new)
            if (own is not None and own.row is None and own.posting is not Posting.UNSENT
                    and self._is_expected(own, row) and not self._ruled_out(own, row)):
                if own.posting is Posting.SENT:
                    # Maybe ours, maybe a task of its type started elsewhere just before:
                    # nothing is pinned until the POST has its answer (an id, or none and
                    # then every new row of its type is looked at together).
                    break
                if own.job_id is None:
                    own.job_id = row.job_id
                    self.posts.known(own)
                own.listed = True
                if row.state is TaskState.ACTIVE:
                    break  # accounted for once it ends
                self._apply_own(own, row)
            else:
                foreign.append(row)
                self._apply_foreign(row)
            self.last_task_id = row.job_id
        if new:
            own = self.expected
            if own is not None and own.unknown is not None and own.job_id is not None:
                self.names_known = False  # see `_unattributable`
            self.persist()
        return foreign

    def _ruled_out(self, own: Expected, row: TaskRow) -> bool:
        """Whether `row`, the one the listing would take for `own`, cannot be it
        (`PostOrder`): then it is foreign, and `own`'s, if any, came before it."""
        if own.job_id is not None or row.job_id < own.below:
            return False
        own.gone = (f"task {row.job_id} is no older than a task gibatch posted after this "
                    "POST's answer")
        self.posts.closed(own)
        return True

    def _is_expected(self, own: Expected, row: TaskRow) -> bool:
        if own.job_id is not None:
            return row.job_id == own.job_id
        return (own.gone is None and row.job_id > own.after_task_id
                and row.job_type.strip() == own.step.job_type)

    def _unattributable(self, own: Expected, row: TaskRow, new: list[TaskRow]) -> None:
        """Close `own` with an unknown result when the listing cannot show which task is
        gibatch's (`row` is the next new row, `new` all of them):

        - its id is known, yet a newer task of this model is listed and its own row is
          not: a listing of one row per model number, whose row moved on when a task
          started elsewhere the moment gibatch's ended. Its row will never show again.
        - its id is unknown (an HTML answer) and two new rows of its type are listed: a
          task of that type started elsewhere just before or after gibatch's POST, and
          either may be gibatch's. (Taking the first took a browser's plot for the job's.)

        Either way its task ran on this model: what it replaced stays replaced, but no
        section is taken for the job's result; the job goes on from the first step the
        model still holds for sure, so the step runs again."""
        if own.job_id is not None:
            if row.job_id <= own.job_id:
                return
            own.unknown = (f"task {own.job_id} is no longer listed; task {row.job_id} "
                           "is newer")
            apply = True
        else:
            alike = [r.job_id for r in new if self._is_expected(own, r)]
            if len(alike) < 2 or row.job_id != alike[0]:
                return
            own.unknown = (f"tasks {alike[0]} and {alike[1]} are both new "
                           f"{own.step.job_type} tasks; the site did not say which is ours")
            apply = False  # both rows are accounted for as foreign
        own.intact, own.section = False, new_section(self.held, own.step)
        if apply:
            # What it replaced, replaced. Its section's name is learnt again from the
            # site once the listing is accounted for (`observe`): had the site lost the
            # task, a plot would be counted that is not there.
            self.held = after_task(self.held, own.step, own.section, UNKNOWN, True)
        own.row = TaskRow(own.job_id or row.job_id, own.step.job_type, self.model,
                          "unknown")

    def _apply_own(self, own: Expected, row: TaskRow) -> None:
        if own.inputs is None:
            intact = len(self.foreign) == own.foreign_at
        else:
            intact = all(self.held.get(s) == lineage for s, lineage in own.inputs.items())
        own.section, own.intact = new_section(self.held, own.step), intact
        completed = row.state is TaskState.COMPLETED
        self.held = after_task(self.held, own.step, own.section,
                               own.lineage if intact else UNKNOWN, completed)
        own.row = row

    def _apply_foreign(self, row: TaskRow) -> None:
        step = step_of_type(row.job_type)
        self.foreign.append(step)
        if step is None or not self.names_known:
            self.held, self.names_known = {}, False
            return
        self.held = after_task(self.held, step, new_section(self.held, step), UNKNOWN,
                               row.state is not TaskState.FAILED)

    def disturbed(self, since: int, sections: Iterable[str]) -> bool:
        """Whether a foreign task seen after the `since`-th may have touched `sections`."""
        names = list(sections)
        return any(step is None or any(not survives(s, step) for s in names)
                   for step in self.foreign[since:])

    # -- readers

    def hold(self, sections: Iterable[str]) -> None:
        self.readers.update(sections)

    def release(self, sections: Iterable[str]) -> None:
        self.readers.subtract(sections)
        self.readers += Counter()  # drop zero counts
        self._released.set()
        self._released = anyio.Event()

    async def wait_readers(self, step: Step) -> None:
        """Until no section that a task of `step` would clear is still being read."""
        while any(not survives(s, step) for s in self.readers):
            await self._released.wait()


__all__ = ["FAILED_MARK", "UNKNOWN", "Expected", "ModelMemory", "PostOrder", "inputs_of",
           "step_of_type"]
