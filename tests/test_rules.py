"""Fast tests of the pure rules: reading pages in every variation of protocol section 3,
local file names, telling our own task from foreign ones, and locks that release."""

from __future__ import annotations

from pathlib import Path

import pytest

from gibatch import steps
from gibatch.jobs import load_job
from gibatch.journal import Journal
from gibatch.memory import UNKNOWN, ModelMemory, Posting
from gibatch.poller import next_interval
from gibatch.site import RemoteFile, TaskRow, TaskState, parse_sections, parse_task_rows
from gibatch.slots import JobClaim, ModelLock
from gibatch.transfer import local_files, safe_name
from tests.conftest import tiny_job_files, write_job

HEAD = "<table><thead><tr><th>ID</th><th>Job Type</th><th>Model</th><th>Status</th>{extra}</tr>"


def jobs_page(rows: list[tuple[int, str, int, str]], extra: str = "", tbody: bool = True) -> str:
    body = "".join(f"<tr><td>{i}</td><td>{t}</td><td>{m}</td><td>{s}</td>{extra}</tr>"
                   for i, t, m, s in rows)
    head = HEAD.format(extra="<th>More</th>" if extra else "") + "</thead>"
    return head + (f"<tbody>{body}</tbody>" if tbody else body) + "</table>"


ROWS = [(3, "Galaxy 1", 1, "Completed"), (4, "Galaxy 2", 1, "Pending"), (5, "Plot", 2, "Error")]


@pytest.mark.parametrize("order", [ROWS, ROWS[::-1]], ids=["oldest-first", "newest-first"])
@pytest.mark.parametrize("extra", ["", "<td>2026-01-01</td>"], ids=["4-cols", "extra-col"])
@pytest.mark.parametrize("tbody", [True, False])
def test_task_rows_in_every_variation(order: list[tuple[int, str, int, str]], extra: str,
                                      tbody: bool) -> None:
    rows = parse_task_rows("<html><p>x</p>" + jobs_page(order, extra, tbody) + "</html>")
    assert [(r.job_id, r.job_type, r.model) for r in rows] == [(3, "Galaxy 1", 1),
                                                              (4, "Galaxy 2", 1), (5, "Plot", 2)]
    assert [r.state for r in rows] == [TaskState.COMPLETED, TaskState.ACTIVE, TaskState.FAILED]


def test_sections_with_and_without_status_and_sizes() -> None:
    page = ("<h3>Galaxy 1 - Status: Completed</h3><table><tr><td><a href='/b/media/g.h5'>g.h5"
            "</a></td><td>120</td></tr></table><h3>Plot 1</h3><table><tr><td>"
            "<a href='https://files.example/x/..%2f'>../../etc/passwd</a></td></tr></table>")
    sections = parse_sections(page, "http://127.0.0.1:9/b/gi/view_data/1/")
    assert [(s.name, s.status) for s in sections] == [("Galaxy 1", "Completed"), ("Plot 1", None)]
    assert sections[0].files[0].url == "http://127.0.0.1:9/b/media/g.h5"
    assert sections[0].files[0].size == 120 and sections[1].files[0].size is None
    assert sections[1].state is TaskState.COMPLETED


@pytest.mark.parametrize(("remote", "local"), [
    ("_output_Movie: lastmovie.gif", "_output_Movie: lastmovie.gif"),
    ("naïve (1).png", "naïve (1).png"),
    ("../../etc/passwd", "_._.._etc_passwd"),
    ("..", "_."), (".", "_"), (".hidden", "_hidden"), ("a\\b", "a_b"),
    ("nul\x00and\nnewline", "nul_and_newline"), ("x.part", "x.part_"), ("", "file_"),
])
def test_safe_name_keeps_what_cannot_escape_or_hide(remote: str, local: str) -> None:
    assert safe_name(remote) == local


def test_colliding_names_get_distinct_local_names() -> None:
    names = [local for _, local in local_files(
        RemoteFile(name, "", None) for name in ["a/b.png", "a_b.png", "A_B.png", "c"])]
    assert names == ["a_b.png", "a_b~2.png", "A_B~3.png", "c"]


def test_poll_interval_keeps_a_relative_precision() -> None:
    # Before 0.6 of the floor the task cannot have ended: one wait up to that point.
    assert next_interval(0.0, 10.0) == pytest.approx(6.0)
    assert next_interval(5.0, 10.0) == pytest.approx(1.0)
    # Then a poll every 3% of the task's age, so its end goes unnoticed at most 3% of
    # its duration, whatever that is; never more often than 20 a second, never rarer
    # than every 10 s.
    assert next_interval(9.0, 10.0) == pytest.approx(0.27)
    assert next_interval(100.0, 10.0) == pytest.approx(3.0)
    assert next_interval(0.2, 0.0) == pytest.approx(0.05)
    assert next_interval(3600.0, 0.0) == 10.0

    def polls(duration: float, floor: float) -> int:
        t, n = 0.0, 0
        while t < duration:
            t += next_interval(t, floor)
            n += 1
        return n

    # Polls per task grow with log(duration) (a fixed 0.1 s would make 240 of them for
    # a minute's task), and long tasks are polled no more often than every 10 s, the
    # old course script's rate.
    assert polls(1.0, 1.0) <= 10 and polls(60.0, 60.0) <= 25
    assert polls(3600.0, 3600.0) <= 3600 / 10 + 1


def row(job_id: int, job_type: str, status: str = "Completed", model: int = 1) -> TaskRow:
    return TaskRow(job_id, job_type, model, status)


@pytest.fixture
def memory(tmp_path: Path) -> ModelMemory:
    journal = Journal(tmp_path)
    mem = ModelMemory(1, "site", journal, last_task_id=10, names_known=True)
    return mem


def test_foreign_task_before_ours_undermines_our_merge(memory: ModelMemory,
                                                       tmp_path: Path) -> None:
    write_job(tmp_path / "jobs", "j", tiny_job_files())
    job = load_job(tmp_path / "jobs" / "j")
    memory.held = {"Galaxy 1": job.lineage[steps.GALAXY1], "Galaxy 2": job.lineage[steps.GALAXY2]}
    placed = {steps.GALAXY1: "Galaxy 1", steps.GALAXY2: "Galaxy 2"}
    own = memory.expect(steps.MERGE, job.lineage[steps.MERGE],
                        {"Galaxy 1": job.lineage[steps.GALAXY1],
                         "Galaxy 2": job.lineage[steps.GALAXY2]})
    own.posting = Posting.ACCEPTED
    del placed
    # Newest first, a browser galaxy 1 (11) ran before our merge (12).
    foreign = memory.observe([row(12, "Galaxy Merge"), row(11, "Galaxy 1")])
    assert [r.job_id for r in foreign] == [11]
    assert own.job_id == 12 and own.row is not None and not own.intact
    assert memory.held["Galaxy 1"] == UNKNOWN and memory.held["Galaxy Merge"] == UNKNOWN
    assert memory.holds(job, steps.GALAXY2) == "Galaxy 2"  # untouched: still held for sure


def test_same_type_row_is_ours_only_once_posted(memory: ModelMemory) -> None:
    own = memory.expect(steps.plot(1), "L", {})
    assert memory.observe([row(11, "Plot", "Running")]) == [row(11, "Plot", "Running")]
    own.posting = Posting.SENT  # in flight: a matching row is neither taken nor pinned
    assert memory.observe([row(12, "Plot", "Completed")]) == []
    assert own.job_id is None and own.row is None
    memory.refused(own)  # 409 after all: row 12 was somebody else's
    assert [r.job_id for r in memory.observe([row(12, "Plot")])] == [12]
    assert own.row is None
    # Plot numbering follows every plot the site made: ours comes third.
    own.posting = Posting.ACCEPTED
    memory.observe([row(13, "Plot")])
    assert own.section == "Plot 3" and memory.held["Plot 3"] == "L"


def test_unknown_task_type_voids_everything(memory: ModelMemory) -> None:
    memory.held = {"Galaxy 1": "a"}
    memory.observe([row(11, "Something New")])
    assert memory.held == {} and not memory.names_known
    assert memory.last_task_id == 11


def test_locks_release_for_real_within_one_process(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setenv("GIBATCH_LOCK_DIR", str(tmp_path / "locks"))
    for _ in range(2):
        locks = [ModelLock("site", m, tmp_path) for m in (1, 2)]
        got: list[bool] = []

        def take(lock: ModelLock, into: list[bool] = got) -> None:
            into.append(lock.acquire())

        threads = [threading.Thread(target=take, args=(lk,)) for lk in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [True, True]
        assert not ModelLock("site", 1, tmp_path).acquire()  # held: refused
        for lk in locks:
            lk.release()  # on another thread than the one that acquired it
        again = ModelLock("site", 1, tmp_path)
        assert again.acquire()
        again.release()
    claim = JobClaim(tmp_path, "j")
    assert claim.acquire()
    claim.release()
    assert JobClaim(tmp_path, "j").acquire()
