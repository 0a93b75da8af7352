"""The discovery cache: a second look at an unchanged sweep reads no JSON, and any
change to a job's files (edited, added, removed, replaced by a symlink) is seen, also
when a settled folder's own stat stands in for listing it."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from gibatch import discovery
from gibatch import jobs as jobs_module
from gibatch.discovery import load_sweep
from gibatch.jobs import load_sweep as load_uncached
from tests.conftest import tiny_job_files, write_job


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every job file read as JSON, in order."""
    seen: list[Path] = []
    real = jobs_module._read_json

    def counting(job: str, path: Path, problems: list[Any]) -> Any:
        seen.append(path)
        return real(job, path, problems)

    monkeypatch.setattr(jobs_module, "_read_json", counting)
    return seen


@pytest.fixture
def listed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every folder listed (os.scandir), in order."""
    seen: list[str] = []
    real = os.scandir

    def counting(path: Any) -> Any:
        if not isinstance(path, int):  # shutil.rmtree lists by descriptor
            seen.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(os, "scandir", counting)
    return seen


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock well past every file's times: folders are settled when listed."""
    monkeypatch.setattr(discovery, "clock_ns", lambda: time.time_ns() + 10 * discovery.SETTLE_NS)


@pytest.fixture
def young(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock stopped as the test starts: whatever it writes is younger than SETTLE_NS
    when listed, however long the machine takes (the real clock passed it after a
    stall of 2 s, and "just now" was no longer)."""
    now = time.time_ns()
    monkeypatch.setattr(discovery, "clock_ns", lambda: now)


def sweep_of(root: Path, n: int) -> None:
    for k in range(n):
        write_job(root, f"j{k}", tiny_job_files(**{"interact.json": {"mass_2": 1 + k / 8}}))


def same(a: Any, b: Any) -> None:
    assert [j.name for j in a.jobs] == [j.name for j in b.jobs]
    assert [j.payloads for j in a.jobs] == [j.payloads for j in b.jobs]
    assert [j.lineage for j in a.jobs] == [j.lineage for j in b.jobs]
    assert [j.params for j in a.jobs] == [j.params for j in b.jobs]
    assert a.problems == b.problems


def test_an_unchanged_sweep_is_read_once(tmp_path: Path, reads: list[Path]) -> None:
    root = tmp_path / "jobs"
    sweep_of(root, 5)
    first = load_sweep(root)
    assert len(reads) == 5 * 6
    reads.clear()
    second = load_sweep(root)
    assert reads == []
    same(first, second)
    same(second, load_uncached(root))


def test_every_kind_of_change_is_seen(tmp_path: Path, reads: list[Path]) -> None:
    root = tmp_path / "jobs"
    sweep_of(root, 5)
    load_sweep(root)
    # j0: edited to the same size (only the time changes); j1: a plot added;
    # j2: a file removed (invalid); j3: a file replaced by a symlink to another job's.
    merge = root / "j0" / "merge.json"
    text = merge.read_text()
    merge.write_text(text.replace('"theta_galaxy_2": 45', '"theta_galaxy_2": 46'))
    os.utime(merge, ns=(1, 1))
    (root / "j1" / "plot3.json").write_text(json.dumps(tiny_job_files()["plot1.json"]))
    (root / "j2" / "galaxy2.json").unlink()
    (root / "j3" / "interact.json").unlink()
    (root / "j3" / "interact.json").symlink_to(root / "j4" / "interact.json")
    reads.clear()
    sweep = load_sweep(root)
    assert {p.parent.name for p in reads} == {"j0", "j1", "j2", "j3"}
    same(sweep, load_uncached(root))
    assert sweep.invalid_jobs == ["j2"]
    # Fixed again: j2 is read, the others come from the cache.
    (root / "j2" / "galaxy2.json").write_text(json.dumps(tiny_job_files()["galaxy2.json"]))
    reads.clear()
    fixed = load_sweep(root)
    assert {p.parent.name for p in reads} == {"j2"}
    assert fixed.invalid_jobs == []
    # A job folder removed and made again with other content is read anew, and so is
    # j3, whose symlink now points at a new file.
    for f in (root / "j4").iterdir():
        f.unlink()
    (root / "j4").rmdir()
    write_job(root, "j4", tiny_job_files(**{"interact.json": {"mass_2": 2.5}}))
    reads.clear()
    again = load_sweep(root)
    assert {p.parent.name for p in reads} == {"j3", "j4"}
    same(again, load_uncached(root))


def test_without_a_usable_cache_the_sweep_is_read_in_full(tmp_path: Path,
                                                          reads: list[Path]) -> None:
    root = tmp_path / "jobs"
    sweep_of(root, 2)
    (root / ".gibatch").write_text("not a folder")  # the cache cannot be opened
    first = load_sweep(root)
    second = load_sweep(root)
    assert len(reads) == 2 * 2 * 6
    same(first, second)


def test_a_cache_of_another_layout_is_rebuilt(tmp_path: Path, reads: list[Path]) -> None:
    import sqlite3

    root = tmp_path / "jobs"
    sweep_of(root, 2)
    (root / ".gibatch").mkdir()
    db = sqlite3.connect(root / ".gibatch" / "journal.db")
    db.execute("CREATE TABLE known_jobs (name TEXT PRIMARY KEY, job TEXT)")
    db.execute("INSERT INTO known_jobs VALUES ('j0', 'garbage')")
    db.commit()
    db.close()
    first = load_sweep(root)
    reads.clear()
    second = load_sweep(root)
    assert reads == []
    same(first, second)
    same(second, load_uncached(root))


@pytest.mark.usefixtures("settled")
def test_a_settled_folder_is_not_listed_again(tmp_path: Path, reads: list[Path],
                                              listed: list[str]) -> None:
    root = tmp_path / "jobs"
    sweep_of(root, 3)
    first = load_sweep(root)
    reads.clear()
    listed.clear()
    second = load_sweep(root)
    assert reads == [] and listed == ["jobs"]  # the sweep's folder only
    same(first, second)
    same(second, load_uncached(root))


@pytest.mark.usefixtures("settled")
def test_every_kind_of_change_is_seen_without_listing(tmp_path: Path, reads: list[Path],
                                                      listed: list[str]) -> None:
    root = tmp_path / "jobs"
    sweep_of(root, 6)
    load_sweep(root)
    # j0: edited in place to the same size, its mtime set back: only its ctime tells.
    merge = root / "j0" / "merge.json"
    before = merge.stat()
    merge.write_text(merge.read_text().replace('"theta_galaxy_2": 45', '"theta_galaxy_2": 46'))
    os.utime(merge, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert merge.stat().st_size == before.st_size and merge.stat().st_ino == before.st_ino
    # j1: a plot added; j2: a file removed; j3: a file replaced by a symlink;
    # j4: an output folder added (no job file changed); j5: the folder replaced by a
    # symlink to another one with other parameters.
    (root / "j1" / "plot3.json").write_text(json.dumps(tiny_job_files()["plot1.json"]))
    (root / "j2" / "galaxy2.json").unlink()
    (root / "j3" / "interact.json").unlink()
    (root / "j3" / "interact.json").symlink_to(root / "j4" / "interact.json")
    (root / "j4" / "output").mkdir()
    write_job(tmp_path / "elsewhere", "j5", tiny_job_files(**{"interact.json": {"mass_2": 9}}))
    shutil.rmtree(root / "j5")
    (root / "j5").symlink_to(tmp_path / "elsewhere" / "j5")
    reads.clear()
    listed.clear()
    sweep = load_sweep(root)
    assert {p.parent.name for p in reads} == {"j0", "j1", "j2", "j3", "j5"}
    assert "j4" in listed  # its folder changed: listed, found the same, not read
    same(sweep, load_uncached(root))
    assert sweep.invalid_jobs == ["j2"]
    assert sweep.jobs[-1].payloads[jobs_module.steps.INTERACT]["mass_2"] == 9
    # Settled again: only the invalid job (never remembered) is listed and read.
    reads.clear()
    listed.clear()
    again = load_sweep(root)
    assert {p.parent.name for p in reads} == {"j2"}
    assert set(listed) - {"jobs"} == {"j2"}
    same(again, sweep)


@pytest.mark.usefixtures("young")
def test_a_folder_changed_just_now_is_listed_again(tmp_path: Path, reads: list[Path],
                                                   listed: list[str]) -> None:
    """Its own times may not change again within the same clock tick: they stand for
    its listing only once settled (so a plot written right after is never missed)."""
    root = tmp_path / "jobs"
    sweep_of(root, 2)
    load_sweep(root)
    reads.clear()
    listed.clear()
    load_sweep(root)
    assert reads == []
    assert set(listed) == {"jobs", "j0", "j1"}


def test_the_natural_order_is_kept_and_made_again_when_names_change(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    sweep_of(root, 3)
    write_job(root, "j10", tiny_job_files())
    assert [j.name for j in load_sweep(root).jobs] == ["j0", "j1", "j2", "j10"]
    assert [j.name for j in load_sweep(root).jobs] == ["j0", "j1", "j2", "j10"]
    write_job(root, "j9", tiny_job_files())
    shutil.rmtree(root / "j1")
    assert [j.name for j in load_sweep(root).jobs] == ["j0", "j2", "j9", "j10"]
    assert [j.name for j in load_sweep(root).jobs] == ["j0", "j2", "j9", "j10"]


def test_a_job_named_by_undecodable_bytes_is_read_each_time(tmp_path: Path,
                                                           reads: list[Path]) -> None:
    """SQLite keeps text only: that job (and the order) is not remembered; the rest is."""
    root = tmp_path / "jobs"
    sweep_of(root, 2)
    odd = os.fsdecode(b"odd\xff")
    write_job(root, odd, tiny_job_files())
    os.mkdir(os.fsencode(root) + b"/bad\xff")  # invalid too: forgotten, never stored
    load_sweep(root)
    reads.clear()
    sweep = load_sweep(root)
    assert {p.parent.name for p in reads} == {odd, os.fsdecode(b"bad\xff")}
    assert [j.name for j in sweep.jobs] == ["j0", "j1", odd]
    assert sweep.invalid_jobs == [os.fsdecode(b"bad\xff")]
