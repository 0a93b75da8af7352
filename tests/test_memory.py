"""Knowing gibatch's own task among a model's new rows (`ModelMemory.observe`), on a real
journal: the first new row of its type is its own, unless the listing cannot tell."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gibatch.journal import Journal
from gibatch.memory import UNKNOWN, ModelMemory, Posting
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
