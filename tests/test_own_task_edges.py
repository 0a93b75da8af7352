# ruff: noqa: F811  (`memory` is a fixture imported from test_memory)
"""Edges of "know your own task" found by an adversarial review of the rules for a
listing that cannot tell (each test failed before its fix): a poll while gibatch's POST
is in flight pins nothing; one row per model number with no job id; a lost task behind
a newer row leaves no phantom plot; and the local site warms no more simulator workers
than tasks can ever run at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from gibatch import poller as poller_mod
from gibatch.errors import ModelBusy
from gibatch.journal import Journal
from gibatch.memory import UNKNOWN, ModelMemory, Posting
from gibatch.run import Outcome
from gibatch.sim.faults import Faults
from gibatch.sim.server import ThreadedSite
from gibatch.site import SiteClient, TaskRow
from gibatch.steps import Stage, plot
from tests.conftest import (
    FAST_RETRY,
    assert_jobs_match_ledger,
    run_sweep,
    tiny_job_files,
    write_job,
)
from tests.test_memory import HELD, memory, row  # noqa: F401  (memory is a fixture)

# --- 1. a poll while the POST is in flight pins the first row of its type -------------------

def test_unit_poll_during_post_pins_a_browser_plot_as_own(memory: ModelMemory) -> None:
    """A browser plot (11) ran just before gibatch's plot POST (12, HTML answer, no id).
    A poll lands while the POST is in flight (SENT): row 11 is recorded as own.job_id.
    After the answer (ACCEPTED, still that id) the two-new-rows rule never applies:
    the browser's plot is taken for the job's Plot 1."""
    own = memory.expect(plot(1), "p1", {"Galaxy Interaction": "i"})
    own.posting = Posting.SENT
    memory.observe([row(11, "Plot")])          # the poller of another model polls meanwhile
    own.posting = Posting.ACCEPTED              # 200, HTML body: job id None (worker._submit)
    memory.observe([row(11, "Plot"), row(12, "Plot", "Running")])
    memory.observe([row(11, "Plot"), row(12, "Plot")])
    # Either gibatch's own row (12) is known, or it says it cannot tell; never 11.
    assert own.row is None or own.row.job_id != 11 or own.unknown is not None, \
        f"browser task 11 taken as gibatch's own: held {memory.held}"


async def listed(client: SiteClient, seen: Callable[[list[TaskRow]], bool]) -> None:
    """Bounded wait (30 s) until the site's task list satisfies `seen`."""
    for _ in range(600):
        if seen(await client.tasks()):
            return
        await anyio.sleep(0.05)
    raise AssertionError("the site never listed what the test waits for")


def _capture_poller(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    made: list[Any] = []
    original = poller_mod.Poller.__init__

    def init(self: Any, client: SiteClient) -> None:
        original(self, client)
        made.append(self)

    monkeypatch.setattr(poller_mod.Poller, "__init__", init)
    return made


@pytest.mark.timeout(120)
def test_e2e_browser_plot_before_post_with_a_poll_in_flight(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strict site (HTML POST answers, as the real site's body is unknown). Just before
    gibatch's plot 1 POST lands, a browser plot runs and ends on the same model, and a
    poll (any model's) lands while the POST is in flight. The job must not end with the
    browser's plot as its own."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site(strict=True, faults=Faults(browser_step="plot"))
    pollers = _capture_poller(monkeypatch)
    fired = []

    def wrap(client: SiteClient) -> None:
        submit = client.submit

        async def patched(step: Any, model: int, payload: dict[str, Any]) -> int | None:
            if step.stage is Stage.PLOT and not fired:
                fired.append(True)
                site.call(lambda: site.running.site.click("alice", model, "plot"))
                clicked = site.running.site.clicked[-1]
                await listed(client, lambda rows: any(
                    r.job_id == clicked and r.status == "Completed" for r in rows))
                await pollers[0].refresh()  # a poll while gibatch's POST is in flight
            return await submit(step, model, payload)

        client.submit = patched  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1], concurrency=1, wrap=wrap)
    assert fired
    assert summary.outcomes["a"] is Outcome.COMPLETE, summary.reasons
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


# --- 1b. one row per model and no job id: someone's task behind gibatch's is taken as its own

@pytest.mark.timeout(120)
def test_e2e_one_row_listing_without_job_ids(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """One row per model number (a section-3 variation) and HTML POST answers (the real
    site's body is unknown): a browser plot starts the moment gibatch's plot 1 ends, and
    gibatch's first poll comes after that. The browser's row is taken for gibatch's
    own, its section is never counted, and plot 2's predicted name is the browser's."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site(strict=True, one_row=True, faults=Faults(browser_step="plot"))
    fired = []

    def wrap(client: SiteClient) -> None:
        submit = client.submit

        async def patched(step: Any, model: int, payload: dict[str, Any]) -> int | None:
            before = max((r.job_id for r in await client.tasks()), default=0)
            answer = await submit(step, model, payload)
            if step.stage is Stage.PLOT and not fired:
                fired.append(True)
                site.call(lambda: site.running.site.click("alice", model, "plot"))
                # gibatch's first poll comes late (a slow answer, a poll floor): by then
                # its plot ended and the browser's replaced it as the model's only row.
                await listed(client, lambda rows: any(r.job_id > before + 1 for r in rows))
            return answer

        client.submit = patched  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1], concurrency=1, wrap=wrap)
    assert fired
    if summary.outcomes["a"] is Outcome.COMPLETE:  # failing is acceptable; a wrong file is not
        assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


# --- 1d. a lost POST, then a browser task of its type: the only new row of its type -----------

@pytest.mark.timeout(120)
def test_e2e_a_lost_plot_then_a_browser_plot_newer_than_another_models_task(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """Strict site (no job id in POST answers). The site loses gibatch's first plot POST
    (accepted, never listed); just after a POST on the other model number, sent after the
    lost one's answer, has its own, someone starts a plot in the browser on the first.
    That plot is the only new plot row there, and was taken for gibatch's; but job ids
    increase across the site, and it is newer than the task gibatch posted after its
    plot's answer, so it cannot be that plot's. The step runs again and every job ends
    with its own plots."""
    jobs = tmp_path / "jobs"
    for i in range(3):
        write_job(jobs, f"{i}", tiny_job_files(**{"interact.json": {"mass_2": 1.0 + i}}))
    site = make_site(strict=True, faults=Faults(browser_step="plot"))
    site.running.site.faults.script("lost", "/gi/plotgalaxies")
    lost: list[int] = []  # the model number whose plot POST the site lost
    clicked: list[int] = []

    def wrap(client: SiteClient) -> None:
        submit = client.submit

        async def patched(step: Any, model: int, payload: dict[str, Any]) -> int | None:
            after_lost = bool(lost)  # this POST went out after the lost one's answer
            answer = await submit(step, model, payload)
            if step.stage is Stage.PLOT and not lost:
                lost.append(model)
            elif after_lost and model != lost[0] and not clicked:
                # (Run at once if the model is idle, as it is while its lost task is
                # awaited; else when it next is.)
                site.call(lambda: site.running.site.click("alice", lost[0], "plot"))
                clicked.append(lost[0])
            return answer

        client.submit = patched  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1, 2], concurrency=2, wrap=wrap)
    assert lost and clicked and site.running.site.clicked
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


# --- 1e. its row is listed while a POST sent after its answer hangs: not a lost task ----------

@pytest.mark.timeout(120)
def test_e2e_a_row_waiting_on_a_hanging_post_is_not_taken_for_lost(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """Strict site. Model 1's galaxy POST has its answer; model 2's next POST, sent after
    it, hangs at the proxy for longer than the listing grace. Model 1's row, listed
    meanwhile, waits for that answer before it is pinned (the task it brings may bound
    it); that wait is not the site losing model 1's task: no step is run twice."""
    jobs = tmp_path / "jobs"
    for i in range(2):
        write_job(jobs, f"{i}", tiny_job_files(**{"interact.json": {"mass_2": 1.0 + i}}))
    site = make_site(strict=True)
    store = site.running.site.store
    first_answered = anyio.Event()
    first: list[int] = []  # model 1's first task
    hung: list[str] = []

    def wrap(client: SiteClient) -> None:
        submit, tasks = client.submit, client.tasks

        async def patched(step: Any, model: int, payload: dict[str, Any]) -> int | None:
            if model == 2 and not first_answered.is_set():
                await first_answered.wait()
                raise ModelBusy("the test's 409: post again, after model 1's answer",
                                model=2)
            if model == 2 and not hung:
                hung.append(step.name)  # sent after model 1's answer: held past the grace
                await anyio.sleep(FAST_RETRY.listing_grace_s + 1.5)
            answer = await submit(step, model, payload)
            if model == 1 and not first:
                first.append(store.task_count())  # ids count up from 1: its id
                first_answered.set()
            return answer

        async def listing() -> list[TaskRow]:
            rows = await tasks()
            # Until model 2's next POST is out, model 1's row is not listed yet (the
            # site's answer to a poll can lag a POST); then it is, at once.
            return rows if hung else [r for r in rows if r.job_id not in first]

        client.submit = patched  # type: ignore[method-assign]
        client.tasks = listing  # type: ignore[method-assign]

    summary = run_sweep(site, jobs, [1, 2], concurrency=2, wrap=wrap)
    assert first and hung, summary.reasons
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
    events = [e for e in Journal(jobs).events() if e.event == "job-requeued"]
    assert not events, [e.detail for e in events]
    assert store.task_count() == 2 * 6  # every step once


# --- 1c. rule (a) on a task the site lost: a phantom section shifts later plot names ---------

def test_unit_lost_task_behind_a_newer_row_adds_a_phantom_section(memory: ModelMemory) -> None:
    """The POST answered with id 11, but the site lost the task (never listed: the
    `lost` fault; on a full listing nothing says the row 'moved on'). A browser plot
    (12) then runs. Rule (a) applies gibatch's plot as if it ran: held now names two
    new plot sections where the site has one, so the next plot's predicted name is one
    too far."""
    own = memory.expect(plot(1), "p1", {"Galaxy Interaction": "i"})
    own.posting, own.job_id = Posting.ACCEPTED, 11
    memory.observe([row(9, "Galaxy Interaction"), row(12, "Plot")])  # full listing: 11 absent
    assert own.unknown is not None and not own.intact
    # Before anything more is taken, the names are learnt again from the site, which
    # shows one plot section (the browser's): no phantom, and it is nobody's result.
    assert not memory.names_known
    memory.learn_names([*HELD, "Plot 1"])
    plots = sorted(s for s in memory.held if s.startswith("Plot"))
    assert plots == ["Plot 1"], f"site has one plot section; held names {plots}"
    assert memory.held["Plot 1"] == UNKNOWN


# --- 3. warm spawns a simulator worker per CPU, not per model that can ever run ------------

def test_warm_spawns_no_more_workers_than_tasks_can_run(
    make_site: Callable[..., ThreadedSite]
) -> None:
    """One account, one model number: at most one task computes at a time, yet warm
    starts `workers` processes (default: one per CPU), each importing numpy, scipy,
    h5py and pillow (~100 MB, ~1 s of CPU) on every `gibatch run`."""
    site = make_site(model_count=1, warm=True)  # make_site sets workers=2
    runner = site.running.site.runner
    assert runner is not None
    spawned = len(runner._pool._processes or {})
    assert spawned <= 1, f"{spawned} simulator processes for one model number"
