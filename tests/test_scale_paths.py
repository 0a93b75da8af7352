"""The paths that keep `status`, `plan` and `report` fast at 100,000 jobs give the same
answers as the plain ones: completion records remembered in the journal's database,
the journal queried for what status needs, the report's rows as compact JSON."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from gibatch import discovery, record, report, steps
from gibatch.discovery import load_sweep
from gibatch.jobs import Job, Sweep
from gibatch.journal import Event, Journal
from gibatch.report import Variation, build_report, contact_sheet, flatten
from gibatch.run import Outcome
from gibatch.sim.server import ThreadedSite
from gibatch.status import _ACTIVE, JobState, JobStatus, SweepStatus, pid_alive, sweep_status
from gibatch.transfer import FileRecord
from tests.conftest import run_sweep, tiny_job_files, write_job


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock well past every file's times: signatures are settled when taken."""
    monkeypatch.setattr(discovery, "clock_ns", lambda: time.time_ns() + 10 * discovery.SETTLE_NS)


@pytest.fixture
def young(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock stopped as the test starts: whatever it writes is younger than SETTLE_NS
    when looked at, however long the machine takes (the real clock passed it after a
    stall of 2 s, and "just now" was no longer)."""
    now = time.time_ns()
    monkeypatch.setattr(discovery, "clock_ns", lambda: now)


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The job of every completion record read."""
    seen: list[str] = []
    real = record.read

    def counting(job: Job) -> dict[str, Any] | None:
        seen.append(job.name)
        return real(job)

    monkeypatch.setattr(record, "read", counting)
    return seen


def finish(job: Job, model: int = 1) -> None:
    """Leave `job` as a run completes it: one file per section, then the record."""
    files: dict[str, list[FileRecord]] = {}
    for step in job.steps:
        folder = job.output / step.section
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "log.txt").write_text(f"{job.name} {step.name}\n")
        files[step.section] = [FileRecord("log.txt", (folder / "log.txt").stat().st_size, "-")]
    record.write(job, files, "site", model, time.time())


def sweep_of(root: Path, n: int) -> Sweep:
    for k in range(n):
        write_job(root, f"j{k}", tiny_job_files(**{"interact.json": {"mass_2": 1 + k / 8}}))
    return load_sweep(root)


def plain(sweep: Sweep) -> dict[str, int | None]:
    """`record.completed` as the plain per-job check says it."""
    out = {}
    for job in sweep.jobs:
        data = record.complete_record(job)
        if data is not None:
            out[job.name] = data.get("model_number")
    return out


def test_completed_agrees_with_each_record_cold_and_warm(tmp_path: Path, reads: list[str],
                                                         settled: None) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 7)
    for k, job in enumerate(sweep.jobs[:6]):
        finish(job, model=1 + k % 2)
    jobs = {j.name: j for j in sweep.jobs}
    (jobs["j1"].output / "Plot 1" / "log.txt").write_text("x")  # a file cut short
    (jobs["j2"].output / "Galaxy Merge" / "log.txt").unlink()  # a file missing
    record.invalidate(jobs["j3"])  # the record removed
    data = json.loads(record.record_path(jobs["j4"]).read_text())
    data["sections"] = list(data["sections"])  # a record of another shape
    record.record_path(jobs["j4"]).write_text(json.dumps(data))
    # j0 and j5 complete; j6 never run.
    assert plain(sweep) == {"j0": 1, "j5": 2}
    cold = record.completed(root, sweep.jobs)
    assert cold == plain(sweep)
    reads.clear()
    assert record.completed(root, sweep.jobs) == cold
    assert sorted(reads) == ["j1", "j2", "j4"]  # whole records are remembered


def test_every_change_to_a_remembered_record_is_seen(tmp_path: Path, reads: list[str],
                                                     settled: None) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 6)
    for job in sweep.jobs:
        finish(job)
    assert len(record.completed(root, sweep.jobs)) == 6
    jobs = {j.name: j for j in sweep.jobs}
    (jobs["j0"].output / "Plot 2" / "log.txt").unlink()  # a file removed
    shutil.rmtree(jobs["j1"].output / "Galaxy 1")  # a section removed
    record.invalidate(jobs["j2"])  # what `run` does before it redoes a job
    finish(jobs["j3"], model=4)  # the record written again
    (jobs["j4"].output / "Plot 1" / "log.txt").rename(jobs["j4"].output / "Plot 1" / "x")
    # j5's parameters changed after it completed: the same record, another lineage.
    (root / "j5" / "merge.json").write_text(json.dumps(
        {**tiny_job_files()["merge.json"], "theta_galaxy_2": 10}))
    sweep = load_sweep(root)
    reads.clear()
    assert record.completed(root, sweep.jobs) == {"j3": 4}
    assert "j5" not in reads  # judged from the database: its record did not change
    assert plain(sweep) == {"j3": 4}


def test_a_record_changed_just_now_is_read_again(tmp_path: Path, reads: list[str],
                                                young: None) -> None:
    """Coarse timestamps: a record or section younger than SETTLE_NS is not remembered."""
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 2)
    for job in sweep.jobs:
        finish(job)
    record.completed(root, sweep.jobs)
    reads.clear()
    assert record.completed(root, sweep.jobs) == {"j0": 1, "j1": 1}
    assert sorted(reads) == ["j0", "j1"]


def test_without_a_usable_database_every_record_is_read(tmp_path: Path,
                                                        reads: list[str]) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 2)
    finish(sweep.jobs[0])
    (root / ".gibatch" / "journal.db").unlink()
    (root / ".gibatch" / "journal.db").mkdir()  # cannot be opened as a database
    assert record.completed(root, sweep.jobs) == {"j0": 1}
    assert record.completed(root, sweep.jobs) == {"j0": 1}
    assert reads.count("j0") == 2
    assert record.whole(root, sweep.jobs) == record.whole(root, sweep.jobs) == {"j0"}
    assert reads.count("j0") == 4


# -- record.whole: what `run` skips, judged as is_complete judges it, records not read

def test_whole_agrees_with_each_record_and_reads_only_what_changed(
        tmp_path: Path, reads: list[str], settled: None) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 13)
    for job in sweep.jobs[:12]:
        finish(job)
    jobs = {j.name: j for j in sweep.jobs}
    # j10 lists a file under a folder of its section: its names are not remembered.
    sub = jobs["j10"].output / "Plot 1" / "sub"
    sub.mkdir()
    (sub / "x").write_text("xyz")
    data = json.loads(record.record_path(jobs["j10"]).read_text())
    data["sections"]["Plot 1"].append({"name": "sub/x", "size": 3, "sha256": "-"})
    record.record_path(jobs["j10"]).write_text(json.dumps(data))
    assert record.whole(root, sweep.jobs) == set(plain(sweep)) == {f"j{k}" for k in range(12)}
    reads.clear()
    assert record.whole(root, sweep.jobs) == {f"j{k}" for k in range(12)}
    assert reads == ["j10"]  # the rest remembered

    log = jobs["j0"].output / "Plot 1" / "log.txt"
    with log.open("r+") as f:
        f.truncate(3)  # cut short in place: the folder does not change, nor the record
    with (jobs["j1"].output / "Galaxy Interaction" / "log.txt").open("a") as f:
        f.write("more")  # grown in place
    (jobs["j2"].output / "Galaxy Merge" / "log.txt").unlink()  # removed
    (jobs["j3"].output / "Galaxy 1" / "log.txt").write_text("a whole other file")  # replaced
    shutil.rmtree(jobs["j4"].output / "Plot 2")  # a section removed
    record.invalidate(jobs["j5"])  # what `run` does before it redoes a job
    finish(jobs["j6"], model=4)  # the record written again: still whole
    (root / "j7" / "merge.json").write_text(json.dumps(  # another lineage
        {**tiny_job_files()["merge.json"], "theta_galaxy_2": 10}))
    (jobs["j8"].output / "Plot 1" / "log.txt.part").write_text("x")  # not listed: no matter
    data = json.loads(record.record_path(jobs["j11"]).read_text())
    data["lineage"]["merge"] = "0" * 16  # a record of other parameters, the same files
    record.record_path(jobs["j11"]).write_text(json.dumps(data))
    sweep = load_sweep(root)
    reads.clear()
    assert record.whole(root, sweep.jobs) == {"j6", "j8", "j9", "j10"}
    assert {"j8", "j9"}.isdisjoint(reads)  # unchanged: not read
    assert set(plain(sweep)) == {"j6", "j8", "j9", "j10"}
    reads.clear()
    assert record.whole(root, sweep.jobs) == {"j6", "j8", "j9", "j10"}
    assert "j6" not in reads  # its new record is remembered
    assert listings(root) == 1  # kept once for every record listing the same files
    for job in sweep.jobs:
        record.invalidate(job)
    assert record.whole(root, sweep.jobs) == set()
    assert listings(root) == 0  # none left that no record uses


def listings(root: Path) -> int:
    db = sqlite3.connect(root / ".gibatch" / "journal.db")
    try:
        count: int = db.execute("SELECT count(*) FROM listings").fetchone()[0]
        return count
    finally:
        db.close()


def test_whole_reads_a_record_changed_just_now_and_keeps_other_rows(
        tmp_path: Path, reads: list[str], young: None) -> None:
    """Coarse timestamps: a record younger than SETTLE_NS is read each time; `whole` of
    some jobs keeps what is remembered of the others."""
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 2)
    for job in sweep.jobs:
        finish(job)
    assert record.whole(root, sweep.jobs) == {"j0", "j1"}
    reads.clear()
    assert record.whole(root, sweep.jobs) == {"j0", "j1"}
    assert sorted(reads) == ["j0", "j1"]
    later = time.time_ns() + 10 * discovery.SETTLE_NS
    with pytest.MonkeyPatch.context() as m:
        m.setattr(discovery, "clock_ns", lambda: later)
        assert record.whole(root, sweep.jobs) == {"j0", "j1"}  # remembered now
        assert record.whole(root, sweep.jobs[:1]) == {"j0"}  # of one job only
        reads.clear()
        assert record.whole(root, sweep.jobs) == {"j0", "j1"}
        assert record.completed(root, sweep.jobs) == {"j0": 1, "j1": 1}
    assert reads == []


def test_a_lineage_written_to_read_as_the_jobs_is_not_the_jobs(
        tmp_path: Path, reads: list[str], settled: None) -> None:
    """A record whose lineage differs from the job's but, joined as text, reads as the
    job's chain (a step's hash holding `;` and `=`) is never taken as the job's: not by
    `status`, not by `run`, cold or warm."""
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 1)
    job = sweep.jobs[0]
    finish(job)
    first = job.steps[0].name
    chain = ";".join(f"{s.name}={h}" for s, h in job.lineage.items())
    data = json.loads(record.record_path(job).read_text())
    data["lineage"] = {first: chain.removeprefix(f"{first}=")}
    record.record_path(job).write_text(json.dumps(data))
    assert plain(sweep) == {}
    for _ in range(2):
        assert record.completed(root, sweep.jobs) == {}
        assert record.whole(root, sweep.jobs) == set()


def test_what_status_remembers_spares_run_reading(tmp_path: Path, reads: list[str],
                                                   settled: None) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 3)
    for job in sweep.jobs[:2]:
        finish(job)
    assert record.completed(root, sweep.jobs) == {"j0": 1, "j1": 1}
    reads.clear()
    assert record.whole(root, sweep.jobs) == {"j0", "j1"}
    assert reads == []


@pytest.mark.parametrize("section, name", [
    ("Plot 1", "ABS"), ("Plot 1", "log.txt/"), ("Plot 1", ""), ("Plot 1", "sub/x"),
    ("", "log.txt"), (".", "log.txt"), ("Plot 1/", "log.txt")])
def test_a_listed_name_names_the_file_path_joins_name(tmp_path: Path, section: str,
                                                      name: str) -> None:
    """Files are stat'ed by a joined text where that names what `output / section /
    name` names; a name that Path joins otherwise (absolute, empty, a slash) still
    names that."""
    root = tmp_path / "jobs"
    job = sweep_of(root, 1).jobs[0]
    finish(job)
    (job.output / "Plot 1" / "sub").mkdir()
    (job.output / "Plot 1" / "sub" / "x").write_text("x")
    (job.output / "log.txt").write_text("top")
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("outside")
    listed = str(outside) if name == "ABS" else name
    target = job.output / section / listed
    data = json.loads(record.record_path(job).read_text())
    data["sections"].setdefault(section, []).append(
        {"name": listed, "size": target.stat().st_size, "sha256": "-"})
    record.record_path(job).write_text(json.dumps(data))
    assert record.is_complete(job)
    if target.is_file():
        with target.open("a") as f:
            f.write("more")
        assert not record.is_complete(job)


def test_a_second_run_reads_no_record_and_redoes_a_file_cut_short(
        tmp_path: Path, reads: list[str], settled: None,
        make_site: Callable[..., ThreadedSite]) -> None:
    """`gibatch run` skips what is complete without reading a remembered record, and a
    listed file cut short in place since (which `status`'s signature does not see) is
    never taken as whole: the job runs again."""
    root = tmp_path / "jobs"
    write_job(root, "a", tiny_job_files())
    write_job(root, "b", tiny_job_files(**{"interact.json": {"mass_2": 2.0}}))
    site = make_site()
    assert set(run_sweep(site, root, [1]).outcomes.values()) == {Outcome.COMPLETE}
    assert set(run_sweep(site, root, [1]).outcomes.values()) == {Outcome.ALREADY_COMPLETE}
    reads.clear()
    assert set(run_sweep(site, root, [1]).outcomes.values()) == {Outcome.ALREADY_COMPLETE}
    assert reads == []
    job = {j.name: j for j in load_sweep(root).jobs}["b"]
    listed = json.loads(record.record_path(job).read_text())["sections"]
    section, files = next((k, v) for k, v in listed.items() if v and v[0]["size"] > 1)
    with (job.output / section / files[0]["name"]).open("r+") as f:
        f.truncate(files[0]["size"] // 2)
    assert record.completed(root, load_sweep(root).jobs) == {"a": 1, "b": 1}  # status's
    outcomes = run_sweep(site, root, [1]).outcomes
    assert outcomes == {"a": Outcome.ALREADY_COMPLETE, "b": Outcome.COMPLETE}
    assert (job.output / section / files[0]["name"]).stat().st_size == files[0]["size"]
    assert record.is_complete(job)


def test_a_database_that_fails_when_asked_makes_every_record_read(
        tmp_path: Path, reads: list[str], settled: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 2)
    finish(sweep.jobs[0])
    assert record.whole(root, sweep.jobs) == {"j0"}  # remembered

    def fails(self: object) -> None:
        raise sqlite3.OperationalError("database disk image is malformed")

    monkeypatch.setattr(record._Completions, "proofs", fails)
    monkeypatch.setattr(record._Completions, "load", fails)
    reads.clear()
    assert record.whole(root, sweep.jobs) == {"j0"}
    assert record.completed(root, sweep.jobs) == {"j0": 1}
    assert reads == ["j0", "j0"]


# -- sweep_status: the journal queried for what it needs, against reading every event

def status_from_every_event(sweep: Sweep, journal: Journal) -> list[JobStatus]:
    """The job states as status found them before: every event read."""
    events = journal.events()
    runs: dict[int, tuple[float, float | None]] = {}
    last = {}
    for e in events:
        if e.event == Event.RUN_START:
            runs[e.pid] = (e.at, None)
        elif e.event == Event.RUN_END and e.pid in runs:
            runs[e.pid] = (runs[e.pid][0], e.at)
        if e.job is not None and e.event != Event.JOB_INVALID:
            last[e.job] = e
    live = [pid for pid, (_, end) in runs.items() if end is None and pid_alive(pid)]
    out = []
    for job in sweep.jobs:
        ev = last.get(job.name)
        data = record.complete_record(job)
        if data is not None:
            out.append(JobStatus(job.name, JobState.COMPLETE, data.get("model_number")))
        elif ev is not None and ev.event in _ACTIVE and ev.pid in live:
            out.append(JobStatus(job.name, JobState.RUNNING, ev.model, ev.step))
        elif ev is not None and ev.event == Event.JOB_FAILED:
            out.append(JobStatus(job.name, JobState.FAILED, ev.model, reason=ev.detail))
        else:
            out.append(JobStatus(job.name, JobState.PENDING))
    return out


def test_status_reads_the_journal_as_reading_every_event_would(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 8)
    write_job(root, "bad", {})
    sweep = load_sweep(root)
    names = [j.name for j in sweep.jobs]
    journal = Journal(root)
    try:
        # An earlier run (ended) failed j0 and completed j1; this run (live: our pid)
        # has j2 running, j3 failed, j4 failed then started again, j5 complete.
        journal.record(Event.RUN_START)
        journal.record(Event.JOB_START, names[0], 1)
        journal.record(Event.JOB_FAILED, names[0], 1, detail="boom")
        journal.record(Event.JOB_START, names[1], 2)
        journal.record(Event.JOB_COMPLETE, names[1], 2)
        finish(sweep.jobs[1], 2)
        journal.record(Event.RUN_END)
        journal.record(Event.RUN_START)
        journal.record(Event.JOB_START, names[2], 1)
        journal.record(Event.STEP_SUBMITTED, names[2], 1, "merge")
        journal.record(Event.JOB_INVALID, names[2])  # never counts as a job's last
        journal.record(Event.JOB_START, names[3], 2)
        journal.record(Event.JOB_FAILED, names[3], 2, detail="bad\nthings")
        journal.record(Event.JOB_FAILED, names[4], 1, detail="first")
        journal.record(Event.JOB_START, names[4], 1)
        journal.record(Event.JOB_COMPLETE, names[5], 2)
        finish(sweep.jobs[5], 2)
        st = sweep_status(sweep, journal, recent=3)
        assert [j for j in st.jobs if j.state is not JobState.INVALID] \
            == status_from_every_event(sweep, journal)
        assert [j.state for j in st.jobs] == [
            JobState.FAILED, JobState.COMPLETE, JobState.RUNNING, JobState.FAILED,
            JobState.RUNNING, JobState.COMPLETE, JobState.PENDING, JobState.PENDING,
            JobState.INVALID]
        assert st.live_pids == [os.getpid()] and st.run_ended is None
        assert st.done_this_run == 1
        assert [e.event for e in st.last_events] == ["job-failed", "job-start", "job-complete"]
        assert sweep_status(sweep, journal, recent=0).last_events == []
        # The run ends: only failures are asked for (`last_failures`), the same ones.
        journal.record(Event.JOB_FAILED, names[6], 3, detail="late")
        journal.record(Event.JOB_INVALID, names[6])
        journal.record(Event.RUN_END)
        assert journal.last_failures() == journal.last_job_events({Event.JOB_FAILED})
        assert set(journal.last_failures()) == {names[0], names[3], names[6]}
        st = sweep_status(sweep, journal)
        assert st.live_pids == [] and st.done_this_run == 0  # no ETA to make
        assert [j for j in st.jobs if j.state is not JobState.INVALID] \
            == status_from_every_event(sweep, journal)
        assert [j.state for j in st.jobs].count(JobState.FAILED) == 3
    finally:
        journal.close()


# -- the report's rows as compact JSON

@pytest.mark.parametrize("shared", [False, True], ids=["own-steps", "shared-steps"])
def test_variation_finds_what_comparing_every_jobs_json_finds(shared: bool) -> None:
    """As flattening every job and comparing each value's JSON text did (the old way:
    a dictionary of every parameter per job); 1, 1.0 and true differ, so do 0.0 and
    -0.0; absent counts as a value, and null is absent. Jobs whose Step objects are
    the first job's (shared, as discovery makes them) are compared by position."""
    first = {steps.GALAXY1: {"n": 1, "c": ["disk", "halo"]},
             steps.MERGE: {"t": 1, "p": {"x": 0.0, "y": 5}}, steps.plot(1): {"s": "a"}}
    payloads = [
        first,
        {steps.GALAXY1: {"n": 1, "c": ["disk", "halo"]},
         steps.MERGE: {"t": 1.0, "p": {"x": -0.0, "y": 5}}, steps.plot(1): {"s": "a"},
         steps.plot(2): {"s": "b"}},
        {steps.GALAXY1: {"n": True, "c": ["disk"]}, steps.MERGE: {"t": 1, "p": 7},
         steps.plot(1): {"s": "a", "extra": None}},
        first]
    if shared:
        one: dict[steps.Step, steps.Step] = {}
        payloads = [{one.setdefault(s, s): b for s, b in p.items()} for p in payloads]
    jobs = [Job(str(k), Path(str(k)), {s: json.dumps(b) for s, b in p.items()}, p)
            for k, p in enumerate(payloads)]
    flat = [flatten(job) for job in jobs]
    keys = [k for k in sorted({k for r in flat for k in r})
            if len({json.dumps(r.get(k)) for r in flat}) > 1]
    assert keys == ["galaxy1.c", "galaxy1.n", "merge.p", "merge.p.x", "merge.p.y", "merge.t",
                    "plot2.s"]
    variation = Variation()
    for job in jobs:
        variation.add(job)
    assert variation.keys() == keys
    for mine, values in zip(variation.values(), flat, strict=True):
        assert json.dumps(mine) == json.dumps({k: values[k] for k in keys if k in values})


def png(path: Path, colour: str = "red") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), colour).save(path)


def test_the_page_holds_every_row_as_json_and_no_name_breaks_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "SHEET_MAX_TILES", 2)
    root = tmp_path / "jobs"
    hostile = "<!--{{match}}<script>"
    odd = os.fsdecode(b"odd\xff")
    for k, name in enumerate(["a", hostile, odd, "pending"]):
        write_job(root, name, tiny_job_files(**{"interact.json": {"mass_2": 1 + k}}))
    sweep = load_sweep(root)
    for job in sweep.jobs[:3]:
        png(job.output / "Plot 1" / "final.png")
        png(job.output / "Plot 1" / "animation.gif")
        png(job.output / "Plot 2" / "final.png")
    states = {j.name: JobState.COMPLETE for j in sweep.jobs[:3]}
    status = SweepStatus([JobStatus(j.name, states.get(j.name, JobState.PENDING))
                          for j in sweep.jobs], [], None, None, 0)
    result = build_report(sweep, status)
    page = result.page.read_text(encoding="utf-8")
    assert hostile not in page  # escaped in the JSON, and never substituted
    assert "contact sheet</a> (the first 2 complete jobs)" in page
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    rows = {row[0]: row for row in data["rows"]}
    assert list(rows) == [j.name for j in sweep.jobs]
    assert rows["pending"][4] == [] and data["states"][rows["pending"][1]] == "pending"
    assert [rows[n][3] for n in ("a", hostile, odd, "pending")] \
        == [["1.0"], ["2.0"], ["3.0"], ["4.0"]]  # interact.mass_2, the one key that varies
    links = {tuple(t) for t in data["targets"]}
    assert links == {("Plot 1", "output/Plot%201/animation.gif"),
                     ("Plot 2", "output/Plot%202/final.png")}
    assert rows[odd][5] == "odd%FF" and len(rows["a"]) == 5  # URL of the bytes
    for name in ("a", hostile, odd):
        for _, thumb in rows[name][4]:
            assert (root / ".gibatch" / "report" / thumb).is_file()
    assert result.thumbnails == 6


def test_the_contact_sheet_shows_the_first_jobs_only(tmp_path: Path) -> None:
    tiles = []
    for k in range(3):
        still = tmp_path / f"{k}.png"
        png(still, ["red", "green", "blue"][k])
        tiles.append((str(k), still))
    sheet = tmp_path / "sheet.png"
    assert contact_sheet(tiles, sheet, tile=50, most=2) == 2
    with Image.open(sheet) as image:
        assert image.getpixel((25, 25)) == (255, 0, 0)
        assert image.getpixel((75, 25)) == (0, 128, 0)
        assert image.size == (2 * 50, 50 + 14)  # no third tile
    made = sheet.stat().st_mtime_ns
    assert contact_sheet(tiles, sheet, tile=50, most=2) == 2
    assert sheet.stat().st_mtime_ns == made  # the same tiles: kept
    png(tiles[1][1], "blue")  # an image newer than the sheet
    os.utime(tiles[1][1], ns=(made + 10**9, made + 10**9))
    assert contact_sheet(tiles, sheet, tile=50, most=2) == 2
    with Image.open(sheet) as image:
        assert image.getpixel((75, 25)) == (0, 0, 255)
    assert contact_sheet(tiles[1:], sheet, tile=50, most=2) == 2  # other tiles
    with Image.open(sheet) as image:
        assert image.getpixel((25, 25)) == (0, 0, 255)


def test_a_thumbnail_stays_its_jobs_when_jobs_are_added(tmp_path: Path) -> None:
    """Thumbnails are kept while newer than their image: named by a job's position, a
    job added before it would have been shown with the other job's picture."""
    root = tmp_path / "jobs"

    def finished(name: str, colour: str) -> None:
        write_job(root, name, tiny_job_files())
        png(root / name / "output" / "Plot 1" / "final.png", colour)
        os.utime(root / name / "output" / "Plot 1" / "final.png", ns=(10**18, 10**18))

    def report() -> dict[str, tuple[int, ...]]:
        sweep = load_sweep(root)
        status = SweepStatus([JobStatus(j.name, JobState.COMPLETE) for j in sweep.jobs],
                             [], None, None, 0)
        page = build_report(sweep, status).page.read_text()
        data = json.loads(page.split('id="data">')[1].split("</script>")[0])
        colours = {}
        for row in data["rows"]:
            with Image.open(root / ".gibatch" / "report" / row[4][0][1]) as image:
                colours[row[0]] = image.convert("RGB").getpixel((5, 5))
        return colours

    finished("b", "red")
    assert report() == {"b": (255, 0, 0)}
    finished("a", "lime")  # now first, its image older than b's thumbnail
    assert report() == {"a": (0, 255, 0), "b": (255, 0, 0)}


def complete_sweep(root: Path, n: int, colours: list[str]) -> tuple[Sweep, SweepStatus]:
    """`n` jobs whose two plots are images of `colours[k % len(colours)]`, all complete."""
    for k in range(n):
        write_job(root, f"j{k}", tiny_job_files(**{"interact.json": {"mass_2": 1 + k}}))
        for plot in ("Plot 1", "Plot 2"):
            png(root / f"j{k}" / "output" / plot / "final.png", colours[k % len(colours)])
    sweep = load_sweep(root)
    return sweep, SweepStatus([JobStatus(j.name, JobState.COMPLETE) for j in sweep.jobs],
                              [], None, None, 0)


def thumbnail_colours(root: Path) -> dict[tuple[str, str], tuple[int, ...]]:
    """(job, section) -> the colour of its thumbnail, as the page links them."""
    page = (root / "report.html").read_text(encoding="utf-8")
    data = json.loads(page.split('id="data">')[1].split("</script>")[0])
    out = {}
    for row in data["rows"]:
        for target, thumb in row[4]:
            with Image.open(root / ".gibatch" / "report" / thumb) as image:
                out[row[0], data["targets"][target][0]] = image.convert("RGB").getpixel((5, 5))
    return out


def test_thumbnails_made_in_a_pool_are_those_made_here(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "jobs"
    sweep, status = complete_sweep(root, 5, ["red", "lime", "blue"])
    (root / "j3" / "output" / "Plot 2" / "final.png").write_bytes(b"not a png")
    monkeypatch.setattr(report.Thumbnails, "BATCH", 3)  # 10 thumbnails: 3 batches + 1
    result = build_report(sweep, status)
    assert result.thumbnails == 10
    colours = thumbnail_colours(root)
    rgb = {"red": (255, 0, 0), "lime": (0, 255, 0), "blue": (0, 0, 255)}
    for k in range(5):
        assert colours[f"j{k}", "Plot 1"] == rgb[["red", "lime", "blue"][k % 3]]
    assert colours["j3", "Plot 2"] == (208, 208, 208)  # the placeholder's grey
    # The worker's warning reaches this process's log.
    assert "final.png: cannot read the image" in caplog.text


def test_stale_thumbnails_are_removed_and_the_rest_kept(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    sweep, status = complete_sweep(root, 3, ["red"])
    build_report(sweep, status)
    media = root / ".gibatch" / "report"
    (media / "match-0.png").write_bytes(b"the match section's")
    kept = {p.name: p.stat().st_mtime_ns for p in media.glob("*.png")}
    assert len(kept) == 7
    shutil.rmtree(root / "j0")  # a job removed
    shutil.rmtree(root / "j1" / "output" / "Plot 2")  # a plot gone
    sweep = load_sweep(root)
    status = SweepStatus([JobStatus(j.name, JobState.COMPLETE) for j in sweep.jobs],
                         [], None, None, 0)
    assert build_report(sweep, status).thumbnails == 3
    now = {p.name: p.stat().st_mtime_ns for p in media.glob("*.png")}
    assert set(thumbnail_colours(root)) == {("j1", "Plot 1"), ("j2", "Plot 1"),
                                            ("j2", "Plot 2")}
    assert len(now) == 4 and "match-0.png" in now  # 3 thumbnails, not made again
    assert all(kept[name] == mtime for name, mtime in now.items())


def test_a_warm_report_lists_no_section_and_sees_every_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settled: None) -> None:
    """Plots remembered by the completion signature `status` vouched for: a second
    report lists no folder; a still replaced (a download lands by renaming) or a sweep
    moved is seen."""
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 3)
    for job in sweep.jobs:
        finish(job)
        png(job.output / "Plot 1" / "final.png", "red")
        png(job.output / "Plot 1" / "animation.gif", "red")
    listed: list[str] = []
    real = report.find_shot

    def counting(section_dir: Path) -> report.Shot:
        listed.append(section_dir.parent.parent.name)
        return real(section_dir)

    monkeypatch.setattr(report, "find_shot", counting)

    def build(root: Path) -> tuple[str, dict[tuple[str, str], tuple[int, ...]]]:
        sweep = load_sweep(root)
        journal = Journal(root)
        try:
            build_report(sweep, sweep_status(sweep, journal))
        finally:
            journal.close()
        return (root / "report.html").read_text(encoding="utf-8"), thumbnail_colours(root)

    first, colours = build(root)
    assert sorted(listed) == ["j0", "j0", "j1", "j1", "j2", "j2"]  # Plot 1 and 2 each
    assert set(colours.values()) == {(255, 0, 0)}
    listed.clear()
    assert build(root) == (first, colours)
    assert listed == []
    # j1's animation replaced as a download lands: a new file renamed over it.
    new = root / "j1" / "output" / "Plot 1" / "new.gif"
    png(new, "blue")
    new.replace(root / "j1" / "output" / "Plot 1" / "animation.gif")
    (root / "j1" / "output" / "Plot 1" / "final.png").unlink()  # the GIF is the still
    _, colours = build(root)
    assert listed == ["j1", "j1"]
    assert colours["j1", "Plot 1"] == (0, 0, 255) and colours["j0", "Plot 1"] == (255, 0, 0)
    listed.clear()
    moved = tmp_path / "moved"
    root.rename(moved)
    assert build(moved)[1] == colours  # from the remembered names, in their new place
    assert listed == []


def test_a_record_is_judged_by_its_lineage_in_any_order(tmp_path: Path, reads: list[str],
                                                        settled: None) -> None:
    """Remembered, a record's lineage is hashed in the job's chain order: one written in
    another order is the same lineage; one with a step more is not."""
    root = tmp_path / "jobs"
    sweep = sweep_of(root, 2)
    for job in sweep.jobs:
        finish(job)
    for job, extra in zip(sweep.jobs, [{}, {"plot9": "x"}], strict=True):
        data = json.loads(record.record_path(job).read_text())
        data["lineage"] = dict(reversed([*data["lineage"].items(), *extra.items()]))
        record.record_path(job).write_text(json.dumps(data))
    assert plain(sweep) == {"j0": 1}
    assert record.completed(root, sweep.jobs) == {"j0": 1}  # read
    reads.clear()
    assert record.completed(root, sweep.jobs) == {"j0": 1}
    assert reads == []  # both remembered
