"""The real `gibatch run` (a subprocess) against an independent implementation of the
site protocol (tests/independent_site.py, written from the spec alone), checked against
that site's own ledger: every job's files are byte for byte what the site made for that
job, on one consistent chain of tasks (the plots read the interaction on disk, which
read the merge on disk, which read the two galaxies on disk)."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.independent_site import Ledger, SiteOptions, Task, ThreadedIndependentSite, Variations

BASE_JOB = Path(__file__).resolve().parent.parent / "examples" / "base_job"
RUN_TIMEOUT_S = 55.0
HANG_S = 40.0          # a healthy run of these sweeps takes 5-15 s
PLOT = "Plot"


def base() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(BASE_JOB.glob("*.json"))}


def write_sweep(root: Path, points: list[dict[str, Any]]) -> Path:
    """One job folder per point, named in natural order; `points` set
    {"file.json": {"key": value}} (nested keys as "a.b")."""
    for i, point in enumerate(points, 1):
        files = base()
        for fname, changes in point.items():
            for dotted, value in changes.items():
                obj = files[fname]
                *path, last = dotted.split(".")
                for k in path:
                    obj = obj[k]
                obj[last] = value
        folder = root / f"{i:02d}-job"
        folder.mkdir(parents=True)
        for fname, obj in files.items():
            (folder / fname).write_text(json.dumps(obj, indent=1))
    return root


def sweep_a(root: Path) -> Path:
    """12 jobs: galaxy 2's halo x theta x plot 2's colours. Consecutive jobs share
    sections: 01/02 differ only in plot 2, 01/03 share the galaxies, 06/07 share only
    galaxy 1."""
    return write_sweep(root, [
        {"galaxy2.json": {"halo.potential_well_depth": depth},
         "merge.json": {"theta_galaxy_2": theta},
         "plot2.json": {"colour_scheme": colour}}
        for depth, theta, colour in itertools.product(
            [-4.6, -5.0], [0, 45, 90], ["whiteonblack", "blackonwhite"])])


def sweep_b(root: Path) -> Path:
    """8 jobs: interaction masses x plot 1's axes (share galaxies and merge)."""
    return write_sweep(root, [
        {"interact.json": {"mass_2": mass}, "plot1.json": {"y_axis": axis}}
        for mass, axis in itertools.product([1.0, 2.0, 3.0, 4.0], ["y", "z"])])


# --- running gibatch ----------------------------------------------------------------
@dataclass
class Run:
    rc: int
    output: str
    seconds: float


def start_gibatch(url: str, jobs: Path, models: str, work: Path, tag: str,
                  ) -> tuple[subprocess.Popen[str], Path, float]:
    password = work / "password"
    if not password.exists():
        password.write_text("pw\n")
        password.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "GIBATCH_PASSWORD"}
    env["GIBATCH_LOCK_DIR"] = str(work / "locks")
    log = work / f"gibatch-{tag}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gibatch", "run", "--jobs", str(jobs), "--models", models,
             "--server", url, "--username", "alice", "--password-file", str(password),
             "--no-live", "--concurrency", "4"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
            env=env)
    return proc, log, time.monotonic()


def finish(proc: subprocess.Popen[str], log: Path, started: float,
           timeout_s: float = RUN_TIMEOUT_S) -> Run:
    try:
        rc = proc.wait(timeout=max(1.0, started + timeout_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"gibatch still running after {timeout_s} s:\n"
                             + log.read_text()[-3000:]) from None
    return Run(rc, log.read_text(), time.monotonic() - started)


def gibatch_run(url: str, jobs: Path, models: str, work: Path, tag: str,
                timeout_s: float = RUN_TIMEOUT_S) -> Run:
    return finish(*start_gibatch(url, jobs, models, work, tag), timeout_s=timeout_s)


# --- checking against the ledger -----------------------------------------------------
def expected_sections(job: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """section -> (job type, parameters) from the job's own files."""
    want = {"Galaxy 1": ("Galaxy 1", "galaxy1.json"), "Galaxy 2": ("Galaxy 2", "galaxy2.json"),
            "Galaxy Merge": ("Galaxy Merge", "merge.json"),
            "Galaxy Interaction": ("Galaxy Interaction", "interact.json")}
    out = {s: (t, json.loads((job / f).read_text())) for s, (t, f) in want.items()}
    k = 1
    while (job / f"plot{k}.json").exists():
        out[f"Plot {k}"] = (PLOT, json.loads((job / f"plot{k}.json").read_text()))
        k += 1
    return out


def files_on_disk(folder: Path) -> dict[str, tuple[int, str]]:
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.iterdir() if p.is_file()}


def produced(task: Task) -> dict[str, tuple[int, str]]:
    return {f.name: (f.size, f.sha256) for f in task.files}


def params(task: Task) -> dict[str, Any]:
    return {k: v for k, v in task.payload.items() if k != "model_number"}


def describe(task: Task) -> str:
    return (f"task {task.job_id} ({task.origin}, {task.job_type} as {task.section!r}, "
            f"model {task.model}, {task.status}, read {task.inputs})")


def check_job(job: Path, tasks: list[Task]) -> list[str]:
    out = job / "output"
    want = expected_sections(job)
    if not (out / ".gibatch-complete.json").is_file():
        return [f"{job.name}: no completion record"]
    problems = []
    have = {p.name for p in out.iterdir() if p.is_dir()}
    if have != set(want):
        problems.append(f"{job.name}: sections {sorted(have)} != {sorted(want)}")
    chosen: dict[str, Task] = {}
    for section, (job_type, wanted) in want.items():
        if section not in have:
            continue
        disk = files_on_disk(out / section)
        made = [t for t in tasks if produced(t) == disk]
        ok = [t for t in made if t.job_type == job_type and params(t) == wanted
              and t.status == "Completed"]
        if ok:
            chosen[section] = ok[0]
            continue
        why = ("; the site made these files in " + ", ".join(map(describe, made))) if made \
            else "; no task made this set of files " + json.dumps(
                {n: s for n, (s, _) in disk.items()})
        problems.append(f"{job.name}/{section}: not what the site made for this job{why}")
    problems += check_lineage(job.name, chosen)
    return problems


def check_lineage(name: str, chosen: dict[str, Task]) -> list[str]:
    def reads(section: str, upstream: list[str]) -> list[str]:
        if section not in chosen or any(u not in chosen for u in upstream):
            return []
        got, want = chosen[section].inputs, [chosen[u].job_id for u in upstream]
        return [] if got == want else [
            f"{name}/{section}: {describe(chosen[section])} read tasks {got}, but the job's "
            f"files of {upstream} come from tasks {want}"]

    problems = reads("Galaxy Merge", ["Galaxy 1", "Galaxy 2"])
    problems += reads("Galaxy Interaction", ["Galaxy Merge"])
    for section in chosen:
        if section.startswith("Plot "):
            problems += reads(section, ["Galaxy Interaction"])
    return problems


def check_sweep(jobs: Path, ledger: Ledger) -> tuple[int, list[str]]:
    """(jobs right, problems)."""
    tasks = ledger.snapshot()
    problems: list[str] = []
    right = 0
    folders = sorted(p for p in jobs.iterdir() if p.is_dir() and not p.name.startswith("."))
    for job in folders:
        found = check_job(job, tasks)
        right += not found
        problems += found
    problems += [f"partial file left: {p}" for p in jobs.rglob("*.part")]
    return right, problems


def assert_run_ok(run: Run, jobs: Path, site: ThreadedIndependentSite, label: str) -> None:
    right, problems = check_sweep(jobs, site.ledger)
    total = sum(1 for p in jobs.iterdir() if p.is_dir() and not p.name.startswith("."))
    print(f"{label}: {right}/{total} jobs right, exit {run.rc}, {run.seconds:.1f} s, "
          f"site counts {json.dumps(site.ledger.counts, sort_keys=True)}")
    report = "\n".join(problems[:20])
    assert "Traceback" not in run.output, run.output[-4000:]
    assert not site.ledger.violations, site.ledger.violations
    assert not problems, f"{report}\n--- gibatch output (end) ---\n{run.output[-4000:]}"
    assert right == total
    assert run.rc == 0, run.output[-4000:]


# --- fixtures ----------------------------------------------------------------------
@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Any]:
    sites: list[ThreadedIndependentSite] = []

    def make(**options: Any) -> ThreadedIndependentSite:
        sites.append(ThreadedIndependentSite(SiteOptions(**options),
                                             tmp_path / f"site{len(sites)}"))
        return sites[-1]

    yield make
    for s in sites:
        s.stop()


# --- the tests -----------------------------------------------------------------------
@pytest.mark.slow
def test_clean_sweep(make_site: Any, tmp_path: Path) -> None:
    """(a) 12 jobs on 3 model numbers, consecutive jobs sharing sections, files of 1-5 MB."""
    site = make_site()
    jobs = sweep_a(tmp_path / "jobs")
    run = gibatch_run(site.url, jobs, "1-3", tmp_path, "clean")
    assert_run_ok(run, jobs, site, "clean sweep")
    # a second run finds every job complete and posts nothing
    before = len(site.ledger.snapshot())
    again = gibatch_run(site.url, jobs, "1-3", tmp_path, "clean-again")
    assert again.rc == 0, again.output[-3000:]
    assert len(site.ledger.snapshot()) == before, again.output[-3000:]


@pytest.mark.slow
def test_every_variation(make_site: Any, tmp_path: Path) -> None:
    """(b) The same sweep with every variation on: newest-first listing, other status
    words, extra columns, POSTs answered in HTML, no size cells, no status in headings,
    Range ignored, 502/503/504 on any request, 502 after an accepted POST, downloads cut,
    sessions of 2 s, files on another origin, browser tasks at random moments when a
    model number is free (after a task ends, and one plot just before gibatch's first
    plot POST)."""
    site = make_site(variations=Variations.everything())
    jobs = sweep_a(tmp_path / "jobs")
    run = gibatch_run(site.url, jobs, "1-3", tmp_path, "variations")
    assert_run_ok(run, jobs, site, "every variation")
    counts = site.ledger.counts
    # the variations did happen (each has a chance of failing to: below 1e-4)
    assert counts.get("browser_task", 0) > 0 and counts.get("post_502", 0) > 0
    assert counts.get("proxy_error", 0) > 0 and counts.get("session_expired", 0) > 0
    assert counts.get("browser_task_before_post", 0) == 1


@pytest.mark.slow
def test_browser_plot_just_before_own_plot(make_site: Any, tmp_path: Path) -> None:
    """POSTs answered in HTML (no job id), and a plot started in the browser that ran on
    the model number just before gibatch's first plot POST (section 3: "before ... this
    client's own"): two new Plot rows on that model, the browser's first. gibatch must
    not take the browser's plot for its own."""
    site = make_site(variations=Variations(
        html_post_answer=True, browser_before_post_rate=1.0, browser_before_post_budget=1,
        browser_before_post_types=("Plot",)))
    jobs = sweep_a(tmp_path / "jobs")
    run = gibatch_run(site.url, jobs, "1-3", tmp_path, "before-post")
    assert site.ledger.counts.get("browser_task_before_post", 0) == 1
    assert_run_ok(run, jobs, site, "browser plot just before gibatch's plot")


@pytest.mark.slow
def test_one_row_per_model(make_site: Any, tmp_path: Path) -> None:
    """view_jobs keeps only each model number's current task (section 3), and a task is
    started in the browser the moment gibatch's first task ends: gibatch's own row is
    never listed again. It must neither hang nor lose the job."""
    site = make_site(variations=Variations(
        one_row_per_model=True, browser_rate=1.0, browser_budget=1, browser_delay_s=(0, 0)))
    jobs = sweep_a(tmp_path / "jobs")
    run = gibatch_run(site.url, jobs, "1-3", tmp_path, "one-row", timeout_s=HANG_S)
    assert site.ledger.counts.get("browser_task", 0) == 1
    assert_run_ok(run, jobs, site, "one row per model")


@pytest.mark.slow
def test_a_site_that_queues_posts_on_a_busy_model(make_site: Any, tmp_path: Path) -> None:
    """A POST for a model number whose task (a browser's, started just before, of any
    type) is still running is queued behind it instead of refused; the replaced files
    are deleted at once; answers carry no job id and listings come newest first."""
    site = make_site(variations=Variations(
        queue_when_busy=True, newest_first=True, html_post_answer=True,
        browser_before_post_rate=0.3, browser_before_post_budget=6,
        browser_rate=0.2, browser_budget=3, browser_delay_s=(0, 0)))
    jobs = sweep_b(tmp_path / "jobs")
    run = gibatch_run(site.url, jobs, "1-3", tmp_path, "queue", timeout_s=HANG_S)
    # The six browser tasks just before a POST are drawn from a generator of their own:
    # the sixth falls on the 17th POST to a free model, and the sweep makes at least 24.
    assert site.ledger.counts.get("post_queued", 0) >= 6, site.ledger.counts
    assert_run_ok(run, jobs, site, "a site that queues POSTs")


@pytest.mark.slow
def test_two_processes_overlapping_models(make_site: Any, tmp_path: Path) -> None:
    """(c) Two gibatch processes, two sweeps, model ranges 1-3 and 2-4 of one account."""
    site = make_site(model_count=4, variations=Variations(
        newest_first=True, html_post_answer=True, no_size_cells=True))
    jobs_a = sweep_a(tmp_path / "jobs_a")
    jobs_b = sweep_b(tmp_path / "jobs_b")
    a = start_gibatch(site.url, jobs_a, "1-3", tmp_path, "a")
    b = start_gibatch(site.url, jobs_b, "2-4", tmp_path, "b")
    try:
        run_a = finish(*a)
    finally:
        run_b = finish(*b)
    assert_run_ok(run_a, jobs_a, site, "process A (models 1-3)")
    assert_run_ok(run_b, jobs_b, site, "process B (models 2-4)")
    # one process per model number: no model ran tasks of both sweeps
    tasks = site.ledger.snapshot()
    models_a = {t.model for t in tasks if t.payload.get("mass_2") == 1.5}
    models_b = {t.model for t in tasks if t.payload.get("mass_2") in (1.0, 2.0, 3.0, 4.0)}
    assert not models_a & models_b, (models_a, models_b)
