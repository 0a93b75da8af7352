"""`gibatch search` as a real process on its embedded site: killed with SIGKILL mid-search
and run again, the study goes on with no trial lost or run twice, and its best trial
lands near the hidden job the target was rendered from."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import optuna
import pytest
from PIL import Image

from gibatch import match, record
from gibatch.jobs import load_sweep
from gibatch.run import Outcome
from gibatch.search import JOB_PREFIX, SEARCH_DIR, STUDY_FILE
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from tests.conftest import gibatch, run_sweep, write_job
from tests.test_match import small_job

HIDDEN_MASS_2, HIDDEN_THETA = 2.0, 50.0
# The target is the hidden job at 0.3 Gyr (frame 2 of 5), just after pericentre, seen
# along y: the centres are close (0.6 kpc a pixel), galaxy 2's disk spans many pixels,
# and the tilt moves the score about as much as the mass ratio does (SSIM 0.88-0.94 over
# 0-90 degrees, 0.86-0.94 over mass 1.4-2.8). At the last frame (0.6 Gyr) galaxy 2 is a
# few pixels wide: the tilt moved the score 0.03 against the mass's 0.12, and 14 trials
# found the mass but not the tilt (7 of 24 runs within 10 degrees, some 40 off).
HIDDEN_FRAME = 2
BUDGET = 40
# Measured offline with this budget (the trials' own jobs and scores; seeds 1-8, asked
# two at a time, one as each slot frees, and killed after 3 told: 24 runs; the
# simulator's common random numbers make a trial's score follow its parameters, not
# its stars' draws): the best trial's tilt within 9 degrees of the hidden one (median
# 4) and its mass ratio within a factor 1.1; this test, 3 runs: 5, 8 and 5 degrees,
# factors 1.04, 1.02 and 1.1. Re-measured when the restricted fields began to respond
# to tidal heating (galaxy 2 here swells 4 % by the target's frame): this test, 17
# runs, median 5 degrees, 16 within 10, one at 18 (factors within 1.1); before that
# change, 8 runs in the same hour: median 5, one at 14.8. The kill's timing decides
# which trials the sampler sees first, and now and then a run settles 15-18 degrees
# off, with either physics (once 20.8, in CI). With 40 trials, 12 runs: median 3.1
# degrees, at most 13.1 (mass within a factor 1.06). Asserted: 20 degrees, a factor
# 1.2. The search takes 40-70 s here, with 2 busy cores.
THETA_TOL_DEG = 20.0
MASS_FACTOR_TOL = 1.2
SPACE = """
"interact.mass_2" = {low = 0.5, high = 4.0, log = true}

[merge]
theta_galaxy_2 = {low = 0, high = 90}
"""


def hidden_target(tmp_path: Path) -> tuple[Path, str]:
    """A render of the hidden job at HIDDEN_FRAME, as an observer would be given it."""
    root = tmp_path / "hidden"
    files = small_job(HIDDEN_THETA)
    files["interact.json"]["mass_2"] = HIDDEN_MASS_2
    write_job(root, "hidden", files)
    site = ThreadedSite(SiteConfig(data_dir=tmp_path / "hidden-site",
                                   accounts={"alice": "pw"}, workers=1))
    try:
        assert run_sweep(site, root, [1]).outcomes == {"hidden": Outcome.COMPLETE}
    finally:
        site.stop()
    job = load_sweep(root).jobs[0]
    snaps = match.load_snapshots(match.snapshot_path(job))
    centres = ((45.0, 60.0), (95.0, 40.0))
    grid = match.Target(np.zeros((110, 140)), centres, "none", Path("none"))
    done = match.render_one(snaps, HIDDEN_FRAME, match.axes_view("x", "z"), False, grid)
    assert done is not None
    path = tmp_path / "observed.png"
    Image.fromarray((done[0] * 255).astype(np.uint8)).save(path)
    return path, ",".join(f"{v:g}" for c in centres for v in c)


def study_trials(jobs: Path) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
        str(jobs / ".gibatch" / SEARCH_DIR / STUDY_FILE)))
    summaries = optuna.get_all_study_summaries(storage)
    if not summaries:  # the command has not created it yet
        return []
    (summary,) = summaries
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials()


def wait_for_told(jobs: Path, count: int, deadline_s: float) -> None:
    """Bounded wait until the study holds `count` finished trials (a condition)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if (jobs / ".gibatch" / SEARCH_DIR / STUDY_FILE).exists() and sum(
                t.state.is_finished() for t in study_trials(jobs)) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} trials told within {deadline_s} s")


THETA = '"merge.theta_galaxy_2" = {low = 0, high = 90}\n'
MASS = '"interact.mass_2" = {low = 0.5, high = 3}\n'


def tiny_search(tmp_path: Path, space: str) -> tuple[dict[str, Any], list[Any], match.Target]:
    """A tiny base job, the dimensions of `space` (TOML) over it and a small target: what
    a `Search` needs, for tests that drive one directly."""
    from gibatch import match_settings, search
    from gibatch import sweep as sw
    from tests.conftest import tiny_job_files

    write_job(tmp_path, "base", tiny_job_files())
    base = sw.read_base(tmp_path / "base")
    (tmp_path / "space.toml").write_text(space)
    dims = search.load_space(tmp_path / "space.toml", base)
    pixels = np.zeros((48, 64), np.uint8)
    pixels[10:20, 10:20] = 200
    Image.fromarray(pixels).save(tmp_path / "t.png")
    target = match.load_target(tmp_path / "t.png",
                               match_settings.parse_centres("12,12,40,30"))
    return base, dims, target


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_search_resumes_after_kill_9_and_finds_the_hidden_job(tmp_path: Path) -> None:
    target, centres = hidden_target(tmp_path)
    base = tmp_path / "base"
    write_job(tmp_path, "base", small_job(0))
    (tmp_path / "space.toml").write_text(SPACE)
    jobs = tmp_path / "found"
    args = ("search", "--jobs", str(jobs), "--base", str(base), "--space",
            str(tmp_path / "space.toml"), "--target", str(target), "--centres", centres,
            "--budget", str(BUDGET), "--models", "1-2", "--seed", "1")
    env = {"GIBATCH_LOCK_DIR": str(tmp_path / "locks")}
    log = tmp_path / "search.log"
    first = gibatch(log, *args, env=env)
    try:  # killed while trials are both told and in flight
        wait_for_told(jobs, 3, deadline_s=240)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    told_before = [t for t in study_trials(jobs) if t.state.is_finished()]
    assert told_before and len(told_before) < BUDGET, log.read_text()

    second = gibatch(log, *args, env=env)
    second.wait(timeout=400)
    out = log.read_text()
    assert second.returncode == 0, out

    trials = study_trials(jobs)
    # no trial lost: exactly the budget, numbered without gaps, each told a score
    assert [t.number for t in trials] == list(range(BUDGET)), out
    assert all(t.state is optuna.trial.TrialState.COMPLETE for t in trials), out
    # those told before the kill are unchanged
    assert {t.number: t.value for t in told_before} == {
        t.number: t.value for t in trials if t.number in {b.number for b in told_before}}
    # each trial is a complete job folder with the trial's own parameters
    for t in trials:
        job = next(j for j in load_sweep(jobs).jobs if j.name == f"{JOB_PREFIX}{t.number:04d}")
        assert record.is_complete(job)
        files = {p.stem: json.loads(p.read_text()) for p in job.path.glob("*.json")}
        assert files["interact"]["mass_2"] == t.params["interact.mass_2"]
        assert files["merge"]["theta_galaxy_2"] == t.params["merge.theta_galaxy_2"]
    # none run twice: one interaction task per trial on the site (a job the kill left
    # on a model, its task running or its results downloaded but not yet recorded,
    # stays with it: its sections are held until its record is written)
    with sqlite3.connect(jobs / ".gibatch" / "site" / "site.db") as db:
        (interactions,) = db.execute(
            "SELECT COUNT(*) FROM tasks WHERE job_type LIKE '%nteract%'").fetchone()
    assert interactions == BUDGET, out
    # and the best trial lands near the hidden values
    best = max(trials, key=lambda t: t.value or 0.0)
    mass, theta = best.params["interact.mass_2"], best.params["merge.theta_galaxy_2"]
    assert abs(math.log(mass / HIDDEN_MASS_2)) < math.log(MASS_FACTOR_TOL), (best.params, out)
    assert abs(theta - HIDDEN_THETA) < THETA_TOL_DEG, (best.params, out)
    assert f"trials told {BUDGET}/{BUDGET}" in out


def test_a_trial_killed_inside_ask_gets_its_missing_parameters(tmp_path: Path) -> None:
    """Optuna stores an asked trial's parameters one by one: a kill in between leaves a
    running trial with some missing. Resumed, it gets them from the sampler, and its job
    folder holds every one (not the base job's value for the missing ones)."""
    from gibatch import match_settings, search

    base, dims, target = tiny_search(tmp_path, THETA + MASS)
    finder = search.Search(tmp_path / "found", base, dims, target, match_settings.Settings(),
                           budget=4, seed=1)
    try:
        storage = finder.study._storage
        trial_id = storage.create_new_trial(finder.study._study_id)
        optuna.trial.Trial(finder.study, trial_id)._suggest(dims[0].key, dims[0].distribution)
        (cut,) = finder.study.get_trials()
        assert set(cut.params) == {dims[0].key}
        job = finder._job_of(cut)
        (whole,) = finder.study.get_trials()
        assert set(whole.params) == {d.key for d in dims}
        assert whole.params[dims[0].key] == cut.params[dims[0].key]
        files = {p.stem: json.loads(p.read_text()) for p in job.path.glob("*.json")}
        assert files["interact"]["mass_2"] == whole.params["interact.mass_2"]
        assert files["merge"]["theta_galaxy_2"] == whole.params["merge.theta_galaxy_2"]
    finally:
        finder.close()


def test_a_resumed_search_asks_new_points(tmp_path: Path) -> None:
    """Resumed with the same seed, the search does not ask again the random points it
    asked before the kill (its sampler is seeded by the seed and the trials so far), and
    the same history gives the same points."""
    from gibatch import match_settings, search

    base, dims, target = tiny_search(tmp_path, THETA)

    def asked(root: Path, count: int) -> list[float]:
        """Start (or resume) the search in `root`, ask `count` trials, stop."""
        finder = search.Search(root, base, dims, target, match_settings.Settings(),
                               budget=12, seed=1)
        try:
            for _ in range(count):
                finder._ask()
            return [t.params[dims[0].key] for t in finder.study.get_trials()]
        finally:
            finder.close()

    first = asked(tmp_path / "a", 2)
    resumed = asked(tmp_path / "a", 2)
    assert resumed[:2] == first and not set(resumed[2:]) & set(first), resumed
    assert asked(tmp_path / "b", 2) == first  # a new study keeps the seed's points
    assert asked(tmp_path / "b", 2) == resumed  # and the same history, the same ones


def test_trials_a_kill_left_running_are_queued_before_the_run_starts(
        tmp_path: Path, make_site: Any) -> None:
    """A resumed search queues every trial a kill left running before its scheduler
    starts, even when an earlier one must first be scored (a thread): the start-of-run
    reservation, which keeps a trial with the model holding its task, must see them all.
    (Queued later, the first free model took such a trial and ran its tasks again: CI's
    kill -9 test saw 15 interactions for 14 trials.)"""
    from gibatch import match_settings, search
    from gibatch.jobs import Sweep
    from gibatch.journal import Journal
    from gibatch.run import Options, Scheduler
    from gibatch.site import SiteClient, Timeouts
    from tests.conftest import FAST_RETRY

    base, dims, target = tiny_search(tmp_path, THETA)
    root = tmp_path / "found"
    site = make_site()

    def finder() -> search.Search:
        return search.Search(root, base, dims, target, match_settings.Settings(), budget=2,
                             seed=1)

    first = finder()
    try:  # the state a kill leaves: trial 0's job complete but untold, trial 1 queued
        first._ask()
        assert run_sweep(site, root, [1]).outcomes == {f"{JOB_PREFIX}0000": Outcome.COMPLETE}
        first._ask()
    finally:
        first.close()

    second = finder()
    starts: list[dict[str, object]] = []

    def listen(event: str, fields: dict[str, object]) -> None:
        if event == "run-start":
            starts.append(fields)
        second.notify(event, fields)

    async def main() -> None:
        journal = Journal(root)
        try:
            async with SiteClient(site.running.url, "alice", "pw", retry=FAST_RETRY,
                                  timeouts=Timeouts(read_s=2.0, page_s=5.0)) as client:
                scheduler = Scheduler(client, Sweep(root, [], []), Options(root, [1, 2]),
                                      journal, listen)
                await search.run_search(second, scheduler, 2)
        finally:
            journal.close()

    try:
        anyio.run(main)
        trials = second.study.get_trials()
    finally:
        second.close()
    assert [s["jobs"] for s in starts] == [1]  # trial 1 queued when the run started
    assert [t.state.is_finished() for t in trials] == [True, True]
