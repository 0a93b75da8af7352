"""The benchmark scripts still run (tiny sizes); their figures are for people, not asserts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_orchestrator_benchmark_runs() -> None:
    out = _run("tests.benchmarks.orchestrator", "--jobs", "4", "--models", "2",
               "--particles", "10", "--discover", "50")
    for figure in ("makespan / ideal", "dispatch delay", "requests:", "plan predicted",
                   "peak memory", "discover + validate 50 job folders"):
        assert figure in out, out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_physics_benchmark_runs(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"  # not the checkout's working folder
    out = _run("tests.benchmarks.physics", "--sizes", "300,600", "--steps", "2",
               "--grid", str(grid))
    for figure in ("interaction", "relative energy error", "output bytes", "N =    600"):
        assert figure in out, out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_benchmark_runs() -> None:
    out = _run("tests.benchmarks.report", "--jobs", "12")
    assert "report of 12 jobs, cold" in out and "lazy-loaded" in out, out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_transfer_benchmark_runs() -> None:
    out = _run("tests.benchmarks.transfer", "--sizes", "1", "--total-mb", "8",
               "--concurrency", "1,2", "--repeats", "1")
    for figure in ("1 MB files x 8", "MB/s", "CPU s/GB", "peak RSS MB", "plain urllib",
                   "plain urllib+sha", "plain aiohttp", "gibatch c=1", "gibatch c=2",
                   "rate / plain", "SHA-256 alone"):
        assert figure in out, out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_benchmark_runs() -> None:
    out = _run("tests.benchmarks.scale", "--sizes", "40", "--scan-up-to", "40")
    for figure in ("load 2nd s", "plan s", "pick ms", "scan plan s"):
        assert figure in out, out
    assert out.splitlines()[-1].split()[-1] == "yes", out  # the same plan as the scan


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_match_benchmark_runs() -> None:
    out = _run("tests.benchmarks.match", "--quick")
    for figure in ("match time per job-frame-view", "grid distance", "optuna median"):
        assert figure in out, out
