"""Match benchmark: grid search against Optuna's default sampler (TPE) at finding a hidden
job, the score landscape in tilt, and the time to score one job-frame-view.

    .venv/bin/python -m tests.benchmarks.match [--seeds 3] [--quick] [--workers 2]
                                               [--disk 1000] [--sweep-jobs 20]

The space is 2-D: interact.mass_2 (log, 0.5..4) and merge.theta_galaxy_2 (0..90). Every
candidate is run on demand (and memoised) by the local site's own task functions in a
process pool, without the HTTP round trips: galaxy 2 passes galaxy 1 prograde
(pericentre ~30 kpc at 0.25 Gyr), so that by the target's time (0.5 Gyr) both galaxies
have tails and galaxy 2's tilt shows in its own.

The target is what an observation would be: the hidden job (mass 1.7, tilt 37, off every
lattice the grid uses) run again with four times the stars, so it shares no shot noise
with any candidate, and drawn in the x-y plane at 0.5 Gyr. (The first version of this
benchmark drew the hidden job's own last frame in x-z after 0.4 Gyr of a plunging orbit:
the centres were 3 kpc apart in projection, the transform zoomed onto a few dozen stars,
and the score was flat in tilt.)

Closeness is the distance of the best-scoring job to the hidden values in normalised
units (log mass over the range's log width, tilt over 90 degrees), median over seeds; the
grid is the same for every seed (k x k, k = floor(sqrt(budget))); Optuna's sampler is
seeded and asks two trials at a time (two model numbers).

Times: ms per job-frame-view with skimage's SSIM and with the scorer's own, side by
side; and `match_jobs` itself on --sweep-jobs complete jobs of 40 frames and 6 views
(pool, cache and HDF5 reads included), extrapolated to 500 jobs, scoring every frame
and coarse to fine (`match.frame_search`). Coarse to fine against every frame on a
4 x 4 grid of 40-frame jobs: whether the ranking and each job's best render are the
same, and the scoring time. It prints; it asserts nothing (`tests/test_benchmarks.py`
runs --quick).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from gibatch import match, record
from gibatch.children import process_pool
from gibatch.jobs import load_sweep
from gibatch.sim import tasks
from gibatch.transfer import FileRecord
from tests.conftest import write_job
from tests.test_match import small_job

Point = tuple[float, float]  # (mass_2, theta_galaxy_2)

HIDDEN: Point = (1.7, 37.0)  # off the k = 5, 7, 10 lattices of grid_points
MASS_RANGE = (0.5, 4.0)
TILTS = (0.0, 15.0, 30.0, 37.0, 45.0, 60.0, 75.0, 90.0)  # the landscape's rows
CENTRES = ((45.0, 60.0), (95.0, 40.0))
SHAPE = (110, 140)
TARGET_FRAME = 5  # 0.5 Gyr: after pericentre, tails out
TARGET_STARS_FACTOR = 4
VIEWS = [match.axes_view("x", "y"), match.axes_view("x", "z")]  # the plots' own


def job_files(point: Point, disk: int, frames: int = 11) -> dict[str, dict[str, Any]]:
    """The tests' passage (galaxy 2 from (100, 0, 0) kpc at (-300, 150, 0) km/s), 1 Gyr."""
    return small_job(point[1], point[0], disk, 1.0, frames)


def simulate(point: Point, disk: int, frames: int = 11) -> match.Snapshots:
    """One job through the site's galaxy, merge and interaction tasks (restricted physics)."""
    with tempfile.TemporaryDirectory() as tmp:
        return match.load_snapshots(simulate_into(job_files(point, disk, frames), Path(tmp)))


def simulate_into(files: dict[str, dict[str, Any]], folder: Path) -> Path:
    """Run the job's tasks in `folder`; the path of its snapshots."""
    out = {name: folder / name for name in ("g1", "g2", "merge", "interact")}
    for path in out.values():
        path.mkdir(parents=True)
    tasks.run_galaxy(files["galaxy1.json"], out["g1"])
    tasks.run_galaxy(files["galaxy2.json"], out["g2"])
    tasks.run_merge(files["merge.json"], out["g1"], out["g2"], out["merge"])
    tasks.run_interact(files["interact.json"], out["merge"], out["interact"])
    return out["interact"] / match.SNAPSHOT_FILE


class Runs:
    """Candidates run on demand in a process pool, each (mass, theta) once."""

    def __init__(self, disk: int, workers: int, frames: int = 11) -> None:
        self.disk, self.frames = disk, frames
        self.pool = process_pool(workers)
        self.done: dict[Point, match.Snapshots] = {}
        self.seconds = 0.0

    def snapshots(self, points: Sequence[Point]) -> list[match.Snapshots]:
        todo = sorted({p for p in points if p not in self.done})
        t0 = time.perf_counter()
        for p, snaps in zip(todo, self.pool.map(simulate, todo, [self.disk] * len(todo),
                                                [self.frames] * len(todo)), strict=True):
            self.done[p] = snaps
        self.seconds += time.perf_counter() - t0
        return [self.done[p] for p in points]


def score(snaps: match.Snapshots, target: match.Target) -> float:
    best = match.best_of(match.score_snapshots(snaps, VIEWS, target), match.Metric.SSIM)
    return best.ssim if best is not None and best.ssim is not None else -1.0


def distance(point: Point) -> float:
    width = math.log(MASS_RANGE[1] / MASS_RANGE[0])
    return math.hypot(math.log(point[0] / HIDDEN[0]) / width, (point[1] - HIDDEN[1]) / 90)


def grid_points(budget: int) -> list[Point]:
    k = max(2, math.isqrt(budget))
    return [(round(float(m), 4), round(float(t), 2)) for m in np.geomspace(*MASS_RANGE, k)
            for t in np.linspace(0, 90, k)]


def best_point(points: list[Point], runs: Runs, target: match.Target) -> Point:
    scores = [score(s, target) for s in runs.snapshots(points)]
    return points[int(np.argmax(scores))]


def optuna_points(budget: int, seed: int, runs: Runs, target: match.Target,
                  batch: int = 2) -> list[Point]:
    """Ask/tell in batches of `batch` (the model numbers busy at once)."""
    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    dists = {"mass": optuna.distributions.FloatDistribution(*MASS_RANGE, log=True),
             "theta": optuna.distributions.FloatDistribution(0, 90)}
    points: list[Point] = []
    while len(points) < budget:
        trials = [study.ask(dists) for _ in range(min(batch, budget - len(points)))]
        asked = [(round(t.params["mass"], 4), round(t.params["theta"], 2)) for t in trials]
        for trial, snaps in zip(trials, runs.snapshots(asked), strict=True):
            study.tell(trial, score(snaps, target))
        points += asked
    return points


def make_target_image(disk: int) -> match.F32:
    """The hidden job, richer: rendered on the target grid by the matcher's own render."""
    hidden = simulate(HIDDEN, disk * TARGET_STARS_FACTOR)
    grid = match.Target(np.zeros(SHAPE), CENTRES, "bench", Path("bench"))
    done = match.render_one(hidden, TARGET_FRAME, VIEWS[0], False, grid)
    assert done is not None
    return done[0]


def timing(snaps: match.Snapshots, target: match.Target) -> None:
    """ms per job-frame-view (two renders: the view and its mirror), with SSIM by skimage
    (as before) and by the scorer's own filters (`match.ssim_of`), in this one run."""
    per = {}
    for name, ssim in (("skimage SSIM (before)", match.skimage_ssim),
                       ("own SSIM (now)", match.ssim_of)):
        match.score_snapshots(snaps, VIEWS[:1], target, ssim=ssim)  # imports, caches
        t0 = time.perf_counter()
        n = 0
        for _ in range(3):
            n += len(match.score_snapshots(snaps, VIEWS, target, ssim=ssim))
        per[name] = (time.perf_counter() - t0) / n * 1000 * 2
    print(f"match time per job-frame-view (with its mirror: 2 renders) on a {SHAPE[1]}x"
          f"{SHAPE[0]} grid, {snaps.position.shape[1]} stars: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in per.items()))


def sweep_timing(count: int, disk: int, workers: int, frames: int = 40, views: int = 6
                 ) -> None:
    """`match_jobs` itself (pool, cache, HDF5 reads) on `count` complete jobs of `frames`
    frames, `views` directions each: one real run, its snapshots copied into every job
    folder with a completion record, as `gibatch run` leaves them."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        snapshots = simulate_into(job_files(HIDDEN, disk, frames), root / "run")
        digest = hashlib.sha256(snapshots.read_bytes()).hexdigest()
        for k in range(count):
            write_job(root / "jobs", f"j{k}", job_files((1.0 + k / count, 30.0), disk, frames))
        for job in load_sweep(root / "jobs").jobs:
            section = job.output / match.SNAPSHOT_SECTION
            section.mkdir(parents=True)
            shutil.copyfile(snapshots, section / match.SNAPSHOT_FILE)
            record.write(job, {match.SNAPSHOT_SECTION: [FileRecord(
                match.SNAPSHOT_FILE, snapshots.stat().st_size, digest)]}, "bench", 1, 0.0)
        jobs = load_sweep(root / "jobs").jobs
        goal = match.Target(make_target_image(disk), CENTRES, "sweep", Path("sweep"))
        for coarse in (0, match.Settings().coarse_frames):
            shutil.rmtree(match.match_dir(root / "jobs"), ignore_errors=True)
            seconds = []
            for _ in ("cold", "cached"):
                t0 = time.perf_counter()
                results = match.match_jobs(root / "jobs", jobs, goal, match.Settings(
                    views=views, coarse_frames=coarse), workers=workers)
                seconds.append(time.perf_counter() - t0)
            renders = statistics.mean(r.scored for r in results)
            assert coarse or renders == frames * views * 2, results[0]
            per_job = seconds[0] / count
            print(f"match_jobs, {count} jobs x {frames} frames x {views} views x mirror, "
                  f"{workers} workers, {_frames_scored(coarse)}: {seconds[0]:.1f} s "
                  f"({renders:.0f} renders a job, {per_job * 1000 / frames / views:.2f} ms "
                  f"per job-frame-view, the pool's start-up included), {seconds[1]:.2f} s "
                  f"from the cache; 500 such jobs: ~{per_job * 500 / 60:.1f} min")


def _frames_scored(coarse: int) -> str:
    return f"coarse-to-fine from {coarse} frames" if coarse else "every frame"


def coarse_to_fine(runs: Runs, target: match.Target, k: int = 4) -> None:
    """Every frame against coarse to fine (the default coarse frames) on a k x k grid of
    jobs of `runs.frames` frames, seen from the plots' two views and 4 more: the ranking
    of the jobs, each job's best render, and the time to score them."""
    views = [*VIEWS, *match.sphere_views(4)]
    settings = match.Settings()
    points = grid_points(k * k)
    best: dict[int, list[match.Score | None]] = {0: [], settings.coarse_frames: []}
    seconds = dict.fromkeys(best, 0.0)
    renders = dict.fromkeys(best, 0)
    for snaps in runs.snapshots(points):
        for coarse in best:
            t0 = time.perf_counter()
            found = match.frame_search(
                len(snaps.time_gyr), views, settings.metric, coarse,
                lambda keys, s=snaps: match.score_keys(s, views, target, keys))
            seconds[coarse] += time.perf_counter() - t0
            renders[coarse] += len(found)
            best[coarse].append(match.best_of(found.values(), settings.metric))
    full, fast = best[0], best[settings.coarse_frames]

    def order(found: list[match.Score | None]) -> list[int]:
        return sorted(range(len(found)), key=lambda i: -(found[i].ssim or 0.0)
                      if found[i] is not None else 0.0)

    def where(s: match.Score | None) -> tuple[int, str, bool] | None:
        return None if s is None else (s.frame, s.view, s.mirror)

    moved = sum(where(a) != where(b) for a, b in zip(full, fast, strict=True))
    lost = max((a.ssim or 0.0) - (b.ssim or 0.0) for a, b in zip(full, fast, strict=True)
               if a is not None and b is not None)
    print(f"coarse to fine, {len(points)} jobs x {runs.frames} frames x {len(views)} views x "
          f"mirror (target drawn at {TARGET_FRAME / 10:g} Gyr): "
          + ", ".join(f"{_frames_scored(c)} {seconds[c]:.1f} s ({renders[c] / len(points):.0f}"
                      " renders a job)" for c in best)
          + f"; the same ranking: {order(full) == order(fast)}, the same best job: "
          f"{order(full)[0] == order(fast)[0]}, jobs whose best render differs: {moved}, "
          f"largest SSIM lost by a job: {lost:.4f}")


def landscape(runs: Runs, target: match.Target) -> None:
    """Score against tilt at the hidden mass, and against mass at the hidden tilt."""
    tilts = [(HIDDEN[0], t) for t in TILTS]
    masses = [(m, HIDDEN[1]) for m in (0.7, 1.0, 1.4, 1.7, 2.1, 2.8, 3.6)]
    for label, points, col in (("tilt", tilts, 1), ("mass", masses, 0)):
        row = [f"{p[col]:g}: {score(s, target):.4f}"
               for p, s in zip(points, runs.snapshots(points), strict=True)]
        print(f"SSIM against {label} (hidden {HIDDEN[col]:g}): " + "  ".join(row))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--disk", type=int, default=1000,
                        help="disk stars per galaxy (bulge: a fifth of that)")
    parser.add_argument("--sweep-jobs", type=int, default=20,
                        help="jobs of 40 frames and 6 views for the match_jobs timing")
    parser.add_argument("--quick", action="store_true",
                        help="budgets 4, 8, one seed, 200 disk stars, 2 sweep jobs, "
                        "no landscape")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budgets = (4, 8) if args.quick else (25, 50, 100)
    seeds = 1 if args.quick else args.seeds
    disk = 200 if args.quick else args.disk
    runs = Runs(disk, args.workers)
    try:
        target = match.Target(make_target_image(disk), CENTRES, "bench", Path("bench"))
        (hidden,) = runs.snapshots([HIDDEN])
        timing(hidden, target)
        sweep_timing(2 if args.quick else args.sweep_jobs, disk, args.workers)
        frames40 = Runs(disk, args.workers, frames=40)
        try:
            coarse_to_fine(frames40, target, k=2 if args.quick else 4)
        finally:
            frames40.pool.shutdown(cancel_futures=True)
        if not args.quick:
            landscape(runs, target)
        print(f"{'jobs':>5} {'grid distance':>14} {'optuna median':>14}  (normalised; 0 = "
              "the hidden values)   best (mass, tilt): grid | optuna per seed")
        for budget in budgets:
            g = best_point(grid_points(budget), runs, target)
            found = [best_point(optuna_points(budget, seed, runs, target), runs, target)
                     for seed in range(1, seeds + 1)]
            o = statistics.median(distance(p) for p in found)
            print(f"{budget:>5} {distance(g):>14.3f} {o:>14.3f}   {_point(g)} | "
                  + " ".join(_point(p) for p in found))
        print(f"{len(runs.done)} runs of {2 * disk * 6 // 5} stars, {runs.seconds:.0f} s")
    finally:
        runs.pool.shutdown(cancel_futures=True)


def _point(p: Point) -> str:
    return f"({p[0]:.2f}, {p[1]:.0f})"


if __name__ == "__main__":
    main()
