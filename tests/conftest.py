"""Shared fixtures: example jobs copied into a temporary sweep, and one local site on
127.0.0.1 per test session (a real aiohttp server in a thread of its own)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from gibatch import steps
from gibatch.jobs import load_sweep
from gibatch.journal import Journal
from gibatch.run import Options, Scheduler, Summary
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from gibatch.site import RetryPolicy, SiteClient, Timeouts

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
BASE_JOB = EXAMPLES / "base_job"


def read_base() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(BASE_JOB.glob("*.json"))}


@pytest.fixture
def make_job(tmp_path: Path) -> Callable[..., Path]:
    """Write a job folder from the base job, with per-file overrides (None deletes a file)."""

    def make(name: str = "job", root: Path | None = None, **files: Any) -> Path:
        folder = (root or tmp_path / "jobs") / name
        folder.mkdir(parents=True)
        content: dict[str, Any] = {**read_base(), **{k.replace("_json", ".json"): v
                                                     for k, v in files.items()}}
        for fname, obj in content.items():
            if obj is None:
                continue
            text = obj if isinstance(obj, str) else json.dumps(obj)
            (folder / fname).write_text(text)
        return folder

    return make


@pytest.fixture
def example_sweep(tmp_path: Path) -> Iterator[Path]:
    dest = tmp_path / "sweep"
    shutil.copytree(EXAMPLES / "sweep", dest)
    yield dest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


SMALL = {"number_of_particles": 30}


def tiny_job_files(**changes: dict[str, Any]) -> dict[str, Any]:
    base = read_base()
    for g in ("galaxy1.json", "galaxy2.json"):
        base[g] = {**base[g], "disk": {**base[g]["disk"], **SMALL}, "bulge": SMALL,
                   "halo": {**base[g]["halo"], **SMALL}}
    base["interact.json"] = {**base["interact.json"], "duration": 0.1, "nFrames": 4}
    for p in ("plot1.json", "plot2.json"):
        base[p] = {**base[p], "plot_size": "small"}
    for name, update in changes.items():
        base[name] = {**base[name], **update}
    return base


def write_job(root: Path, name: str, files: dict[str, Any]) -> None:
    (root / name).mkdir(parents=True)
    for fname, obj in files.items():
        (root / name / fname).write_text(json.dumps(obj))


def gibatch(log: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """gibatch as a real process; output to a file (the site's worker processes may
    outlive a killed gibatch briefly, and would hold a pipe open)."""
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gibatch", *args], stdout=out, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, **(env or {})},
        )


def wait_for_event(jobs: Path, event: str, step: str | None, deadline_s: float,
                   job: str | None = None, model: int | None = None) -> None:
    """Bounded wait until the journal shows `event` (of `step`, of `job`, on `model`,
    where given): a condition, not a sleep."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        db = jobs / ".gibatch" / "journal.db"
        if db.exists():
            journal = Journal(jobs)
            try:
                if any(e.event == event and (step is None or e.step == step)
                       and (job is None or e.job == job)
                       and (model is None or e.model == model) for e in journal.events()):
                    return
            finally:
                journal.close()
        time.sleep(0.05)
    raise AssertionError(f"no {event} {step} within {deadline_s} s")


@contextmanager
def task_ends_held(site: ThreadedSite, held: Callable[[Any], bool]
                   ) -> Iterator[threading.Event]:
    """Tasks of `site` for which `held(task)` stay Running until the event yielded is
    set (on leaving, at the latest), then end as they would have: a test's next move
    (a kill, a second POST, a second process) cannot come after they end, however
    slowly the test runs. An event, where a wait on the clock would be a race."""
    runner = site.running.site.runner
    assert runner is not None
    real_end = runner._on_end
    release = threading.Event()

    def end_later(task: Any, status: Any) -> None:  # on the site's loop
        if held(task) and not release.is_set():
            asyncio.get_running_loop().call_later(0.02, end_later, task, status)
            return
        real_end(task, status)

    runner._on_end = end_later
    try:
        yield release
    finally:
        release.set()
        runner._on_end = real_end


def assert_jobs_match_ledger(jobs: Path, site_dir: Path, only: set[str] | None = None) -> None:
    """Each complete job's files are byte for byte those of site tasks run with the job's
    own parameters on inputs that were themselves the job's (the site's ledger keeps
    what every task produced and read, after replaced files are deleted)."""
    from gibatch import record
    from gibatch.holdings import section_step
    from gibatch.jobs import load_sweep
    from gibatch.sim.store import Store

    store = Store(site_dir / "site.db")
    try:
        tasks = {t.job_id: t for user in _users(store) for t in store.tasks(user)}

        def made_by(task_id: int, job: Any, step: Any) -> bool:
            task = tasks[task_id]
            if task.job_type != step.job_type or json.loads(task.payload) != job.payload(step):
                return False
            wanted = {"merge": [steps.GALAXY1, steps.GALAXY2], "interact": [steps.MERGE]}.get(
                step.name, [steps.INTERACT] if step.stage is steps.Stage.PLOT else [])
            read = store.inputs_of(task_id)
            return len(read) == len(wanted) and all(
                any(made_by(r, job, w) for r in read) for w in wanted)

        for job in load_sweep(jobs).jobs:
            if only is not None and job.name not in only:
                continue
            data = record.complete_record(job)
            assert data is not None, f"{job.name} is not complete"
            assert set(data["sections"]) == {s.section for s in job.steps}
            for section, files in data["sections"].items():
                step = section_step(section)
                got = {f["name"]: (f["size"], f["sha256"]) for f in files}
                for f in files:
                    path = job.output / section / f["name"]
                    assert hashlib.sha256(path.read_bytes()).hexdigest() == f["sha256"]
                assert any(store.produced(t) == got and made_by(t, job, step) for t in tasks), \
                    f"{job.name}/{section}: not what the site made for this job"
            assert not list(job.output.rglob("*.part")), job.name
    finally:
        store.close()


def _users(store: Any) -> list[str]:
    with store._lock:
        return [str(r[0]) for r in store._db.execute("SELECT DISTINCT username FROM tasks")]


FAST_RETRY = RetryPolicy(base_s=0.05, cap_s=0.5, give_up_after_s=60, listing_grace_s=2.0)


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[..., ThreadedSite]]:
    """Local sites on 127.0.0.1 with one account, alice/pw, stopped after the test."""
    sites: list[ThreadedSite] = []

    def make(**options: Any) -> ThreadedSite:
        config = SiteConfig(data_dir=tmp_path / f"site{len(sites)}",
                            accounts={"alice": "pw"}, workers=2, **options)
        sites.append(ThreadedSite(config))
        return sites[-1]

    yield make
    for s in sites:
        s.stop()


def run_sweep(site: ThreadedSite, jobs: Path, models: list[int],
              concurrency: int = 3, wrap: Callable[[SiteClient], None] | None = None,
              retry: RetryPolicy = FAST_RETRY) -> Summary:
    """`gibatch run`'s scheduler in this process against `site`, with quick retries;
    `wrap` may replace the client's methods (in the event loop) to watch or steer it."""
    async def main() -> Summary:
        journal = Journal(jobs)
        try:
            async with SiteClient(site.running.url, "alice", "pw", retry=retry,
                                  timeouts=Timeouts(read_s=2.0, page_s=5.0)) as client:
                if wrap is not None:
                    wrap(client)
                return await Scheduler(client, load_sweep(jobs),
                                       Options(jobs, models, concurrency=concurrency),
                                       journal).execute()
        finally:
            journal.close()

    return anyio.run(main)
