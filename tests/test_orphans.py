"""No process outlives gibatch: the local site's simulation workers (and
multiprocessing's resource tracker) end within seconds of their parent's death,
whatever killed it; `gibatch serve` ends cleanly on SIGTERM as on Ctrl-C.

Each test makes the site busy with a long interaction (minutes of computing if left
alone), records every descendant of the gibatch process from /proc, kills gibatch and
polls, with a deadline, until none of them is alive.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from gibatch import steps
from gibatch.site import SiteClient, TaskState
from tests.conftest import gibatch, read_base, wait_for_event, write_job

pytestmark = [
    pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)"),
    pytest.mark.timeout(120),
]

PASSWORD = "orphans are bad"
# The base job's 1300 particles for 100 Gyr: ~52,000 steps, minutes of computing, far
# longer than any of these tests; the task is certainly still running when gibatch dies.
SLOW_INTERACT = {**read_base()["interact.json"], "duration": 100.0, "nFrames": 2}
GONE_WITHIN_S = 10.0


@dataclass(frozen=True)
class Proc:
    """A process named by pid and start time, so that a reused pid is not mistaken for it."""

    pid: int
    started: int  # clock ticks after boot, field 22 of /proc/PID/stat
    cmdline: str


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, start time) of a process, or None if it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in () may hold spaces
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(root: int) -> list[Proc]:
    """Every process below `root`, children of children included (/proc scanned for ppids)."""
    by_parent: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            by_parent.setdefault(stat[1], []).append((int(entry.name), stat[2]))
    found: list[Proc] = []
    todo = [root]
    while todo:
        for pid, started in by_parent.get(todo.pop(), []):
            found.append(Proc(pid, started, _cmdline(pid)))
            todo.append(pid)
    return found


def alive(proc: Proc) -> bool:
    """Running or sleeping: a zombie has ended (a container's init may never reap it)."""
    stat = _stat(proc.pid)
    return stat is not None and stat[0] not in "ZX" and stat[2] == proc.started


def still_alive_after(procs: list[Proc], deadline_s: float = GONE_WITHIN_S) -> list[Proc]:
    """Poll until every process in `procs` has ended or the deadline passes."""
    end = time.monotonic() + deadline_s
    while (left := [p for p in procs if alive(p)]) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def end_all(procs: list[Proc]) -> None:
    """After a failure, kill what is left rather than leave minutes of computing behind."""
    for proc in procs:
        if alive(proc):
            os.kill(proc.pid, signal.SIGKILL)


def workers_of(root: int) -> list[Proc]:
    """The descendants, checked to include a simulation worker (else the test proves
    nothing); the resource tracker, when multiprocessing started one, is among them."""
    procs = descendants(root)
    assert any("spawn_main" in p.cmdline for p in procs), procs
    return procs


def wait_for_file(folder: Path, pattern: str, deadline_s: float) -> Path:
    """Bounded wait until a file matching `pattern` exists below `folder`."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if found := next(folder.glob(pattern), None):
            return found
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} below {folder} within {deadline_s} s")


def wait_for_line(log: Path, pattern: str, deadline_s: float) -> re.Match[str]:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if match := re.search(pattern, log.read_text()):
            return match
        time.sleep(0.05)
    raise AssertionError(f"no {pattern!r} in {log} within {deadline_s} s:\n{log.read_text()}")


@dataclass(frozen=True)
class Busy:
    process: subprocess.Popen[str]
    log: Path
    below: list[Proc]  # its descendants while busy


@pytest.fixture
def busy_serve(tmp_path: Path) -> Iterator[Busy]:
    """`gibatch serve` computing a long interaction on model 1."""
    log, data = tmp_path / "serve.log", tmp_path / "data"
    proc = gibatch(log, "serve", "--port", "0", "--user", "bob", "--data-dir", str(data),
                   env={"GIBATCH_PASSWORD": PASSWORD})
    procs: list[Proc] = []
    try:
        url = wait_for_line(log, r"Serving (http://127\.0\.0\.1:\d+/ast80011)\n", 60)[1]
        anyio.run(_start_slow_interaction, url)
        # The interaction has opened its output: it is computing in a worker now.
        wait_for_file(data / "media" / "bob" / "1", "*/snapshots.h5", 60)
        procs = workers_of(proc.pid)
        yield Busy(proc, log, procs)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        end_all(procs)


async def _start_slow_interaction(url: str) -> None:
    base = read_base()
    async with SiteClient(url, "bob", PASSWORD) as client:
        await client.login()
        for step, payload in ((steps.GALAXY1, base["galaxy1.json"]),
                              (steps.GALAXY2, base["galaxy2.json"]),
                              (steps.MERGE, base["merge.json"]), (steps.INTERACT, SLOW_INTERACT)):
            await client.submit(step, 1, payload)
            if step is steps.INTERACT:
                return
            for _ in range(1200):  # bounded: 60 s
                rows = await client.tasks()
                if rows[-1].state is not TaskState.ACTIVE:
                    assert rows[-1].state is TaskState.COMPLETED, rows
                    break
                await anyio.sleep(0.05)
            else:
                raise AssertionError(f"{step.name} did not finish")


def test_serve_killed_leaves_no_worker(busy_serve: Busy) -> None:
    busy_serve.process.kill()
    busy_serve.process.wait(timeout=10)
    assert still_alive_after(busy_serve.below) == []


def test_serve_ends_cleanly_on_sigterm(busy_serve: Busy) -> None:
    busy_serve.process.send_signal(signal.SIGTERM)
    # The running task is abandoned, not awaited: a restarted site runs it again.
    assert busy_serve.process.wait(timeout=GONE_WITHIN_S) == 0, busy_serve.log.read_text()
    assert still_alive_after(busy_serve.below) == []
    assert "Traceback" not in busy_serve.log.read_text()


def assert_killed_leaves_no_worker(proc: subprocess.Popen[str], ready: Callable[[], None]
                                   ) -> None:
    """Once `ready()` returns, SIGKILL `proc` (no handler, no clean-up in gibatch
    itself) and check that none of its workers outlives it."""
    procs: list[Proc] = []
    try:
        ready()
        procs = workers_of(proc.pid)
        proc.kill()
        proc.wait(timeout=10)
        assert still_alive_after(procs) == []
    finally:
        proc.kill()
        proc.wait(timeout=30)
        end_all(procs)


def test_run_killed_leaves_no_worker(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "slow", {**read_base(), "interact.json": SLOW_INTERACT})
    proc = gibatch(tmp_path / "run.log", "run", "--jobs", str(jobs), "--models", "1",
                   "--no-live", env={"GIBATCH_LOCK_DIR": str(tmp_path / "locks")})

    def computing() -> None:
        wait_for_event(jobs, "step-submitted", "interact", deadline_s=60)
        wait_for_file(jobs / ".gibatch" / "site" / "media", "*/1/*/snapshots.h5", 60)

    assert_killed_leaves_no_worker(proc, computing)


def test_serve_starts_its_workers_at_once_and_they_die_with_it(tmp_path: Path) -> None:
    """The simulator's workers start with the site (warm: the first tasks do not wait a
    second for a spawn and the imports), and those idle workers end with it too."""
    log = tmp_path / "serve.log"
    proc = gibatch(log, "serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                   env={"GIBATCH_PASSWORD": PASSWORD})

    def warm() -> None:
        wait_for_line(log, r"Serving http://127\.0\.0\.1:\d+", 60)
        end = time.monotonic() + 60
        procs: list[Proc] = []
        while not any("spawn_main" in p.cmdline for p in procs) and time.monotonic() < end:
            procs = descendants(proc.pid)  # no task was submitted: these are warm workers
            time.sleep(0.05)

    assert_killed_leaves_no_worker(proc, warm)
