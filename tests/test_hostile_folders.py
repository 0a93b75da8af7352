"""Job folders as users' disks leave them: a symbolic link where results go, a folder
name of bytes from another system. One job's oddity is that job's problem, reported in
a line; it never reaches files outside the job, nor ends the run."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from gibatch import record
from gibatch.jobs import load_sweep
from gibatch.journal import Event, Journal
from gibatch.run import Outcome
from gibatch.sim.server import ThreadedSite
from tests.conftest import run_sweep, tiny_job_files, write_job


def _victim(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A folder outside the sweep holding someone's files, and what they hold."""
    victim = tmp_path / "shared-results"
    (victim / "notes").mkdir(parents=True)
    files = {"precious.txt": b"thesis draft", "notes/a.txt": b"keep me",
             "old.part": b"someone else's partial download"}
    for name, data in files.items():
        (victim / name).write_bytes(data)
    return victim, files


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("link", ["output", "output/Plot 1", "output/Galaxy 1"])
def test_a_linked_results_folder_fails_its_job_and_leaves_the_target_alone(
    tmp_path: Path, make_site: Callable[..., ThreadedSite], link: str
) -> None:
    """`output` or a section folder that is a symbolic link out of the sweep: gibatch
    neither writes there nor deletes anything there (its clean-up of stale results once
    deleted every file of the target); the job fails naming the link, the others run."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    write_job(jobs, "2", tiny_job_files(**{"interact.json": {"mass_2": 2.0}}))
    victim, files = _victim(tmp_path)
    (jobs / "1" / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, jobs / "1" / link)
    summary = run_sweep(make_site(), jobs, [1])
    assert _contents(victim) == files
    assert summary.outcomes == {"1": Outcome.FAILED, "2": Outcome.COMPLETE}
    assert "is a symbolic link" in summary.reasons["1"] and link in summary.reasons["1"]
    assert (jobs / "1" / link).is_symlink()


def test_output_linked_to_the_job_folder_itself_keeps_the_job_files(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """`ln -s . output`, for results beside the parameters: the clean-up of stale
    results took the job's own parameter files for them and deleted them."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    before = _contents(jobs / "1")
    os.symlink(".", jobs / "1" / "output")
    summary = run_sweep(make_site(), jobs, [1])
    assert summary.outcomes == {"1": Outcome.FAILED}
    assert {k: v for k, v in _contents(jobs / "1").items()
            if not k.startswith(".")} == before


def test_partial_files_are_never_dropped_through_a_link(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    victim, files = _victim(tmp_path)
    (jobs / "1" / "output").mkdir()
    os.symlink(victim, jobs / "1" / "output" / "Plot 1")
    [job] = load_sweep(jobs).jobs
    record.drop_partials(job)
    record.prune(job, {"Plot 1": set()})
    assert _contents(victim) == files
    assert not (jobs / "1" / "output" / "Plot 1").exists()  # the link went, not its target


def test_a_job_folder_named_in_undecodable_bytes_runs_with_the_others(
    tmp_path: Path, make_site: Callable[..., ThreadedSite]
) -> None:
    """A folder name of latin-1 bytes (an archive from another system): its job claim
    hashed the name as UTF-8 and the run ended with a traceback, the other job never
    done; the journal's SQLite refuses such text too. It runs, and is journalled under
    its own name."""
    jobs = tmp_path / "jobs"
    odd = os.fsdecode(b"odd\xff")
    write_job(jobs, "a", tiny_job_files())
    write_job(jobs, odd, tiny_job_files(**{"interact.json": {"mass_2": 2.0}}))
    summary = run_sweep(make_site(), jobs, [1, 2])
    assert summary.outcomes == {"a": Outcome.COMPLETE, odd: Outcome.COMPLETE}, summary.reasons
    assert all(record.is_complete(j) for j in load_sweep(jobs).jobs)
    journal = Journal(jobs)
    try:
        assert odd in journal.last_job_events({Event.JOB_COMPLETE})
    finally:
        journal.close()
