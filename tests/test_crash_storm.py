"""Exact resume in a storm of faults: `gibatch run` as a real process against a strict
local site (HTML POST answers, 502s, cut downloads, POSTs answered 502 after the site
took them, someone clicking in the browser), killed with SIGKILL three times at moments
the journal shows, then run to the end. Every job must end complete and byte for byte
what the site made for it, from its own inputs."""

from __future__ import annotations

import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gibatch.sim.faults import Faults
from gibatch.sim.server import ThreadedSite
from gibatch.sim.store import TaskStatus
from tests.conftest import (
    assert_jobs_match_ledger,
    gibatch,
    task_ends_held,
    tiny_job_files,
    wait_for_event,
    write_job,
)


def wait_for_count(jobs: Path, event: str, count: int, deadline_s: float) -> None:
    """Bounded wait until the journal holds `count` events of kind `event`."""
    end = time.monotonic() + deadline_s
    db = jobs / ".gibatch" / "journal.db"
    while time.monotonic() < end:
        if db.exists():
            with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
                try:
                    (seen,) = conn.execute("SELECT COUNT(*) FROM events WHERE event = ?",
                                           (event,)).fetchone()
                except sqlite3.OperationalError:  # the table is not made yet
                    seen = 0
            if seen >= count:
                return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} {event} events within {deadline_s} s")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_three_times_in_a_storm_of_faults_every_job_is_whole(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    jobs = tmp_path / "jobs"
    for k in range(5):
        write_job(jobs, f"j{k}", tiny_job_files(**{"interact.json": {"mass_2": 1.0 + k / 4}}))
    # No lost tasks here: a process waits RetryPolicy.listing_grace_s (2 minutes) before
    # it gives one up; tests/test_replacing_site.py storms them with a short grace.
    site = make_site(strict=True, faults=Faults(
        seed=11, error_rate=0.05, cut_rate=0.2, post_502_rate=0.2, browser_rate=0.01))
    env = {"GIBATCH_PASSWORD": "pw", "GIBATCH_LOCK_DIR": str(tmp_path / "locks")}
    args = ("run", "--jobs", str(jobs), "--models", "1-2", "--server", site.running.url,
            "--username", "alice")
    log = tmp_path / "gibatch.log"
    # Killed mid-task, mid-job and after a job ended (each count is reached in a later
    # process than the one before it, so each kill falls in its own run).
    for event, count in (("step-submitted", 3), ("step-completed", 9), ("job-complete", 2)):
        first = gibatch(log, *args, env=env)
        try:
            wait_for_count(jobs, event, count, deadline_s=120)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
    last = gibatch(log, *args, env=env)
    assert last.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert_jobs_match_ledger(jobs, site.running.site.config.data_dir)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_while_a_409_is_waited_out_the_next_run_adopts_nothing(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """Someone starts a galaxy 1 in the browser just as gibatch is about to POST its own
    (here, at the GET that fetches the form's token): the POST meets a 409, and gibatch,
    waiting for that task to end, is killed; while it is down, another galaxy 1 is
    started in the browser. The refused POST's intent was left in the journal, so the
    next run took that task, the first new one of the type it had posted, for gibatch's
    own, and the job ended with the browser's galaxy. The intent is now held only while
    a POST may be on the site."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = make_site(strict=True, model_count=1, faults=Faults(browser_step="galaxy1"))
    sim = site.running.site
    sim.faults.script("browser", "/gi/galactic")
    env = {"GIBATCH_PASSWORD": "pw", "GIBATCH_LOCK_DIR": str(tmp_path / "locks")}
    args = ("run", "--jobs", str(jobs), "--models", "1", "--server", site.running.url,
            "--username", "alice")
    log = tmp_path / "gibatch.log"
    with task_ends_held(site, lambda task: task.job_id in sim.clicked) as release:
        first = gibatch(log, *args, env=env)
        try:  # the 409 met, the browser's task seen: gibatch waits for it to end
            wait_for_event(jobs, "memory-void", None, deadline_s=120, model=1)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        assert sim.clicked and sim.faults.injected.get("browser") == 1
        # While gibatch is down, another galaxy 1 from the browser: the first new row
        # of the refused POST's type the next run sees.
        site.call(lambda: sim.click("alice", 1, "galaxy1"))
        release.set()
    deadline = time.monotonic() + 60  # (it starts when the first ends)
    while len(sim.clicked) < 2 or sim.store.status(sim.clicked[1]) is not TaskStatus.COMPLETED:
        assert time.monotonic() < deadline, sim.clicked
        time.sleep(0.05)
    last = gibatch(log, *args, env=env)
    assert last.wait(timeout=240) == 0, log.read_text()[-3000:]
    assert_jobs_match_ledger(jobs, sim.config.data_dir)
