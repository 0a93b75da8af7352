"""Sweeps of 1k to 100k jobs: discovery and validation, planning, picking, `status` and
`report`, peak memory.

    python -m tests.benchmarks.scale [--sizes 1000,10000,100000] [--scan-up-to 4000]
                                     [--work DIR] [--only run,status,...]

Writes random sweeps (theta and mass ratio continuous, plot 1 among three windows,
galaxies shared: the common shape of a random search) under a temporary folder, then
measures each figure in a fresh process, so that peak RSS is that figure's own:
- `load 1st` / `load 2nd`: `load_sweep` (discovery and validation) in a new process,
  twice in a row (the second with whatever the first left behind: file cache, journal);
- `plan`: `make_plan` on 4 model numbers with the indexed pick (`PendingJobs`), and
  with the plain scan (`holdings.best_job` over every pending job; the code before the
  index) up to `--scan-up-to` jobs, as it grows with the square of the sweep;
- `pick`: the mean and worst time of one pick inside that plan: the same call the
  scheduler makes on its event loop when a model number is free;
- then every job is completed as a run leaves it (`complete`: a small file per section,
  the plots' images, a completion record, about 14 journal events per job; files are
  hard links to one copy, so 100,000 jobs fit on any disk), and
- `no-op run`: what `gibatch run` does on the completed sweep: discovery and validation,
  the skip decision (every job already complete), the model locks, the journal's run
  events; no site is started (nothing to submit). Cold: no completion remembered (the
  first run after the jobs were completed), then warm (the same run again);
- `status`: what `gibatch status` does after loading (journal and completion records,
  the printed summary), cold (no record remembered yet: the first status after the run)
  and warm;
- `report`: what `gibatch report` does after loading, cold (no thumbnail, no plot
  remembered) and warm (kept), with the page's size. MB is this process's peak; the
  cold report's thumbnail workers are not in it (their own peak cannot be read
  apart: a child's ru_maxrss counts the parent's pages it was forked with).
`--work DIR` keeps the sweeps in DIR (reused by the next run; otherwise a temporary
folder); `--only` measures only these figures (of load, plan, scan, run, status,
report; the others print as -). Prints a table; asserts nothing but that the no-op run
found every job complete.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import io
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from unittest import mock

import anyio
from PIL import Image
from rich.console import Console

from gibatch import discovery, record
from gibatch import sweep as sw
from gibatch.commands import show_status
from gibatch.discovery import load_sweep
from gibatch.holdings import best_job
from gibatch.jobs import STATE_DIR, Job, Sweep
from gibatch.journal import Event, Journal
from gibatch.pending import PendingJobs
from gibatch.plan import Plan, make_plan
from gibatch.report import build_report
from gibatch.run import Options, Outcome, Scheduler
from gibatch.site import SiteClient
from gibatch.status import sweep_status
from gibatch.steps import DEFAULT_STAGE_COST_S, Stage
from gibatch.transfer import FileRecord

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


# What each section of a finished job holds (as the local site makes them, smaller).
_SECTION_FILES = {Stage.GALAXY: ("galaxy.h5", "preview.png", "log.txt"),
                  Stage.MERGE: ("initial.h5", "preview.png", "log.txt"),
                  Stage.INTERACT: ("snapshots.h5", "preview.png", "log.txt"),
                  Stage.PLOT: ("final.png", "animation.gif", "thumbnail.png", "log.txt")}


def complete(folder: Path) -> None:
    """Leave every job of the sweep as a run that completed it does (module docstring)."""
    originals = folder / STATE_DIR / "benchmark-files"
    originals.mkdir(parents=True, exist_ok=True)
    for name in {n for names in _SECTION_FILES.values() for n in names}:
        path = originals / name
        if name.endswith((".png", ".gif")):
            Image.new("RGB", (64, 48), "navy").save(path)
        else:
            path.write_bytes(b"x" * 100)
    sizes = {p.name: p.stat().st_size for p in originals.iterdir()}
    links: dict[str, int] = {}

    def link(name: str, dest: Path) -> None:
        """A hard link to a copy of `name`, a new copy every 60,000 (ext4 allows 65,000)."""
        made = links[name] = links.get(name, 0) + 1
        copy = (made - 1) // 60_000
        source = originals / (f"{copy}-{name}" if copy else name)
        if not source.exists():
            shutil.copyfile(originals / name, source)
        with contextlib.suppress(FileExistsError):  # a setup cut short, done again
            os.link(source, dest)

    sweep = load_sweep(folder)
    events: list[tuple[object, ...]] = []
    at, pid = time.time() - len(sweep.jobs), 2**22 + 1  # a run long over, its pid gone
    # The record is still written by record.write; its fsync (one per job) is for
    # crashes, not for a benchmark's setup.
    with mock.patch("os.fsync"):
        for k, job in enumerate(sweep.jobs):
            files: dict[str, list[FileRecord]] = {}
            events.append((at + k, pid, job.name, 1 + k % 4, None, Event.JOB_START.value))
            for step in job.steps:
                section = job.output / step.section
                section.mkdir(parents=True, exist_ok=True)
                names = _SECTION_FILES[step.stage]
                for name in names:
                    link(name, section / name)
                files[step.section] = [FileRecord(n, sizes[n], "-") for n in names]
                events += [(at + k, pid, job.name, 1 + k % 4, step.name, e.value)
                           for e in (Event.STEP_SUBMITTED, Event.STEP_COMPLETED)]
            record.write(job, files, "benchmark", 1 + k % 4, at + k)
            events.append((at + k, pid, job.name, 1 + k % 4, None, Event.JOB_COMPLETE.value))
    Journal(folder).close()  # its tables
    db = sqlite3.connect(folder / STATE_DIR / "journal.db")
    with db:
        db.execute("INSERT INTO events (at, pid, event) VALUES (?, ?, ?)",
                   (at, pid, Event.RUN_START.value))
        db.executemany("INSERT INTO events (at, pid, job, model, step, event) "
                       "VALUES (?, ?, ?, ?, ?, ?)", events)
        db.execute("INSERT INTO events (at, pid, event) VALUES (?, ?, ?)",
                   (at + len(sweep.jobs), pid, Event.RUN_END.value))
    db.close()


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
    elif what == "run":
        start = time.perf_counter()
        skipped = anyio.run(_no_op_run, folder, sweep)
        out["run_s"] = out["load_s"] + time.perf_counter() - start  # the whole run
        if skipped != len(sweep.jobs):
            raise SystemExit(f"the no-op run skipped {skipped} of {len(sweep.jobs)} jobs")
    elif what == "status":
        start = time.perf_counter()
        show_status(Console(file=io.StringIO(), width=120), sweep, 10)
        out["status_s"] = time.perf_counter() - start
    elif what == "report":
        start = time.perf_counter()
        journal = Journal(folder)
        try:
            result = build_report(sweep, sweep_status(sweep, journal))
        finally:
            journal.close()
        out["report_s"] = time.perf_counter() - start
        out["page_mb"] = result.page.stat().st_size / 2**20
        out["thumbnails"] = result.thumbnails
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


async def _no_op_run(folder: Path, sweep: Sweep) -> int:
    """`gibatch run` on a sweep whose every job is complete: the jobs it skipped."""
    journal = Journal(folder)
    try:
        # Never contacted: with nothing to run, a run does not log in.
        client = SiteClient("http://127.0.0.1:9/", "benchmark", "-", site_key="benchmark")
        options = Options(jobs_dir=folder, models=list(range(1, MODELS + 1)))
        summary = await Scheduler(client, sweep, options, journal).execute()
    finally:
        journal.close()
    return summary.count(Outcome.ALREADY_COMPLETE)


def _fingerprint(plan: Plan) -> float:
    """The plan's assignments (job, model, steps run) as one comparable number."""
    text = "\n".join(f"{a.job} {a.model} {[s.name for s in a.run]}" for a in plan.assignments)
    return float(int(hashlib.sha256(text.encode()).hexdigest()[:12], 16))


def child(what: str, folder: Path) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.scale", "--measure", what,
                           str(folder)], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(done.stdout)
    return result


def forget(folder: Path, *tables: str) -> None:
    """Empty these tables of the sweep's database (a sweep reused by `--work`)."""
    if not (folder / STATE_DIR / "journal.db").exists():
        return
    db = sqlite3.connect(folder / STATE_DIR / "journal.db")
    for table in tables:
        with contextlib.suppress(sqlite3.OperationalError), db:  # no such table yet
            db.execute(f"DELETE FROM {table}")
    db.close()


@contextlib.contextmanager
def work_folder(path: str | None) -> Iterator[Path]:
    if path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="gibatch-scale-") as tmp:
        yield Path(tmp)


FIGURES = ("load", "plan", "scan", "run", "status", "report")
_NONE: dict[str, float] = {}  # a figure not measured: printed as -


def _cell(result: dict[str, float] | None, key: str, width: int, digits: int = 2) -> str:
    value = (result or _NONE).get(key)
    return f"{'-' if value is None else format(value, f'.{digits}f'):>{width}}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--scan-up-to", type=int, default=4000)
    parser.add_argument("--work", help="keep the sweeps here (and reuse them)")
    parser.add_argument("--only", default=",".join(FIGURES),
                        help="figures to measure: " + ",".join(FIGURES))
    parser.add_argument("--measure", nargs=2, metavar=("WHAT", "FOLDER"))
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return
    only = set(args.only.split(","))
    if only - set(FIGURES):
        parser.error(f"--only: unknown figures {sorted(only - set(FIGURES))}")
    print(f"load average {os.getloadavg()[0]:.2f} at the start; status and report exclude "
          "loading the sweep (load 2nd s); a no-op run includes it", flush=True)
    header = (f"{'jobs':>7} {'write s':>8} {'load 1st s':>10} {'load 2nd s':>10} {'MB':>6} "
              f"{'plan s':>8} {'MB':>6} {'pick ms':>8} {'max ms':>7} "
              f"{'no-op run cold s':>16} {'warm s':>7} {'MB':>6} "
              f"{'status cold s':>13} {'warm s':>7} {'MB':>6} "
              f"{'report cold s':>13} {'warm s':>7} {'MB':>6} {'page MB':>7} "
              f"{'scan plan s':>11} {'same plan':>9}")
    print(header)
    with work_folder(args.work) as work:
        for n in (int(s) for s in args.sizes.split(",")):
            start = time.perf_counter()
            folder = work / f"sweep-{n}"
            done = (folder / "sweep.json").exists()
            if not done:
                folder = write(work, n)
            written = time.perf_counter() - start if not done else float("nan")
            first = second = plan = scan = None
            if "load" in only:
                forget(folder, "known_jobs", "job_order")  # load 1st: every job file read
                first = child("load", folder)
                second = child("load", folder)
            if "plan" in only:
                plan = child("plan", folder)
            if "scan" in only and n <= args.scan_up_to:
                scan = child("scan", folder)
            same = ("-" if scan is None or plan is None
                    else "yes" if scan["assignments"] == plan["assignments"] else "NO")
            mark = folder / STATE_DIR / "benchmark-complete"
            if not mark.exists() and only & {"run", "status", "report"}:
                complete(folder)
                mark.touch()
                # As a user's next status would find them: the newest records settled.
                time.sleep(discovery.SETTLE_NS / 1e9)
            runs: list[dict[str, float] | None] = [None, None]
            if "run" in only:
                forget(folder, "completions")  # the first run after the jobs completed
                runs = [child("run", folder) for _ in range(2)]
            status: list[dict[str, float] | None] = [None, None]
            if "status" in only:
                forget(folder, "completions")  # the first status after the run
                status = [child("status", folder) for _ in range(2)]
            report: list[dict[str, float] | None] = [None, None]
            if "report" in only:
                shutil.rmtree(folder / STATE_DIR / "report", ignore_errors=True)  # no thumbnail
                forget(folder, "report_shots")  # no plot remembered
                report = [child("report", folder) for _ in range(2)]
            print(f"{n:>7} {written:>8.1f} {_cell(first, 'load_s', 10)} "
                  f"{_cell(second, 'load_s', 10)} {_cell(second, 'rss_mb', 6, 0)} "
                  f"{_cell(plan, 'plan_s', 8)} {_cell(plan, 'rss_mb', 6, 0)} "
                  f"{_cell(plan, 'pick_mean_ms', 8, 3)} {_cell(plan, 'pick_max_ms', 7)} "
                  f"{_cell(runs[0], 'run_s', 16)} {_cell(runs[1], 'run_s', 7)} "
                  f"{_cell(runs[1], 'rss_mb', 6, 0)} "
                  f"{_cell(status[0], 'status_s', 13)} {_cell(status[1], 'status_s', 7)} "
                  f"{_cell(status[1], 'rss_mb', 6, 0)} {_cell(report[0], 'report_s', 13)} "
                  f"{_cell(report[1], 'report_s', 7)} {_cell(report[1], 'rss_mb', 6, 0)} "
                  f"{_cell(report[1], 'page_mb', 7, 1)} {_cell(scan, 'plan_s', 11)} {same:>9}",
                  flush=True)
    # Not on stdout, whose last line is the last size's (the smoke test reads it).
    print(f"load average {os.getloadavg()[0]:.2f} at the end", file=sys.stderr)


if __name__ == "__main__":
    main()
