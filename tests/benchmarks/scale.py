"""Sweeps of 1k to 100k jobs: discovery and validation, planning, picking, peak memory.

    python -m tests.benchmarks.scale [--sizes 1000,10000,100000] [--scan-up-to 4000]

Writes random sweeps (theta and mass ratio continuous, plot 1 among three windows,
galaxies shared: the common shape of a random search) under a temporary folder, then
measures each figure in a fresh process, so that peak RSS is that figure's own:
- `load 1st` / `load 2nd`: `load_sweep` (discovery and validation) in a new process,
  twice in a row (the second with whatever the first left behind: file cache, journal);
- `plan`: `make_plan` on 4 model numbers with the indexed pick (`PendingJobs`), and
  with the plain scan (`holdings.best_job` over every pending job; the code before the
  index) up to `--scan-up-to` jobs, as it grows with the square of the sweep;
- `pick`: the mean and worst time of one pick inside that plan: the same call the
  scheduler makes on its event loop when a model number is free.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from gibatch import sweep as sw
from gibatch.discovery import load_sweep
from gibatch.holdings import best_job
from gibatch.jobs import Job
from gibatch.pending import PendingJobs
from gibatch.plan import Plan, make_plan
from gibatch.steps import DEFAULT_STAGE_COST_S, Stage

BASE_JOB = Path(__file__).resolve().parents[2] / "examples" / "base_job"
MODELS = 4


class Scan(list[Job]):
    """The pick before the index: score every pending job."""

    def take_best(self, held: Mapping[str, str], cost: Mapping[Stage, float]) -> Job | None:
        return self.pop(best_job(self, held, cost)) if self else None


class TimedPicks(PendingJobs):
    """PendingJobs that records how long each pick takes."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        super().__init__(jobs)
        self.times: list[float] = []

    def take_best(self, held: Mapping[str, str], cost: Mapping[Stage, float]) -> Job | None:
        start = time.perf_counter()
        try:
            return super().take_best(held, cost)
        finally:
            self.times.append(time.perf_counter() - start)


def write(root: Path, n: int) -> Path:
    out = root / f"sweep-{n}"
    varies = [sw.parse_vary("merge.theta_galaxy_2=0:90"), sw.parse_vary("interact.mass_2=1:3"),
              sw.parse_vary("plot1.x_min=-500,-400,-300")]
    points = sw.random_points(varies, n, seed=1, base=sw.read_base(BASE_JOB))
    sw.write_sweep(BASE_JOB, out, points)
    return out


def measure(what: str, folder: Path) -> dict[str, float]:
    """One figure, in this process (run in a child by `main`)."""
    start = time.perf_counter()
    sweep = load_sweep(folder)
    loaded = time.perf_counter() - start
    gc.freeze()  # as the command line does after loading
    out: dict[str, float] = {"jobs": len(sweep.jobs), "load_s": loaded}
    holdings: dict[int, dict[str, str]] = {m: {} for m in range(1, MODELS + 1)}
    if what == "plan":
        picks: list[TimedPicks] = []

        def queue(jobs: Sequence[Job]) -> TimedPicks:
            picks.append(TimedPicks(jobs))
            return picks[-1]

        start = time.perf_counter()
        plan = make_plan(sweep.jobs, holdings, DEFAULT_STAGE_COST_S, queue)
        out["plan_s"] = time.perf_counter() - start
        times = picks[0].times
        out["pick_mean_ms"] = 1000 * sum(times) / len(times)
        out["pick_max_ms"] = 1000 * max(times)
        out["tasks"] = plan.tasks
        out["assignments"] = _fingerprint(plan)
    elif what == "scan":
        start = time.perf_counter()
        plan = make_plan(sweep.jobs, holdings, DEFAULT_STAGE_COST_S, Scan)
        out["plan_s"] = time.perf_counter() - start
        out["tasks"] = plan.tasks
        out["assignments"] = _fingerprint(plan)
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def _fingerprint(plan: Plan) -> float:
    """The plan's assignments (job, model, steps run) as one comparable number."""
    text = "\n".join(f"{a.job} {a.model} {[s.name for s in a.run]}" for a in plan.assignments)
    return float(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))


def child(what: str, folder: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.scale", "--measure", what,
                           str(folder)], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--scan-up-to", type=int, default=4000)
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "FOLDER"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    header = (f"{'jobs':>7} {'write s':>8} {'load 1st s':>10} {'load 2nd s':>10} {'MB':>6} "
              f"{'plan s':>8} {'MB':>6} {'pick ms':>8} {'max ms':>7} {'scan plan s':>11} "
              f"{'same plan':>9}")
    print(header)
    with tempfile.TemporaryDirectory(prefix="gibatch-scale-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            start = time.perf_counter()
            folder = write(Path(tmp), n)
            written = time.perf_counter() - start
            first = child("load", folder)
            second = child("load", folder)
            plan = child("plan", folder)
            scan = child("scan", folder) if n <= args.scan_up_to else None
            same = ("-" if scan is None
                    else "yes" if scan["assignments"] == plan["assignments"] else "NO")
            print(f"{n:>7} {written:>8.1f} {first['load_s']:>10.2f} {second['load_s']:>10.2f} "
                  f"{second['rss_mb']:>6.0f} {plan['plan_s']:>8.2f} {plan['rss_mb']:>6.0f} "
                  f"{plan['pick_mean_ms']:>8.3f} {plan['pick_max_ms']:>7.2f} "
                  f"{'-' if scan is None else format(scan['plan_s'], '.2f'):>11} {same:>9}",
                  flush=True)


if __name__ == "__main__":
    main()
