"""`gibatch run` on a site as hard as a real one: replaced results deleted (404), strict
listings (newest first, HTML POST answers, no sizes, no plot_number, no Range), tasks
started "in the browser" between, during and after gibatch's own, every fault at once.
Each sweep must end with every job byte for byte what the site made for it."""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest

from gibatch import transfer
from gibatch.errors import ResultVanished, local_io
from gibatch.jobs import load_sweep
from gibatch.journal import Journal
from gibatch.plan import make_plan
from gibatch.run import Outcome, Summary
from gibatch.sim.faults import Faults
from gibatch.sim.server import ThreadedSite
from gibatch.site import SiteClient
from gibatch.steps import DEFAULT_STAGE_COST_S
from tests.conftest import (
    FAST_RETRY,
    assert_jobs_match_ledger,
    run_sweep,
    tiny_job_files,
    write_job,
)

PLOT_VARIANTS = [{"colour_scheme": "blackonwhite"}, {"x_min": -250}, {"y_min": -260},
                 {"x_max": 240}, {"plot_size": "medium"}, {"y_max": 270}]


def shared_sweep(root: Path, n: int) -> int:
    """`n` jobs sharing galaxies and merge, two interactions between them, plot 1 varied:
    consecutive jobs on one model skip held sections another job may still be
    downloading. Returns the fewest tasks on one model number (the planner's count)."""
    for i in range(n):
        write_job(root, f"{i + 1:02d}", tiny_job_files(**{
            "interact.json": {"mass_2": 1.0 + (i // 2) % 2},
            "plot1.json": PLOT_VARIANTS[i % len(PLOT_VARIANTS)],
        }))
    return make_plan(load_sweep(root).jobs, {1: {}}, DEFAULT_STAGE_COST_S).tasks


def own_tasks(site: ThreadedSite) -> int:
    return site.running.site.store.task_count() - len(site.running.site.clicked)


def assert_all_right(summary: Summary, jobs: Path, site: ThreadedSite) -> None:
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_consecutive_jobs_sharing_held_sections(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], strict: bool
) -> None:
    """The race that lost a third of a clean sweep: the next job's task replacing a
    section a finished job still downloads."""
    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 10)
    site = make_site(strict=strict)
    summary = run_sweep(site, jobs, [1], concurrency=1)
    assert_all_right(summary, jobs, site)
    assert own_tasks(site) == minimum == summary.tasks_submitted


@pytest.mark.slow
def test_strict_site_with_browser_tasks_at_scripted_moments(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 8)
    site = make_site(strict=True)
    faults = site.running.site.faults
    faults.script("browser", "/gi/view_jobs/", times=2)  # between two steps of a job
    faults.script("browser", "/media/")  # during a download
    faults.script("browser", "/gi/plotgalaxies")  # just before gibatch's own POST
    summary = run_sweep(site, jobs, [1, 2])
    assert_all_right(summary, jobs, site)
    clicks = len(site.running.site.clicked)
    assert faults.injected["browser"] == 4 and clicks == 4
    # Each click can force at most one job's whole chain again.
    assert minimum <= own_tasks(site) <= minimum + 6 * clicks + 6  # two models: one chain more


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_every_fault_at_once_on_a_strict_site(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    jobs = tmp_path / "jobs"
    shared_sweep(jobs, 8)
    site = make_site(strict=True, session_lifetime_s=2.0, faults=Faults(
        error_rate=0.1, cut_rate=0.3, post_502_rate=0.3, browser_rate=0.01, seed=11))
    site.running.site.faults.script("browser", "/gi/view_jobs/", times=2)
    # One of each at least, whatever order the requests draw the rates in (their timing).
    site.running.site.faults.script("cut", "/media/")
    site.running.site.faults.script("post_502", "/gi/")
    summary = run_sweep(site, jobs, [1, 2, 3])
    assert_all_right(summary, jobs, site)
    injected = site.running.site.faults.injected
    assert injected.get("cut") and injected.get("post_502") and injected.get("browser")


@pytest.mark.slow
def test_a_partial_file_left_whole_is_renamed_not_requested(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site()
    assert run_sweep(site, jobs, [1]).outcomes["a"] is Outcome.COMPLETE
    # As if killed between the last byte and the rename: the record and one file gone.
    out = jobs / "a" / "output"
    (out / ".gibatch-complete.json").unlink()
    gif = out / "Plot 1" / "animation.gif"
    gif.rename(gif.with_name(gif.name + ".part"))
    tasks = site.running.site.store.task_count()
    summary = run_sweep(site, jobs, [1])
    assert summary.outcomes["a"] is Outcome.COMPLETE, summary.reasons
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)
    assert site.running.site.store.task_count() == tasks
    # Every other file is fetched again into place; the whole .part is only renamed.
    assert summary.requests["download"] == _file_count(out) - 1


def _file_count(out: Path) -> int:
    return sum(1 for p in out.rglob("*") if p.is_file() and not p.name.startswith("."))


@pytest.mark.slow
def test_a_full_disk_fails_the_job_and_stops_the_run(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = tmp_path / "jobs"
    shared_sweep(jobs, 3)
    site = make_site()
    real_write = transfer._Part.write

    def full(self: transfer._Part, data: bytes) -> None:
        # Job 02's own files (not any path containing "02": pytest's numbered base
        # folder, say pytest-302, would make every job's disk full).
        if self.path.relative_to(jobs).parts[0] == "02":  # seen where transfer writes
            with local_io(self.path):
                raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real_write(self, data)

    monkeypatch.setattr(transfer._Part, "write", full)
    summary = run_sweep(site, jobs, [1])
    assert summary.outcomes["01"] is Outcome.COMPLETE, summary.reasons
    assert summary.outcomes["02"] is Outcome.FAILED
    assert "disk full" in summary.reasons["02"] and "02" in summary.reasons["02"]
    assert summary.outcomes["03"] in (Outcome.NOT_RUN, Outcome.FAILED)
    assert summary.exit_code == 1


@pytest.mark.slow
def test_a_bug_in_one_jobs_download_fails_only_that_job(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    jobs = tmp_path / "jobs"
    shared_sweep(jobs, 4)
    site = make_site()
    real_fetch = transfer.fetch

    async def buggy(client: Any, remote: Any, folder: Path, *args: Any) -> Any:
        if folder.parent.parent.name == "02":
            raise ZeroDivisionError("injected bug")
        return await real_fetch(client, remote, folder, *args)

    monkeypatch.setattr("gibatch.run.fetch", buggy)
    with caplog.at_level(logging.ERROR, logger="gibatch"):
        summary = run_sweep(site, jobs, [1, 2])
    assert summary.outcomes["02"] is Outcome.FAILED
    assert {o for j, o in summary.outcomes.items() if j != "02"} == {Outcome.COMPLETE}
    assert "internal error" in summary.reasons["02"]
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text
    events = [e for e in Journal(jobs).events() if e.event == "job-failed"]
    assert events and "Traceback" in (events[0].detail or "")
    assert summary.exit_code == 1


@pytest.mark.slow
@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_tasks_the_site_accepts_and_loses_are_posted_again(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], strict: bool
) -> None:
    """An accepted POST whose task is never listed: bounded wait, then posted again."""
    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 3)
    site = make_site(strict=strict)
    faults = site.running.site.faults
    faults.script("lost", "/gi/galactic")  # the very first task: the job's first step
    faults.script("lost", "/gi/plotgalaxies")
    summary = run_sweep(site, jobs, [1], concurrency=1)
    assert_all_right(summary, jobs, site)
    assert faults.injected["lost"] == 2
    assert own_tasks(site) == minimum
    assert summary.tasks_submitted == minimum + 2


@pytest.mark.slow
def test_a_file_that_vanishes_mid_download(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Half of a file arrives, then a browser task replaces its section: the resumed
    request meets 404, and the job runs what is missing again. One job, so that the
    model is idle when the click comes and its task starts at once; a plot's file, so
    that the cut comes in the job's final download (the interaction's files are fetched
    while the plots still run: see test_run)."""
    from gibatch.sim import app

    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 1)
    site = make_site()
    faults = site.running.site.faults
    real_cut = app._cut_download

    async def cut_then_click(request: Any, path: Path) -> Any:
        response = await real_cut(request, path)
        site.running.site.click("alice", 1, "galaxy1")  # replaces every section at once
        return response

    monkeypatch.setattr(app, "_cut_download", cut_then_click)
    faults.script("cut", "final.png")
    summary = run_sweep(site, jobs, [1], concurrency=1)
    assert_all_right(summary, jobs, site)
    assert faults.injected["cut"] == 1 and len(site.running.site.clicked) == 1
    # The click's galaxy 1 cleared all but galaxy 2: the rest of the chain runs again.
    assert own_tasks(site) == minimum + 5
    events = [e.event for e in Journal(jobs).events()]
    assert events.count("job-requeued") == 1


def _on_submit(site: ThreadedSite, before: Callable[[Any, int], Any] | None = None,
               after: Callable[[Any, int], Any] | None = None) -> Callable[[Any], None]:
    """A `run_sweep` wrap: `before(step, model)` / `after(step, model)` around each task
    POST (they run in the client's event loop; the site's state is reached through
    `site.call`)."""
    def wrap(client: Any) -> None:
        real = client.submit

        async def submit(step: Any, model: int, payload: Any) -> Any:
            if before is not None:
                await before(step, model)
            job_id = await real(step, model, payload)
            if after is not None:
                await after(step, model)
            return job_id

        client.submit = submit
    return wrap


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_one_row_listings_and_a_click_the_moment_own_task_ends(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """view_jobs lists each model's newest task only. gibatch sees its interaction
    running, and someone clicks then: the click waits for the model and starts the
    moment the interaction ends, so gibatch's row is never listed again. Its result
    cannot be told, so it is not taken; the step runs again. (gibatch polled for that
    row forever.)"""
    from gibatch.site import TaskState

    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 2)
    site = make_site(one_row=True)
    web = site.running.site
    clicks: list[int] = []

    def wrap(client: Any) -> None:
        real = client.tasks

        async def tasks() -> Any:
            rows = await real()
            if not clicks and any(r.job_type == "Galaxy Interaction" and
                                  r.state is TaskState.ACTIVE for r in rows):
                clicks.append(1)
                site.call(lambda: web.click("alice", 1, "galaxy2"))  # queued: model busy
            return rows

        client.tasks = tasks

    summary = run_sweep(site, jobs, [1], concurrency=1, wrap=wrap)
    assert_all_right(summary, jobs, site)
    assert len(web.clicked) == 1
    # The click's galaxy 2 cleared merge and interaction: the three run again.
    assert own_tasks(site) == minimum + 3
    assert any("is no longer listed" in (e.detail or "") for e in Journal(jobs).events())


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_plot_run_elsewhere_just_before_own_plot_post_is_not_taken_for_it(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """HTML answers (no job id), and someone's plot ran to its end on the model just
    before gibatch's plot POST: two new plot rows, either of which may be gibatch's. A
    plot appends a section, so nothing forced a redo: the job's Plot 1 was the browser's
    (found by an independent implementation of the site). Now neither is taken."""
    import threading

    from gibatch.steps import Stage

    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 1)
    site = make_site(strict=True)
    web = site.running.site
    ended = threading.Event()
    real_end = web._task_ended

    def task_ended(task: Any, status: Any) -> None:
        real_end(task, status)
        if task.job_id in web.clicked:
            ended.set()

    web._task_ended = task_ended  # type: ignore[method-assign]
    web.runner._on_end = task_ended  # type: ignore[union-attr]

    async def plot_elsewhere_first(step: Any, model: int) -> None:
        if step.stage is not Stage.PLOT or web.clicked:
            return
        site.call(lambda: web.click("alice", model, "plot"))
        assert await anyio.to_thread.run_sync(ended.wait, 30)  # until the plot has ended

    summary = run_sweep(site, jobs, [1], concurrency=1,
                        wrap=_on_submit(site, before=plot_elsewhere_first))
    assert_all_right(summary, jobs, site)
    assert own_tasks(site) == minimum + 1  # the plot whose row could not be told, again
    assert any("did not say which is ours" in (e.detail or "") for e in Journal(jobs).events())


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("strict", [False, True], ids=["normal", "strict"])
def test_a_site_that_queues_posts_behind_browser_tasks(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], strict: bool
) -> None:
    """A site in front of a task queue takes a POST for a busy model number (no 409) and
    runs it when the tasks before it have ended. A browser task started just as gibatch
    POSTs each step runs first, replacing or clearing what gibatch's task then reads
    (a merge before its plot leaves no interaction to plot). No job may keep a result
    made on the browser's inputs, nor fail for a task that failed on them."""
    jobs = tmp_path / "jobs"
    minimum = shared_sweep(jobs, 6)
    site = make_site(strict=strict, queue=True, faults=Faults(seed=5))
    faults = site.running.site.faults
    # Not "/gi/galactic": its first request is the GET that fetches the CSRF token, whose
    # click lands on a random model number some milliseconds before any POST.
    for page in ("/gi/galacticsmerge", "/gi/interactgalaxies", "/gi/plotgalaxies",
                 "/gi/plotgalaxies", "/gi/view_jobs/"):
        faults.script("browser", page)
    summary = run_sweep(site, jobs, [1, 2])
    assert_all_right(summary, jobs, site)
    store = site.running.site.store
    clicks = set(site.running.site.clicked)
    tasks = {t.job_id: t for t in store.tasks("alice")}
    # The click on each of the four POSTs went first, and gibatch's task, taken in the
    # same turn of the site's loop (before the click's task could end), waited behind it.
    behind = [c for c in clicks if c + 1 in tasks and c + 1 not in clicks
              and tasks[c + 1].model == tasks[c].model
              and tasks[c + 1].submitted <= (store.finished(c) or "")]
    table = [(t.job_id, t.model, t.step, t.status.value, t.submitted, store.finished(t.job_id),
              t.job_id in clicks) for t in tasks.values()]
    assert len(clicks) == 5 and len(behind) >= 4, table
    assert minimum <= own_tasks(site) <= minimum + 6 * len(clicks) + 6


STUCK_RETRY = replace(FAST_RETRY, stuck_after_s=10.0)  # a loaded machine: tasks of 3 s


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("whose", ["own", "browser"])
def test_a_task_that_never_ends_sets_its_model_aside(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], whose: str
) -> None:
    """A site's worker dies on a task: it stays Running for ever and holds its model
    number (the `stuck` fault). Whether it is gibatch's own interaction or a browser's
    task found there at the start, gibatch gives up on that model after
    `stuck_after_s`, and another model number runs every job: the run ends, complete."""
    jobs = tmp_path / "jobs"
    for i in range(3):
        write_job(jobs, f"{i + 1}", tiny_job_files(**{"interact.json": {"mass_2": 1.0 + i}}))
    site = make_site(strict=True, warm=True)
    faults = site.running.site.faults
    if whose == "own":
        faults.script("stuck", "task:interact")
    else:
        faults.script("stuck", "task:")
        site.call(lambda: site.running.site.click("alice", 1, "galaxy1"))
    summary = run_sweep(site, jobs, [1, 2], retry=STUCK_RETRY)
    assert_all_right(summary, jobs, site)
    [stuck] = site.running.site.stuck
    model = site.running.site.store.task(stuck)
    assert model is not None and list(summary.models_refused) == [model.model]
    # The browser's task holds model 1 from the start: it gives up on the task, or the
    # other model has done every job first (the reserved-job test below makes the wait).
    why = summary.models_refused[model.model]
    assert "has not ended" in why if whose == "own" else (
        "started elsewhere" in why or "still busy" in why)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_job_undone_by_browser_tasks_more_often_than_unexplained_losses_allow(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """Someone clears the model in the browser each time the job downloads its plot, five
    times: each is someone else's doing, seen in the task list, so the job runs again
    each time (it used to fail after three, as if the site kept deleting its results);
    the results that vanish with no task to explain them still fail a job after three."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site(strict=True, faults=Faults(browser_step="galaxy1"))
    site.running.site.faults.script("browser", "final.png", times=5)
    summary = run_sweep(site, jobs, [1])
    assert summary.outcomes == {"a": Outcome.COMPLETE}, summary.reasons
    assert len(site.running.site.clicked) == 5
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)

    # A site that answers 404 for a file it lists, no task to explain it.
    write_job(jobs, "b", tiny_job_files(**{"interact.json": {"mass_2": 2.0}}))
    gone = []

    def wrap(client: SiteClient) -> None:
        real_open = client.open_file

        @asynccontextmanager
        async def open_file(url: str, offset: int) -> AsyncIterator[Any]:
            if url.endswith("/final.png"):
                gone.append(url)
                raise ResultVanished(f"{url} answered 404: the result is gone")
            async with real_open(url, offset) as resp:
                yield resp

        client.open_file = open_file  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1], wrap=wrap)
    assert summary.outcomes["b"] is Outcome.FAILED and gone
    assert summary.reasons["b"].startswith("results kept vanishing (4 times)")


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_job_reserved_for_a_model_found_stuck_at_the_start_still_runs(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """Model 1 holds most of job a (a first run), so the next run reserves a for it; a
    task started elsewhere and stuck there makes model 1 give up while it settles. The
    job goes back to the queue, and model 2, idle by then, must still be there to run
    it (it had ended its work as soon as the queue was empty)."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site(strict=True, warm=True)
    assert run_sweep(site, jobs, [1]).outcomes == {"a": Outcome.COMPLETE}
    plot1 = jobs / "a" / "plot1.json"
    plot1.write_text(json.dumps({**json.loads(plot1.read_text()), "plot_size": "medium"}))
    site.running.site.faults.script("stuck", "task:")
    site.call(lambda: site.running.site.click("alice", 1, "galaxy1"))
    summary = run_sweep(site, jobs, [1, 2], retry=STUCK_RETRY)
    assert list(summary.models_refused) == [1]
    assert_all_right(summary, jobs, site)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_a_run_with_nothing_left_to_do_does_not_wait_on_a_stuck_task(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """A first run leaves its task stuck on the model that took the job (another model
    completed it). The next run adopts it there, and may wait up to `stuck_after_s` for
    it; once every job is done elsewhere, nothing is worth that wait: the run ends."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site(strict=True, warm=True)
    site.running.site.faults.script("stuck", "task:interact")
    assert run_sweep(site, jobs, [1, 2], retry=STUCK_RETRY).outcomes == {
        "a": Outcome.COMPLETE}
    # Model 1 or 2: whichever read its sections first took the job (two answers racing).
    [stuck] = site.running.site.stuck
    task = site.running.site.store.task(stuck)
    assert task is not None
    write_job(jobs, "b", tiny_job_files(**{"interact.json": {"mass_2": 3.0}}))
    started = time.monotonic()
    summary = run_sweep(site, jobs, [1, 2], retry=replace(FAST_RETRY, stuck_after_s=600.0))
    assert summary.outcomes["b"] is Outcome.COMPLETE, summary.reasons
    assert time.monotonic() - started < 120  # not the 600 s of the stuck task's wait
    assert list(summary.models_refused) == [task.model], summary.models_refused
    assert "still busy" in summary.models_refused[task.model]
