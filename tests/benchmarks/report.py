"""Benchmark of `gibatch report` on a large sweep; prints figures, asserts nothing.

    python -m tests.benchmarks.report [--jobs 500]

Running 500 real jobs would take hours, and the report's cost does not depend on the
physics, so this runs ONE tiny job for real on a local site, then gives a generated
500-job sweep copies of its output (with completion records written by `record.write`,
as `run` writes them). It then times building the report from cold (thumbnails made)
and warm (thumbnails kept), and prints the page's size and the bytes of images the
browser loads eagerly (none: thumbnails are lazy-loaded) against in all.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import anyio

from gibatch import record
from gibatch import sweep as sw
from gibatch.jobs import STATE_DIR, load_sweep
from gibatch.journal import Journal
from gibatch.report import build_report
from gibatch.run import Options, Scheduler
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from gibatch.site import SiteClient
from gibatch.status import sweep_status
from gibatch.transfer import FileRecord
from tests.benchmarks.orchestrator import base_job


def one_real_job(tmp: Path) -> Path:
    """Run the tiny base job for real; returns its output folder."""
    jobs = tmp / "one"
    base = base_job(tmp / "base", 20)
    shutil.copytree(base, jobs / "job")
    site = ThreadedSite(SiteConfig(data_dir=tmp / "site", accounts={"b": "pw"}))

    async def main() -> None:
        journal = Journal(jobs)
        try:
            async with SiteClient(site.running.url, "b", "pw") as client:
                await Scheduler(client, load_sweep(jobs), Options(jobs, [1]), journal).execute()
        finally:
            journal.close()

    try:
        anyio.run(main)
    finally:
        site.stop()
    return jobs / "job" / "output"


def fake_complete(sweep_root: Path, output: Path) -> None:
    """Copy `output` into every job and write its completion record."""
    sections = {d.name: sorted(f for f in d.iterdir()) for d in output.iterdir() if d.is_dir()}
    for job in load_sweep(sweep_root).jobs:
        shutil.copytree(output, job.output, ignore=shutil.ignore_patterns(".*"))
        files = {name: [FileRecord(f.name, f.stat().st_size, "copied") for f in fs]
                 for name, fs in sections.items()}
        record.write(job, files, "benchmark", 1, time.time())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        output = one_real_job(tmp)
        root = tmp / "sweep"
        side = max(1, round(args.jobs ** 0.5))
        points = sw.grid([sw.parse_vary(f"merge.theta_galaxy_2=0:{side - 1}:1"),
                          sw.parse_vary("interact.mass_2=" + ",".join(
                              str(1 + k / 10) for k in range(-(-args.jobs // side))))])
        sw.write_sweep(tmp / "base", root, points[: args.jobs])
        fake_complete(root, output)
        sweep = load_sweep(root)
        for label in ("cold (thumbnails made)", "warm (thumbnails kept)"):
            journal = Journal(root)
            try:
                t0 = time.perf_counter()
                result = build_report(sweep, sweep_status(sweep, journal))
                took = time.perf_counter() - t0
            finally:
                journal.close()
            print(f"report of {result.rows} jobs, {label}: {took:.2f} s")
        page = result.page.stat().st_size
        thumbs = sum(p.stat().st_size for p in (root / STATE_DIR / "report").glob("*.png"))
        sheet = result.sheet.stat().st_size if result.sheet else 0
        animations = sum(p.stat().st_size for p in root.rglob("animation.gif"))
        print(f"page {page / 1024:.0f} KiB; {result.thumbnails} thumbnails "
              f"{thumbs / 2**20:.1f} MiB, lazy-loaded; contact sheet {sheet / 2**20:.1f} MiB; "
              f"animations (opened on click only) {animations / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
