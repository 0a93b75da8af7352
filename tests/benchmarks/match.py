"""Match benchmark: grid search against Optuna's default sampler (TPE) at finding a hidden
job, and the time to score one job-frame-view.

    .venv/bin/python -m tests.benchmarks.match [--seeds 3] [--quick]

A target is rendered from a hidden job (mass ratio, tilt). Every candidate of a 2-D
space (interact.mass_2 log 0.5..4, merge.theta_galaxy_2 0..90) is a real run of the local
site's physics, made on demand and memoised, with small galaxies (300 disk + 60 bulge
stars, 0.4 Gyr, 5 frames) so that the whole benchmark fits a 2-core machine. Closeness
is the distance of the best-scoring job to the hidden values in normalised units (log
mass over the range's log width, tilt over 90 degrees), median over seeds; the grid is
the same for every seed (a k x k lattice, k = floor(sqrt(budget))), Optuna's sampler
is seeded. It prints; it asserts nothing (`tests/test_benchmarks.py` may run --quick).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna

from gibatch import match
from gibatch.jobs import load_sweep
from gibatch.run import Outcome
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from tests.conftest import run_sweep, write_job
from tests.test_match import small_job

# Off every lattice `grid_points` makes for the budgets here (k = 5, 7, 10): a hidden
# point on the grid would hand the grid an exact hit no real target gives.
HIDDEN = (1.7, 37.0)
MASS_RANGE = (0.5, 4.0)
CENTRES = ((45.0, 60.0), (95.0, 40.0))


class Runs:
    """Candidate jobs run on demand on one local site, each (mass, theta) once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.site = ThreadedSite(SiteConfig(data_dir=root / "site", accounts={"alice": "pw"},
                                            workers=2))
        self.done: dict[tuple[float, float], match.Snapshots] = {}

    def snapshots(self, points: list[tuple[float, float]]) -> list[match.Snapshots]:
        todo = sorted({p for p in points if p not in self.done})
        if todo:
            jobs = self.root / f"batch{len(self.done)}"
            for k, (mass, theta) in enumerate(todo):
                files = small_job(theta)
                files["interact.json"]["mass_2"] = mass
                write_job(jobs, f"j{k}", files)
            summary = run_sweep(self.site, jobs, [1, 2])
            assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
            for k, job in enumerate(sorted(load_sweep(jobs).jobs, key=lambda j: int(j.name[1:]))):
                self.done[todo[k]] = match.load_snapshots(match.snapshot_path(job))
        return [self.done[p] for p in points]


def score(snaps: match.Snapshots, target: match.Target) -> float:
    views = [match.axes_view("x", "y"), match.axes_view("x", "z")]
    best = match.best_of(match.score_snapshots(snaps, views, target), match.Metric.SSIM)
    return best.ssim if best is not None and best.ssim is not None else -1.0


def distance(point: tuple[float, float]) -> float:
    width = math.log(MASS_RANGE[1] / MASS_RANGE[0])
    return math.hypot(math.log(point[0] / HIDDEN[0]) / width, (point[1] - HIDDEN[1]) / 90)


def grid_points(budget: int) -> list[tuple[float, float]]:
    k = max(2, math.isqrt(budget))
    masses = np.geomspace(*MASS_RANGE, k)
    return [(round(float(m), 4), round(float(t), 2)) for m in masses
            for t in np.linspace(0, 90, k)]


def best_point(points: list[tuple[float, float]], runs: Runs, target: match.Target
               ) -> tuple[float, float]:
    scores = [score(s, target) for s in runs.snapshots(points)]
    return points[int(np.argmax(scores))]


def optuna_points(budget: int, seed: int, runs: Runs, target: match.Target,
                  batch: int = 2) -> list[tuple[float, float]]:
    """Ask/tell in batches of `batch` (the model numbers busy at once)."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    dists = {"mass": optuna.distributions.FloatDistribution(*MASS_RANGE, log=True),
             "theta": optuna.distributions.FloatDistribution(0, 90)}
    points: list[tuple[float, float]] = []
    while len(points) < budget:
        trials = [study.ask(dists) for _ in range(min(batch, budget - len(points)))]
        asked = [(round(t.params["mass"], 4), round(t.params["theta"], 2)) for t in trials]
        for trial, snaps in zip(trials, runs.snapshots(asked), strict=True):
            study.tell(trial, score(snaps, target))
        points += asked
    return points


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="budgets 4, 8 and one seed")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budgets = (4, 8) if args.quick else (25, 50, 100)
    seeds = 1 if args.quick else args.seeds
    with tempfile.TemporaryDirectory() as tmp:
        runs = Runs(Path(tmp))
        try:
            (hidden,) = runs.snapshots([HIDDEN])
            grid = match.Target(np.zeros((110, 140)), CENTRES, "bench", Path("bench"))
            done = match.render_one(hidden, len(hidden.time_gyr) - 1, match.axes_view("x", "z"),
                                    False, grid)
            assert done is not None
            target = match.Target(done[0], CENTRES, "bench", Path("bench"))
            t0 = time.perf_counter()
            n = 0
            for _ in range(3):
                score(hidden, target)
                n += len(hidden.time_gyr) * 2 * 2
            per = (time.perf_counter() - t0) / n * 1000
            print(f"match time per job-frame-view (with its mirror: 2 renders): {per * 2:.1f} ms"
                  f" on a {target.image.shape[1]}x{target.image.shape[0]} grid, "
                  f"{hidden.position.shape[1]} stars")
            print(f"{'jobs':>5} {'grid distance':>14} {'optuna median':>14}  (normalised; 0 = "
                  "the hidden values)")
            for budget in budgets:
                g = distance(best_point(grid_points(budget), runs, target))
                o = statistics.median(
                    distance(best_point(optuna_points(budget, seed, runs, target), runs,
                                        target)) for seed in range(1, seeds + 1))
                print(f"{budget:>5} {g:>14.3f} {o:>14.3f}")
        finally:
            runs.site.stop()


if __name__ == "__main__":
    main()
