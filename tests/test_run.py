"""`gibatch run` against the real local site on 127.0.0.1, with its faults switched on."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from gibatch import record, steps
from gibatch.jobs import load_sweep
from gibatch.journal import Journal
from gibatch.run import Outcome
from gibatch.sim.faults import Faults
from gibatch.sim.server import ThreadedSite
from gibatch.site import Section, SiteClient
from tests.conftest import (
    assert_jobs_match_ledger,
    gibatch,
    run_sweep,
    task_ends_held,
    tiny_job_files,
    wait_for_event,
    write_job,
)


@pytest.fixture
def three_jobs(tmp_path: Path) -> Path:
    """A, B (A with other plots: 2 tasks), C (A with another interaction: 3 tasks)."""
    root = tmp_path / "jobs"
    write_job(root, "a", tiny_job_files())
    write_job(root, "b", tiny_job_files(**{"plot1.json": {"colour_scheme": "blackonwhite"},
                                           "plot2.json": {"x_min": -250}}))
    write_job(root, "c", tiny_job_files(**{"interact.json": {"mass_2": 2.0}}))
    return root


MINIMUM_TASKS = 6 + 2 + 3


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_sweep_under_faults_is_whole_and_minimal(
    three_jobs: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site(session_lifetime_s=1.5, faults=Faults(
        error_rate=0.15, cut_rate=0.4, post_502_rate=0.4, seed=7))
    # One of each at least: which requests the rates hit depends on the order they draw
    # in, which their timing decides (post_502 has 11 draws: none hit in 0.4% of runs).
    for kind, path in (("error", "/gi/view_jobs/"), ("cut", "/media/"), ("post_502", "/gi/")):
        site.running.site.faults.script(kind, path)
    summary = run_sweep(site, three_jobs, [1])
    assert summary.outcomes == {n: Outcome.COMPLETE for n in "abc"}, summary.reasons
    assert site.running.site.store.task_count() == MINIMUM_TASKS
    faults = site.running.site.faults.injected
    assert faults.get("cut", 0) > 0 and faults.get("post_502", 0) > 0 and faults.get("error")
    assert_jobs_match_ledger(three_jobs, site.running.site.config.data_dir)
    # A second run finds everything complete and asks the site for nothing new.
    again = run_sweep(site, three_jobs, [1])
    assert set(again.outcomes.values()) == {Outcome.ALREADY_COMPLETE}
    assert site.running.site.store.task_count() == MINIMUM_TASKS


@pytest.mark.slow
def test_hung_requests_time_out_and_retry(
    three_jobs: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site()
    site.running.site.faults.script("hang", "/gi/view_jobs/", times=2)
    site.running.site.faults.script("hang", "/media/", times=2)
    summary = run_sweep(site, three_jobs, [1, 2])
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}
    assert site.running.site.faults.injected["hang"] == 4


@pytest.mark.slow
def test_task_behind_our_back_voids_memory(
    three_jobs: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site()
    (three_jobs / "c").rename(three_jobs.parent / "c-later")
    (three_jobs / "b").rename(three_jobs.parent / "b-later")
    run_sweep(site, three_jobs, [1])
    assert site.running.site.store.task_count() == 6

    async def meddle() -> None:  # a student clicks "build galaxy 1" in the browser
        async with SiteClient(site.running.url, "alice", "pw") as client:
            await client.login()
            await client.submit(steps.GALAXY1, 1, tiny_job_files()["galaxy1.json"])

    anyio.run(meddle)
    (three_jobs.parent / "b-later").rename(three_jobs / "b")
    summary = run_sweep(site, three_jobs, [1])
    assert summary.outcomes["b"] is Outcome.COMPLETE
    # The foreign galaxy 1 replaced Galaxy 1 and cleared merge, interaction and plots
    # (site rules); only Galaxy 2 is still held for sure: b runs 5 tasks, not 2.
    assert site.running.site.store.task_count() == 6 + 1 + 5
    events = [e.event for e in Journal(three_jobs).events()]
    assert "memory-void" in events


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("moment", [("step-submitted", "interact"), ("job-complete", None)])
def test_kill_9_then_resume(three_jobs: Path, tmp_path: Path,
                            moment: tuple[str, str | None]) -> None:
    env = {"GIBATCH_LOCK_DIR": str(tmp_path / "locks")}
    args = ("run", "--jobs", str(three_jobs), "--models", "1")
    log = tmp_path / "gibatch.log"
    first = gibatch(log, *args, env=env)
    try:
        wait_for_event(three_jobs, *moment, deadline_s=90)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    second = gibatch(log, *args, env=env)
    second.wait(timeout=240)
    out = log.read_text()
    assert second.returncode == 0, out
    site_dir = three_jobs / ".gibatch" / "site"
    assert_jobs_match_ledger(three_jobs, site_dir)
    import sqlite3

    with sqlite3.connect(site_dir / "site.db") as db:
        (count,) = db.execute("SELECT COUNT(*) FROM tasks").fetchone()
    assert count == MINIMUM_TASKS, out


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("moment", [("step-submitted", "interact"),
                                    ("step-completed", "plot2")])
def test_after_kill_9_a_job_stays_on_the_model_that_holds_its_work(
        three_jobs: Path, tmp_path: Path, make_site: Callable[..., ThreadedSite],
        moment: tuple[str, str]) -> None:
    """After a crash, the job whose task is still on model 2 (adopted when model 2
    reconciles), or whose every result model 2 holds (killed while downloading), stays
    with model 2, though model 1 is free at once and picks first."""
    (three_jobs / "b").rename(tmp_path / "b")
    (three_jobs / "a").rename(tmp_path / "a")
    site = make_site()
    server, env = _site_process_env(site, tmp_path)
    log = tmp_path / "gibatch.log"
    # c on model 1: model 1 then holds a's galaxies and merge, and knows its sections,
    # so it reconciles at once after the crash and would take a for its saving.
    assert gibatch(log, "run", "--jobs", str(three_jobs), "--models", "1", *server,
                   env=env).wait(timeout=240) == 0, log.read_text()
    (tmp_path / "a").rename(three_jobs / "a")
    site.running.site.config.stream_rate_mb_s = 0.05  # downloads take seconds: cut them
    # a's interaction (model 2's only one) ends once gibatch is killed, not before: it
    # took 0.3 s, and a kill landing later than that after the journal shows it
    # submitted (a poll and a database read away) found it ended, its intent gone.
    with task_ends_held(site, lambda task: moment[1] == "interact" == task.step):
        first = gibatch(log, "run", "--jobs", str(three_jobs), "--models", "2", *server,
                        env=env)
        try:
            wait_for_event(three_jobs, *moment, deadline_s=90, job="a")
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    site.running.site.config.stream_rate_mb_s = 0.0
    second = gibatch(log, "run", "--jobs", str(three_jobs), "--models", "1-2", *server,
                     env=env)
    second.wait(timeout=240)
    out = log.read_text()
    assert second.returncode == 0, out
    assert_jobs_match_ledger(three_jobs, site.running.site.config.data_dir)
    tasks = site.running.site.store.tasks("alice")
    assert [t.model for t in tasks] == [1] * 6 + [2] * 6, out  # a's tasks once, on model 2
    adopted = [(e.model, e.step) for e in Journal(three_jobs).events()
               if e.event == "step-adopted"]
    assert adopted == ([(2, "interact")] if moment[1] == "interact" else []), out


def test_the_interaction_downloads_while_the_plots_run(
        tmp_path: Path, make_site: Callable[..., ThreadedSite]) -> None:
    """The interaction's files are fetched while the plots run, so the next interaction
    on the model waits for less: the last plot is not even submitted until a file of
    the interaction has been asked for (bounded; without the early download it never
    is, and the job fails). The job still ends byte for byte what the site made."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site()

    def wrap(client: SiteClient) -> None:
        asked = anyio.Event()
        real_open, real_submit = client.open_file, client.submit

        @contextlib.asynccontextmanager
        async def open_file(url: str, offset: int) -> AsyncIterator[Any]:
            if url.endswith("/snapshots.h5"):
                asked.set()
            async with real_open(url, offset) as resp:
                yield resp

        async def submit(step: steps.Step, model: int, payload: Any) -> int | None:
            if step == steps.plot(2):
                with anyio.fail_after(30):
                    await asked.wait()
            return await real_submit(step, model, payload)

        client.open_file = open_file  # type: ignore[method-assign]
        client.submit = submit  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1], wrap=wrap)
    assert summary.outcomes == {"a": Outcome.COMPLETE}, summary.reasons
    assert site.running.site.store.task_count() == 6
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


@pytest.mark.slow
def test_model_held_by_another_process_is_named(three_jobs: Path, tmp_path: Path) -> None:
    env = {"GIBATCH_LOCK_DIR": str(tmp_path / "locks")}
    key = f"embedded:{(three_jobs / '.gibatch' / 'site').resolve()}"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, pathlib; from gibatch.slots import ModelLock\n"
         f"lock = ModelLock({key!r}, 1, pathlib.Path({str(tmp_path)!r}))\n"
         "assert lock.acquire(); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, **env},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        log = tmp_path / "gibatch.log"
        proc = gibatch(log, "run", "--jobs", str(three_jobs), "--models", "1", env=env)
        proc.wait(timeout=120)
        out = log.read_text()
        assert proc.returncode == 3, out
        assert f"pid {holder.pid}" in out and str(tmp_path) in out
    finally:
        holder.kill()
        holder.communicate(timeout=30)  # also closes its pipes


@pytest.mark.slow
def test_502_storm_on_login_is_ridden_out(
    three_jobs: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site()
    faults = site.running.site.faults
    faults.script("error", "/accounts/login/", times=6)  # the proxy fails every login first
    summary = run_sweep(site, three_jobs, [1])
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
    assert faults.injected["error"] == 6
    assert site.running.site.store.task_count() == MINIMUM_TASKS


def rerun_finishes_minimally(site: ThreadedSite, jobs: Path, log: Path, args: tuple[str, ...],
                             env: dict[str, str]) -> None:
    """Run the same command again: it exits 0, every job whole, no task ever sent twice."""
    second = gibatch(log, *args, env=env)
    second.wait(timeout=240)
    assert second.returncode == 0, log.read_text()
    assert site.running.site.store.task_count() == MINIMUM_TASKS
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


def _site_process_env(site: ThreadedSite, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    return (["--server", site.running.url, "--username", "alice"],
            {"GIBATCH_PASSWORD": "pw", "GIBATCH_LOCK_DIR": str(tmp_path / "locks")})


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_processes_share_one_jobs_folder(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    jobs = tmp_path / "jobs"
    for k in range(6):
        write_job(jobs, f"j{k}", tiny_job_files(**{"interact.json": {"mass_2": 1.0 + k / 4}}))
    site = make_site()
    server, env = _site_process_env(site, tmp_path)
    logs = [tmp_path / "p1.log", tmp_path / "p2.log"]
    # The first process's tasks end once the second has started a job: alone for the
    # 4 s the six jobs take, it had done them all before a slow second one began.
    with task_ends_held(site, lambda task: task.model == 1) as release:
        procs = [gibatch(logs[i], "run", "--jobs", str(jobs), "--models", str(i + 1), *server,
                         env=env) for i in range(2)]
        try:
            wait_for_event(jobs, "job-start", None, deadline_s=60, model=2)
        finally:
            release.set()
        for p in procs:
            p.wait(timeout=240)
    texts = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], texts
    completions: dict[str, list[int]] = {}
    for e in Journal(jobs).events():
        if e.event == "job-complete":
            completions.setdefault(str(e.job), []).append(e.pid)
    assert sorted(completions) == [f"j{k}" for k in range(6)]
    assert all(len(pids) == 1 for pids in completions.values()), completions
    assert len({pid for pids in completions.values() for pid in pids}) == 2  # both worked
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)
    # Each job ran once: 6 interactions and 12 plots; galaxies and merges once per model.
    assert site.running.site.store.task_count() == 2 * 3 + 6 * 3


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sigterm_stops_cleanly_and_the_next_run_finishes(
    three_jobs: Path, tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site()
    server, env = _site_process_env(site, tmp_path)
    args = ("run", "--jobs", str(three_jobs), "--models", "1", "--grace", "60", *server)
    log = tmp_path / "run.log"
    # The interaction in flight ends once the signal is taken: the whole run lasts 3 s,
    # and a signal landing after it (or between two jobs) had nothing to interrupt.
    with task_ends_held(site, lambda task: task.step == "interact") as release:
        proc = gibatch(log, *args, env=env)
        try:
            wait_for_event(three_jobs, "step-submitted", "interact", deadline_s=90)
            proc.send_signal(signal.SIGTERM)
            _wait_for_text(log, "SIGTERM: no new tasks", deadline_s=30)
            release.set()
            proc.wait(timeout=90)  # the task in flight settles well within the grace period
        finally:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 1, out  # some jobs not run
    assert "SIGTERM: no new tasks" in out and "Traceback" not in out
    events = [e.event for e in Journal(three_jobs).events()]
    assert events[-1] == "run-end" and "job-interrupted" in events
    interrupted_tasks = site.running.site.store.task_count()
    # The lock was released and the journal kept: the next run resumes, no task twice.
    assert interrupted_tasks < MINIMUM_TASKS
    rerun_finishes_minimally(site, three_jobs, log, args, env)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_two_processes_on_overlapping_model_numbers(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], strict: bool
) -> None:
    site = make_site(strict=strict)
    server, env = _site_process_env(site, tmp_path)
    folders = [tmp_path / "first", tmp_path / "second"]
    for k, folder in enumerate(folders):
        for j in range(3):
            mass = {"interact.json": {"mass_2": 1 + k + j / 4}}
            write_job(folder, f"j{j}", tiny_job_files(**mass))
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    # The first process's tasks end once the second has found model 2 held: it cannot
    # have finished (and let model 2 go) before the second starts, however slowly.
    with task_ends_held(site, lambda task: task.model in (1, 2)) as release:
        first = gibatch(logs[0], "run", "--jobs", str(folders[0]), "--models", "1-2", *server,
                        env=env)
        try:
            wait_for_event(folders[0], "step-submitted", None, deadline_s=60)  # holds 1, 2
            second = gibatch(logs[1], "run", "--jobs", str(folders[1]), "--models", "2-3",
                             *server, env=env)
            _wait_for_text(logs[1], "model 2 is held by another gibatch", deadline_s=60)
            release.set()
            second.wait(timeout=240)
            first.wait(timeout=240)
        finally:
            first.kill()
    texts = [log.read_text() for log in logs]
    assert [first.returncode, second.returncode] == [0, 0], texts
    assert "model 2 is held by another gibatch (pid" in texts[1]
    assert "model numbers used: 3" in texts[1]
    for folder in folders:
        assert_jobs_match_ledger(folder, site.running.site.config.data_dir)
    # No model number was driven by two clients: each model's tasks came from one folder.
    models = {e.model for e in Journal(folders[1]).events() if e.event == "step-submitted"}
    assert models == {3}


def _partial_bytes(root: Path) -> int:
    total = 0
    for part in root.rglob("*.part"):
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            total += part.stat().st_size
    return total


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_kill_9_mid_download_then_resume(
    three_jobs: Path, tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site()
    site.running.site.faults.update(cut_rate=1.0)  # every download stops halfway
    server, env = _site_process_env(site, tmp_path)
    args = ("run", "--jobs", str(three_jobs), "--models", "1", *server)
    log = tmp_path / "run.log"
    first = gibatch(log, *args, env=env)
    try:
        deadline = time.monotonic() + 120
        # A bounded wait for a partial file holding some bytes.
        while not _partial_bytes(three_jobs):
            assert time.monotonic() < deadline and first.poll() is None, log.read_text()
            time.sleep(0.02)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    assert _partial_bytes(three_jobs) > 0
    site.running.site.faults.update(cut_rate=0.0)
    rerun_finishes_minimally(site, three_jobs, log, args, env)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_second_signal_aborts_at_once_and_loses_nothing(
    three_jobs: Path, tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    site = make_site()
    site.running.site.faults.script("hang", "/media/", times=1000)  # downloads never answer
    server, env = _site_process_env(site, tmp_path)
    args = ("run", "--jobs", str(three_jobs), "--models", "1", "--grace", "600", *server)
    log = tmp_path / "run.log"
    proc = gibatch(log, *args, env=env)
    try:
        wait_for_event(three_jobs, "step-completed", "plot2", deadline_s=90)
        proc.send_signal(signal.SIGINT)  # the hung downloads may take the whole grace...
        _wait_for_text(log, "no new tasks", deadline_s=30)
        proc.send_signal(signal.SIGINT)  # ...but a second Ctrl-C stops at once
        proc.wait(timeout=30)
    finally:
        proc.kill()
    out = log.read_text()
    assert "second signal: stopping now" in out and "Traceback" not in out, out
    site.running.site.faults.clear()
    rerun_finishes_minimally(site, three_jobs, log, args, env)


def _wait_for_text(path: Path, text: str, deadline_s: float) -> None:
    end = time.monotonic() + deadline_s
    while text not in path.read_text():
        assert time.monotonic() < end, f"no {text!r} in {path} within {deadline_s} s"
        time.sleep(0.05)


def test_a_file_listed_twice_in_a_section_is_saved_twice(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """Two links of the same text in one section (a site's oddity): each is a listed
    file, saved under its own name (`~2`), and the record lists both; one of them used
    to be fetched for both, and the job recorded complete with a listed file unsaved."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site()

    def wrap(client: SiteClient) -> None:
        real_sections = client.sections

        async def sections(model: int) -> list[Section]:
            out = []
            for s in await real_sections(model):
                gif = next((f for f in s.files if f.name == "final.png"), None)
                out.append(replace(s, files=(*s.files, gif)) if gif else s)
            return out

        client.sections = sections  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1], wrap=wrap)
    assert summary.outcomes == {"a": Outcome.COMPLETE}, summary.reasons
    plot = jobs / "a" / "output" / "Plot 1"
    assert (plot / "final~2.png").read_bytes() == (plot / "final.png").read_bytes()
    [job] = load_sweep(jobs).jobs
    assert record.is_complete(job)
    (plot / "final~2.png").unlink()
    assert not record.is_complete(job)
