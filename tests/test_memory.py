"""Knowing gibatch's own task among a model's new rows (`ModelMemory.observe`), on a real
journal: the first new row of its type is its own, unless the listing cannot tell."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest

from gibatch.journal import Journal
from gibatch.memory import UNKNOWN, Expected, ModelMemory, Posting, PostOrder
from gibatch.poller import Poller
from gibatch.site import TaskRow
from gibatch.steps import INTERACT, MERGE, plot

HELD = {"Galaxy 1": "g1", "Galaxy 2": "g2", "Galaxy Merge": "m", "Galaxy Interaction": "i"}


@pytest.fixture
def memory(tmp_path: Path) -> Iterator[ModelMemory]:
    journal = Journal(tmp_path)
    try:
        yield ModelMemory(1, "site", journal, dict(HELD), last_task_id=10, names_known=True)
    finally:
        journal.close()


def row(job_id: int, job_type: str, status: str = "Completed") -> TaskRow:
    return TaskRow(job_id, job_type, 1, status)


def test_the_first_new_row_of_its_type_is_its_own(memory: ModelMemory) -> None:
    own = memory.expect(plot(1), "p1", {"Galaxy Interaction": "i"})
    own.posting = Posting.ACCEPTED
    foreign = memory.observe([row(11, "Galaxy Merge"), row(12, "Plot")])
    assert [r.job_id for r in foreign] == [11]
    assert own.row == row(12, "Plot") and not own.intact  # the merge cleared its input


def test_two_new_rows_of_its_type_and_no_id_take_neither(memory: ModelMemory) -> None:
    own = memory.expect(plot(1), "p1", {"Galaxy Interaction": "i"})
    own.posting = Posting.ACCEPTED
    foreign = memory.observe([row(12, "Plot", "Running"), row(11, "Plot")])  # newest first
    assert [r.job_id for r in foreign] == [11, 12]  # both accounted for as someone's
    assert own.row is not None and not own.intact and own.unknown is not None
    assert memory.held["Plot 1"] == memory.held["Plot 2"] == UNKNOWN
    assert memory.last_task_id == 12


def test_one_new_row_of_its_type_with_an_id_is_never_ambiguous(memory: ModelMemory) -> None:
    own = memory.expect(plot(1), "p1", {"Galaxy Interaction": "i"})
    own.posting, own.job_id = Posting.ACCEPTED, 12
    foreign = memory.observe([row(11, "Plot"), row(12, "Plot")])
    assert [r.job_id for r in foreign] == [11]
    assert own.row == row(12, "Plot") and own.intact and own.section == "Plot 2"
    assert memory.held["Plot 2"] == "p1"


def test_its_row_no_longer_listed_behind_a_newer_one(memory: ModelMemory) -> None:
    """One row per model: the newest is someone's merge; gibatch's interaction (id 11)
    ran before it and is gone from the listing."""
    own = memory.expect(INTERACT, "i2", {"Galaxy Merge": "m"})
    own.posting, own.job_id = Posting.ACCEPTED, 11
    foreign = memory.observe([row(12, MERGE.job_type, "Running")])
    assert [r.job_id for r in foreign] == [12]
    assert own.row is not None and not own.intact and "no longer listed" in (own.unknown or "")
    # its interaction ran (replacing the old one), then the merge cleared it
    assert memory.held == {"Galaxy 1": "g1", "Galaxy 2": "g2", "Galaxy Merge": UNKNOWN}


def test_its_row_running_with_a_newer_one_queued_behind(memory: ModelMemory) -> None:
    own = memory.expect(INTERACT, "i2", {"Galaxy Merge": "m"})
    own.posting, own.job_id = Posting.ACCEPTED, 11
    assert memory.observe([row(11, INTERACT.job_type, "Running"),
                           row(12, MERGE.job_type, "Queued")]) == []
    assert own.row is None and own.listed  # waits for its own row to finish
    memory.observe([row(11, INTERACT.job_type), row(12, MERGE.job_type, "Running")])
    assert own.row == row(11, INTERACT.job_type) and own.intact


# -- gibatch's own tasks on other model numbers bound where its row can be (`PostOrder`)

class _Listing:
    """The task list a poller reads (its client's one call), as the test sets it."""

    def __init__(self) -> None:
        self.rows: list[TaskRow] = []

    async def tasks(self) -> list[TaskRow]:
        return self.rows


def _two_models(tmp_path: Path) -> tuple[Journal, ModelMemory, ModelMemory]:
    journal = Journal(tmp_path)
    posts = PostOrder()
    return journal, *(ModelMemory(m, "site", journal, dict(HELD), last_task_id=10,
                                  names_known=True, posts=posts) for m in (1, 3))


def _plot_then_interaction(m1: ModelMemory, m3: ModelMemory, job_id: int | None = None
                           ) -> tuple[Expected, Expected]:
    """Model 1's plot POST answered (no id), then model 3's interaction posted and
    answered (with `job_id`, if given)."""
    own = m1.expect(plot(1), "p1", {"Galaxy Interaction": "i"})
    m1.sending(own)
    m1.answered(own)
    later = m3.expect(INTERACT, "i2", {"Galaxy Merge": "m"})
    m3.sending(later)
    m3.answered(later, job_id)
    return own, later


def test_a_row_newer_than_a_task_posted_after_the_answer_is_not_own(tmp_path: Path) -> None:
    """Model 1's plot POST had its answer (no id) and the site lost it; model 3 then
    posted its interaction (id 51); a browser plot (52) followed on model 1. 52 is the
    only new plot there, but newer than 51, so not model 1's: seen in one listing, in
    whichever order the models observe it (model 1 registered first here)."""
    journal, m1, m3 = _two_models(tmp_path)
    try:
        listing = _Listing()
        poller = Poller(cast(Any, listing))
        for memory in (m1, m3):
            poller.observe(memory.observe, rank=memory.observe_rank)
        lost, later = _plot_then_interaction(m1, m3)
        listing.rows = [TaskRow(51, "Galaxy Interaction", 3, "Completed"),
                        TaskRow(52, "Plot", 1, "Completed")]
        anyio.run(poller.refresh)
        assert later.job_id == 51 and later.row is not None
        assert lost.job_id is None and lost.row is None and lost.gone is not None
        assert m1.foreign[-1] is not None and m1.held["Plot 1"] == UNKNOWN  # the browser's
        # ... and no later row is its own: its own, had the site kept it, came before 52.
        assert m1.observe([TaskRow(53, "Plot", 1, "Completed")])[0].job_id == 53
    finally:
        journal.close()


def test_the_bound_only_rejects_two_rows_of_its_type_stay_unknown(tmp_path: Path) -> None:
    """Two new plot rows on model 1 (a browser's, 52, and one more, 54) and a task of
    model 3 (53) posted after model 1's answer: the bound rules 54 out, but it never
    makes 52 the only candidate: which is model 1's the listing cannot tell, so its
    result is unknown (a wrong bound must not pick a foreign row)."""
    journal, m1, m3 = _two_models(tmp_path)
    try:
        own, _ = _plot_then_interaction(m1, m3, 53)
        m1.observe([TaskRow(52, "Plot", 1, "Completed"), TaskRow(54, "Plot", 1, "Completed")])
        assert own.job_id is None and own.row is not None and own.unknown is not None
        assert not own.intact
    finally:
        journal.close()


def test_a_post_sent_again_is_bounded_from_its_new_answer_on(tmp_path: Path) -> None:
    """Model 1's POST was refused (not taken) after model 3's task 53, posted since its
    answer, bounded it; posted again, its task (55) is its own."""
    journal, m1, m3 = _two_models(tmp_path)
    try:
        own, _ = _plot_then_interaction(m1, m3, 53)
        assert own.below == 53
        m1.refused(own)
        m1.sending(own)
        m1.answered(own)
        assert m1.observe([TaskRow(55, "Plot", 1, "Completed")]) == [] and own.job_id == 55
    finally:
        journal.close()
