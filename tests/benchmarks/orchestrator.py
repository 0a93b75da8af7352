"""Benchmark of `gibatch run` against the local site; prints figures, asserts nothing.

    python -m tests.benchmarks.orchestrator [--jobs 24] [--models 4] [--particles 100]
                                            [--discover 10000] [--strict]
                                            [--browser-rate 0.005]

Part 1 runs a generated sweep (jobs sharing galaxies and merges) with gibatch as a real
process against a local site in this process, then reads the site's own task table:
- makespan against the ideal: the site's busy time (sum of each task's start-to-finish)
  divided by the model numbers, or the longest per-model chain if that is larger;
- dispatch delay: on each model number, from one task's finish (site clock) to the
  submission of the next (site clock) — what a faster poller would shrink;
- requests per task, tasks submitted against the plan's prediction and the number of
  distinct results the sweep needs, and gibatch's peak memory (max RSS).
- jobs right: each job's files byte for byte what the site made for its parameters,
  chain and all (the site's ledger), on a site that deletes replaced results; with
  `--strict` its listings are newest first, POST answers HTML, no sizes; with
  `--browser-rate` someone starts tasks in the browser (those are not counted as
  gibatch's tasks; the tasks they forced are).
Part 2 writes N job folders and times discovering and validating them, with the
Python allocation peak (tracemalloc).

The site runs one worker process per model number (as the course site does); on a
machine with fewer cores than model numbers each task is slower, but the ratio of
makespan to ideal still measures what gibatch adds.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from datetime import datetime
from pathlib import Path
from typing import Any

from gibatch import sweep as sw
from gibatch.holdings import Holdings
from gibatch.jobs import load_sweep
from gibatch.plan import make_plan
from gibatch.sim.app import SiteConfig
from gibatch.sim.faults import Faults
from gibatch.sim.server import ThreadedSite
from gibatch.steps import DEFAULT_STAGE_COST_S

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "examples" / "base_job"


def base_job(folder: Path, particles: int) -> Path:
    """The example base job with `particles` per component and a short interaction."""
    files = sw.read_base(BASE)
    for g in ("galaxy1", "galaxy2"):
        for comp in ("disk", "bulge", "halo"):
            files[g][comp]["number_of_particles"] = particles
    files["interact"].update(duration=1.0, nFrames=10)
    for p in ("plot1", "plot2"):
        files[p]["plot_size"] = "small"
    folder.mkdir(parents=True)
    for stem, obj in files.items():
        (folder / f"{stem}.json").write_text(json.dumps(obj))
    return folder


def make_sweep(tmp: Path, jobs: int, particles: int) -> Path:
    base = base_job(tmp / "base", particles)
    thetas = ",".join(str(15 * k) for k in range(max(1, jobs // 6)))
    varies = [sw.parse_vary(f"merge.theta_galaxy_2={thetas}"),
              sw.parse_vary("interact.mass_2=1,1.5,2"), sw.parse_vary("plot2.x_min=-300,-250")]
    points = sw.grid(varies)[:jobs]
    out = tmp / "jobs"
    sw.write_sweep(base, out, points)
    return out


def _t(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def site_figures(db_path: Path) -> dict[str, Any]:
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT model, submitted, started, finished FROM tasks "
                          "ORDER BY job_id").fetchall()
        steps = [s for (s,) in db.execute("SELECT step FROM tasks ORDER BY job_id")]
    busy = [(_t(f) - _t(s)) for _, _, s, f in rows]
    per_model: dict[int, list[tuple[float, float, float, str]]] = {}
    for (model, sub, start, fin), step in zip(rows, steps, strict=True):
        per_model.setdefault(model, []).append((_t(sub), _t(start), _t(fin), step))
    by_kind: dict[str, list[float]] = {}
    for tasks in per_model.values():
        for a, b in itertools.pairwise(tasks):
            by_kind.setdefault(f"{a[3]}->{b[3]}", []).append(b[0] - a[2])
    delays = [d for ds in by_kind.values() for d in ds]
    chains = [sum(f - s for _, s, f, _ in tasks) for tasks in per_model.values()]
    first_submit = min(_t(sub) for _, sub, _, _ in rows)
    last_finish = max(_t(f) for *_, f in rows)
    span = last_finish - min(_t(s) for _, _, s, _ in rows)
    return {"tasks": len(rows), "busy_s": sum(busy), "longest_chain_s": max(chains),
            "first_submit": first_submit, "last_finish": last_finish,
            "gaps_s": sum(delays), "by_kind": by_kind,
            "median_delay_s": statistics.median(delays) if delays else 0.0,
            "p90_delay_s": statistics.quantiles(delays, n=10)[-1] if len(delays) > 1 else 0.0,
            "site_span_s": span, "models": len(per_model)}


def jobs_right(sweep_dir: Path, site_dir: Path) -> int:
    from tests.conftest import assert_jobs_match_ledger

    right = 0
    for job in load_sweep(sweep_dir).jobs:
        try:
            assert_jobs_match_ledger(sweep_dir, site_dir, only={job.name})
        except AssertionError:
            continue
        right += 1
    return right


def print_timeline(db_path: Path, origin: float) -> None:
    """Each task on the site: model, step, and its submission, start and finish in
    seconds from gibatch's start, with the gap since the model's previous finish."""
    with sqlite3.connect(db_path) as db:
        rows = db.execute("SELECT job_id, model, step, submitted, started, finished "
                          "FROM tasks ORDER BY model, job_id").fetchall()
    last: dict[int, float] = {}
    for job_id, model, step, sub, start, fin in rows:
        gap = f"{(_t(sub) - last[model]) * 1000:6.0f} ms" if model in last else " " * 9
        print(f"  model {model} task {job_id:3d} {step:<9} submitted {_t(sub) - origin:7.2f}"
              f" started {_t(start) - origin:7.2f} finished {_t(fin) - origin:7.2f}  gap {gap}")
        last[model] = _t(fin)


def run_benchmark(jobs: int, models: int, particles: int, strict: bool = False,
                  browser_rate: float = 0.0, timeline: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        sweep_dir = make_sweep(tmp, jobs, particles)
        sweep = load_sweep(sweep_dir)
        empty: dict[int, Holdings] = {m: {} for m in range(1, models + 1)}
        predicted = make_plan(sweep.jobs, empty, DEFAULT_STAGE_COST_S).tasks
        distinct = len({lin for j in sweep.jobs for lin in j.lineage.values()})
        config = SiteConfig(data_dir=tmp / "site", accounts={"bench": "bench-pw"},
                            model_count=models, workers=models, strict=strict,
                            faults=Faults(browser_rate=browser_rate, seed=3))
        site = ThreadedSite(config)
        try:
            env = {**os.environ, "GIBATCH_PASSWORD": "bench-pw",
                   "GIBATCH_LOCK_DIR": str(tmp / "locks")}
            started, started_wall = time.monotonic(), time.time()
            done = subprocess.run(
                [sys.executable, "-m", "gibatch", "run", "--jobs", str(sweep_dir),
                 "--models", f"1-{models}", "--server", site.running.url,
                 "--username", "bench"],
                env=env, capture_output=True, text=True, timeout=3600)
            wall = time.monotonic() - started
            ended_wall = started_wall + wall
            rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            clicks = len(site.running.site.clicked)
        finally:
            site.stop()
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:])
            print(f"gibatch run exited with code {done.returncode}")
        fig = site_figures(tmp / "site" / "site.db")
        if timeline:
            print_timeline(tmp / "site" / "site.db", started_wall)
        right = jobs_right(sweep_dir, tmp / "site")
        requests = int(re.search(r"requests to the site: (\d+)", done.stdout)[1])  # type: ignore[index]
        ideal = max(fig["busy_s"] / models, fig["longest_chain_s"])
        print(f"sweep: {len(sweep.jobs)} jobs, {models} model numbers, "
              f"{particles} particles per component, {os.cpu_count()} CPUs; site: "
              f"{'strict' if strict else 'normal'}, replaced results deleted, "
              f"browser tasks {clicks} (rate {browser_rate})")
        print(f"jobs right (byte for byte, chain and all): {right} / {len(sweep.jobs)}")
        print(f"makespan (gibatch process, start to exit): {wall:.1f} s; site span "
              f"(first task start to last finish): {fig['site_span_s']:.1f} s")
        print(f"ideal: {ideal:.1f} s (busy {fig['busy_s']:.1f} s / {models} models = "
              f"{fig['busy_s'] / models:.1f} s; longest chain {fig['longest_chain_s']:.1f} s)")
        print(f"makespan / ideal: {wall / ideal:.3f} (site span / ideal: "
              f"{fig['site_span_s'] / ideal:.3f})")
        print(f"where the rest goes: start to first submission "
              f"{fig['first_submit'] - started_wall:.2f} s; last finish to exit "
              f"{ended_wall - fig['last_finish']:.2f} s; gaps between a model's tasks "
              f"{fig['gaps_s']:.1f} s in all ({fig['gaps_s'] / models:.1f} s per model)")
        print("gaps by step (previous -> next: count, median ms, max ms): " + "; ".join(
            f"{kind}: {len(ds)}, {statistics.median(ds) * 1000:.0f}, {max(ds) * 1000:.0f}"
            for kind, ds in sorted(fig["by_kind"].items())))
        print(f"dispatch delay (finish -> next submission, same model, site clock): median "
              f"{fig['median_delay_s'] * 1000:.0f} ms, p90 {fig['p90_delay_s'] * 1000:.0f} ms")
        print(f"tasks submitted: {fig['tasks'] - clicks:.0f} (+{clicks} browser); plan "
              f"predicted: {predicted}; distinct "
              f"results the sweep needs: {distinct} (+2 galaxies per extra model number: "
              f"{distinct + 2 * (models - 1)})")
        kinds = re.search(r"per task: ([^)]*)\)", done.stdout)
        print(f"requests: {requests} ({requests / fig['tasks']:.2f} per task; "
              f"{kinds[1] if kinds else '?'})")
        print(f"gibatch peak memory (max RSS): {rss_mb:.0f} MB")


def write_many(root: Path, count: int) -> None:
    files = {p.name: p.read_text() for p in BASE.glob("*.json")}
    for k in range(count):
        folder = root / f"{k:05d}"
        folder.mkdir(parents=True)
        for name, text in files.items():
            (folder / name).write_text(text)


def discovery_benchmark(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        root = Path(tmp_name) / "jobs"
        t0 = time.perf_counter()
        write_many(root, count)
        written = time.perf_counter() - t0
        tracemalloc.start()
        t0 = time.perf_counter()
        sweep = load_sweep(root)
        took = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(sweep.jobs) == count and not sweep.problems
        del sweep
        t0 = time.perf_counter()
        load_sweep(root)
        again = time.perf_counter() - t0
        print(f"discover + validate {count} job folders again (files now cached): "
              f"{again:.2f} s ({again / count * 1e3:.2f} ms per job)")
        print(f"discover + validate {count} job folders: {took:.2f} s "
              f"({took / count * 1e3:.2f} ms per job; writing them took {written:.1f} s), "
              f"Python allocation peak {peak / 2**20:.0f} MB "
              f"({peak / count / 1024:.1f} KiB per job, all kept in memory)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--particles", type=int, default=100)
    parser.add_argument("--discover", type=int, default=10_000)
    parser.add_argument("--strict", action="store_true", help="a strict local site")
    parser.add_argument("--browser-rate", type=float, default=0.0,
                        help="share of requests followed by a task started in the browser")
    parser.add_argument("--timeline", action="store_true", help="print every site task")
    args = parser.parse_args(argv)
    run_benchmark(args.jobs, args.models, args.particles, args.strict, args.browser_rate,
                  args.timeline)
    if args.discover:
        discovery_benchmark(args.discover)


if __name__ == "__main__":
    main()
