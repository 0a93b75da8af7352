"""The indexed pick (`PendingJobs.take_best`) makes exactly the choices of the plain rule
(`holdings.best_job`: the most held site time, ties to the earliest), on sweeps built to
share galaxies, merges, interactions and plots in every combination, with holdings that
evolve as on a real model, jobs sent back to the front, and odd costs (zeros, ties)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from gibatch.holdings import (
    FAILED_MARK,
    Holdings,
    after_task,
    best_job,
    held_section,
    new_section,
)
from gibatch.jobs import Job, load_sweep
from gibatch.memory import UNKNOWN
from gibatch.pending import PendingJobs
from gibatch.plan import make_plan
from gibatch.steps import DEFAULT_STAGE_COST_S, Stage
from tests.conftest import tiny_job_files, write_job


@pytest.fixture(scope="module")
def sharing_jobs(tmp_path_factory: pytest.TempPathFactory) -> list[Job]:
    """72 jobs drawn from few values per step, in a shuffled order: much is shared."""
    root = tmp_path_factory.mktemp("pending") / "jobs"
    rng = random.Random(5)
    for k in range(72):
        changes = {
            "galaxy1.json": {"disk": {"number_of_particles": 10 + rng.choice((0, 1))}},
            "galaxy2.json": {"bulge": {"number_of_particles": 10 + rng.choice((0, 1))}},
            "merge.json": {"theta_galaxy_2": rng.choice((0, 45))},
            "interact.json": {"mass_2": rng.choice((1.0, 2.0))},
            "plot1.json": {"x_min": rng.choice((-500, -400, -300))},
            "plot2.json": {"y_min": rng.choice((-500, -400))},
        }
        files = tiny_job_files(**changes)
        for name in ("galaxy1.json", "galaxy2.json"):  # nested keys: merge by hand
            key = next(iter(changes[name]))
            files[name] = {**files[name], key: {**files[name][key], **changes[name][key]}}
        write_job(root, f"{k:03d}", files)
    return load_sweep(root).jobs


COSTS = [
    DEFAULT_STAGE_COST_S,
    {Stage.GALAXY: 1.0, Stage.MERGE: 1.0, Stage.INTERACT: 1.0, Stage.PLOT: 1.0},
    {Stage.GALAXY: 0.0, Stage.MERGE: 2.0, Stage.INTERACT: 0.0, Stage.PLOT: 1.0},
    {Stage.GALAXY: 3.0, Stage.MERGE: 0.5, Stage.INTERACT: 7.0, Stage.PLOT: 0.0},
]


def run_on(held: Holdings, job: Job, rng: random.Random) -> Holdings:
    """The model's holdings after `job` ran on it as the worker runs it: held steps
    skipped, a rare task that fails (the job stops) or runs on inputs a foreign task
    changed (its result and everything after it unknown)."""
    disturbed = False
    for step in job.steps:
        if held_section(held, job, step) is not None:
            continue
        fate = rng.random()
        disturbed = disturbed or fate < 0.05
        completed = fate > 0.03
        held = after_task(held, step, new_section(held, step),
                          UNKNOWN if disturbed else job.lineage[step], completed)
        if not completed:
            break
    return held


@pytest.mark.parametrize("cost", COSTS, ids=["default", "equal", "zeros", "odd"])
@pytest.mark.parametrize("seed", range(4))
def test_the_index_picks_what_the_scan_picks(
        sharing_jobs: list[Job], cost: dict[Stage, float], seed: int) -> None:
    rng = random.Random(seed)
    order = list(sharing_jobs)
    rng.shuffle(order)
    scan: list[Job] = list(order)
    index = PendingJobs(order)
    models: dict[int, Holdings] = {m: {} for m in range(3)}
    picks = 0
    while scan:
        model = rng.randrange(3)
        expected = scan.pop(best_job(scan, models[model], cost))
        got = index.take_best(models[model], cost)
        assert got is expected, f"pick {picks} on model {model}"
        picks += 1
        if rng.random() < 0.1:  # sent back to the front, as a requeued job
            scan.insert(0, expected)
            index.appendleft(expected)
            continue
        models[model] = run_on(models[model], expected, rng)
    assert picks >= len(sharing_jobs) and not index
    assert index.take_best({}, cost) is None


def test_plans_agree_with_the_plain_rule(sharing_jobs: list[Job]) -> None:
    """make_plan now picks from the index; replay it with the scan, pick by pick."""
    held: dict[int, Holdings] = {1: {}, 2: {"Galaxy 1": FAILED_MARK}, 3: {}}
    plan = make_plan(sharing_jobs, held, DEFAULT_STAGE_COST_S)
    scan = list(sharing_jobs)
    state = {m: dict(h) for m, h in held.items()}
    by_name = {j.name: j for j in sharing_jobs}
    for a in sorted(plan.assignments, key=lambda a: (a.start_s, a.model)):
        job = scan.pop(best_job(scan, state[a.model], DEFAULT_STAGE_COST_S))
        assert job.name == a.job
        for step in a.run:
            state[a.model] = after_task(state[a.model], step, new_section(state[a.model], step),
                                        by_name[a.job].lineage[step], completed=True)
    assert len(plan.assignments) == len(sharing_jobs)
    assert plan.tasks < plan.job_steps  # the sweep does share work


def test_queue_order_and_errors(sharing_jobs: list[Job], tmp_path: Path) -> None:
    a, b, c = sharing_jobs[:3]
    pending = PendingJobs([a, b])
    pending.appendleft(c)
    assert list(pending) == [c, a, b] and len(pending) == 3
    with pytest.raises(ValueError, match="already pending"):
        pending.append(a)
