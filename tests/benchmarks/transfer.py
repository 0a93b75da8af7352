"""Benchmark of gibatch's transfer engine against plain single-stream clients; prints
figures, asserts nothing but that every file arrived whole.

    python -m tests.benchmarks.transfer [--sizes 1,10,100] [--total-mb 400]
                                        [--concurrency 1,4,8] [--repeats 3]
                                        [--stream-rate MB/s]

The local site runs as `gibatch serve` in a process of its own and serves result files
of each size from its media folder, as it serves a task's results (its media route:
session checked, then sendfile, with Content-Length and Range; with `--stream-rate`,
each download no faster than that, as a single stream from a remote server: what
concurrency buys on a real site, which loopback on a busy 2-core machine, where one
stream is CPU-bound, cannot show). For each size there are
enough copies (hard links) to move about `--total-mb` per run, and at least 8.

Every client runs in a fresh process of its own, so its CPU time (user + system, all
its threads, from getrusage) and its peak RSS are its own and the site's are not in
them (the site's CPU is read from /proc and shown apart). Clients:
- plain urllib: stdlib `urlopen` + `shutil.copyfileobj` into a file, one file after
  another (what a short script would do);
- plain urllib+sha: the same, reading 64 KiB blocks and hashing them (SHA-256) as they
  come: a plain client that checks what gibatch checks;
- plain aiohttp: one `GET` per file, chunks written straight to the file on the loop;
- gibatch c=N: `transfer.fetch` for every file under a limit of N streams, exactly as
  `gibatch run` downloads a section (`.part`, SHA-256 while streaming, size check,
  rename).
After one warm-up round per size (not counted: the first writes into fresh memory cost
far more on a VM), each repeat runs every client once on the same files, in rotated
order; the table shows medians over repeats, and ratios taken within each repeat (side
by side) before the median. MB = 10^6 bytes, GB = 10^9 bytes. RSS is the whole
process's peak (Python, aiohttp and all), with the growth during the downloads in
brackets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
USER, PASSWORD = "bench", "bench-pw"
MB = 10**6
COPY_BYTES = 1 << 16  # shutil.copyfileobj's block on Linux
PLAIN = ("urllib", "aiohttp", "urllib+sha")
MAX_FILES = 2000  # small sizes: enough files to time, not a day of them


# --- the site -----------------------------------------------------------------------------

def place_files(media: Path, sizes_mb: list[float], total_mb: int
                ) -> dict[float, tuple[list[str], str]]:
    """One random file per size in the site's media (model 1, task 1), linked under as
    many names as a run needs; returns {size: (names, sha256)}."""
    folder = media / USER / "1" / "1"
    folder.mkdir(parents=True)
    placed: dict[float, tuple[list[str], str]] = {}
    for size in sizes_mb:
        count = max(8, min(MAX_FILES, int(total_mb / size)))
        first = folder / f"size{size}mb_0.bin"
        digest = hashlib.sha256()
        with first.open("wb") as f:
            left = int(size * MB)
            while left:
                block = os.urandom(min(left, 1 << 20))
                digest.update(block)
                f.write(block)
                left -= len(block)
        names = [first.name]
        for k in range(1, count):
            link = folder / f"size{size}mb_{k}.bin"
            os.link(first, link)
            names.append(link.name)
        placed[size] = (names, digest.hexdigest())
    return placed


def start_site(data_dir: Path, stream_rate: float = 0.0) -> tuple[subprocess.Popen[str], str]:
    site = subprocess.Popen(
        [sys.executable, "-m", "gibatch", "serve", "--port", "0", "--user", USER,
         "--data-dir", str(data_dir), "--model-count", "1", "--stream-rate", str(stream_rate)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
        env={**os.environ, "GIBATCH_PASSWORD": PASSWORD})
    assert site.stdout is not None
    for line in site.stdout:
        if found := re.search(r"Serving (\S+)", line):
            return site, found[1]
    site.kill()
    raise RuntimeError("the site did not start")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- one client, in a process of its own ---------------------------------------------------

def _usage() -> tuple[float, int]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime, ru.ru_maxrss


async def _session_cookie(base: str) -> str:
    from yarl import URL

    from gibatch.site import SiteClient

    async with SiteClient(base, USER, PASSWORD) as client:
        await client.login()
        jar = client.session.cookie_jar.filter_cookies(URL(client.url("gi/")))
        return "; ".join(f"{k}={m.value}" for k, m in jar.items())


def _urllib(base: str, names: list[str], out: Path, cookie: str, sha: str | None) -> None:
    import urllib.request

    for name in names:
        req = urllib.request.Request(f"{base}/media/{USER}/1/1/{name}",
                                     headers={"Cookie": cookie})
        with urllib.request.urlopen(req) as resp, (out / name).open("wb") as f:
            if sha is None:
                shutil.copyfileobj(resp, f)
                continue
            digest = hashlib.sha256()  # the same check as gibatch's, while streaming
            while block := resp.read(COPY_BYTES):
                digest.update(block)
                f.write(block)
            assert digest.hexdigest() == sha


async def _aiohttp(base: str, names: list[str], out: Path, cookie: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession(headers={"Cookie": cookie}) as http:
        for name in names:
            async with http.get(f"{base}/media/{USER}/1/1/{name}") as resp:
                resp.raise_for_status()
                with (out / name).open("wb") as f:
                    async for chunk in resp.content.iter_any():
                        f.write(chunk)


def child(kind: str, base: str, names: list[str], size: float, sha: str, out: Path,
          concurrency: int) -> dict[str, Any]:
    """Download every name once with one client; figures for this process only."""
    import anyio

    from gibatch.site import RemoteFile, SiteClient
    from gibatch.transfer import fetch

    out.mkdir(parents=True, exist_ok=True)
    records: list[Any] = []

    async def engine() -> tuple[float, float, int]:
        async with SiteClient(base, USER, PASSWORD) as client:
            await client.login()
            limiter = anyio.Semaphore(concurrency)
            cpu0, rss0 = _usage()
            t0 = time.perf_counter()

            async def one(name: str) -> None:
                remote = RemoteFile(name, client.url(f"media/{USER}/1/1/{name}"),
                                    int(size * MB))
                records.append(await fetch(client, remote, out, limiter))

            async with anyio.create_task_group() as tg:
                for name in names:
                    tg.start_soon(one, name)
            return time.perf_counter() - t0, cpu0, rss0

    if kind == "engine":
        wall, cpu0, rss0 = anyio.run(engine)
    else:
        cookie = anyio.run(_session_cookie, base)
        cpu0, rss0 = _usage()
        t0 = time.perf_counter()
        if kind.startswith("urllib"):
            _urllib(base, names, out, cookie, sha if kind.endswith("sha") else None)
        else:
            anyio.run(_aiohttp, base, names, out, cookie)
        wall = time.perf_counter() - t0
    cpu1, rss1 = _usage()
    for name in names:
        got = (out / name).stat().st_size
        assert got == int(size * MB), f"{name}: {got} bytes"
    assert all(r.sha256 == sha and r.size == int(size * MB) for r in records)
    assert not list(out.glob("*.part"))
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "bytes": len(names) * int(size * MB),
            "rss_kb": rss1, "rss_growth_kb": rss1 - rss0}


# --- the parent: runs, medians, table ------------------------------------------------------

def run_client(kind: str, conc: int, base: str, size: float, placed: tuple[list[str], str],
               out: Path, site_pid: int) -> dict[str, Any]:
    names, sha = placed
    spec = json.dumps({"kind": kind, "base": base, "names": names, "size": size, "sha": sha,
                       "out": str(out), "concurrency": conc})
    site0 = cpu_of(site_pid)
    done = subprocess.run([sys.executable, "-m", "tests.benchmarks.transfer", "--child", spec],
                          capture_output=True, text=True, cwd=ROOT, timeout=1800)
    site_cpu = cpu_of(site_pid) - site0
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} c={conc} failed:\n{done.stdout}\n{done.stderr}")
    fig: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    fig["site_cpu_s"] = site_cpu
    return fig


def sha_cost() -> float:
    """CPU seconds per GB of SHA-256 over data in memory, in this process."""
    block, digest = os.urandom(1 << 20), hashlib.sha256()
    t0 = time.process_time()
    for _ in range(256):
        digest.update(block)
    return (time.process_time() - t0) / (256 * len(block) / 1e9)


def label(kind: str, conc: int) -> str:
    return f"plain {kind}" if kind in PLAIN else f"gibatch c={conc}"


def table(size: float, count: int, runs: dict[str, list[dict[str, Any]]]) -> None:
    base = runs[label("urllib", 1)]
    print(f"\n{size:g} MB files x {count} ({size * count:g} MB per run), medians of "
          f"{len(base)} runs; ratios against plain urllib in the same run")
    print(f"{'client':<16}{'MB/s':>8}{'CPU s/GB':>10}{'site CPU s/GB':>15}"
          f"{'peak RSS MB':>13}{'(+growth)':>11}{'rate / plain':>14}{'CPU / plain':>13}")
    for name, figs in runs.items():
        rate = [f["bytes"] / f["wall_s"] / MB for f in figs]
        cpu = [f["cpu_s"] / (f["bytes"] / 1e9) for f in figs]
        site = [f["site_cpu_s"] / (f["bytes"] / 1e9) for f in figs]
        r_ratio = [(f["bytes"] / f["wall_s"]) / (b["bytes"] / b["wall_s"])
                   for f, b in zip(figs, base, strict=True)]
        c_ratio = [f["cpu_s"] / max(b["cpu_s"], 1e-9) for f, b in zip(figs, base, strict=True)]
        rss = max(f["rss_kb"] for f in figs) / 1024
        growth = max(f["rss_growth_kb"] for f in figs) / 1024
        print(f"{name:<16}{statistics.median(rate):>8.0f}{statistics.median(cpu):>10.2f}"
              f"{statistics.median(site):>15.2f}{rss:>13.0f}{f'(+{growth:.0f})':>11}"
              f"{statistics.median(r_ratio):>14.2f}{statistics.median(c_ratio):>13.2f}")


def run_benchmark(sizes: list[float], total_mb: int, concurrencies: list[int],
                  repeats: int, stream_rate: float = 0.0) -> None:
    clients = [("urllib", 1), ("urllib+sha", 1), ("aiohttp", 1),
               *(("engine", c) for c in concurrencies)]
    with tempfile.TemporaryDirectory(prefix="gibatch-transfer-") as tmp_name:
        tmp = Path(tmp_name)
        placed = place_files(tmp / "site" / "media", sizes, total_mb)
        site, base = start_site(tmp / "site", stream_rate)
        try:
            pace = f"at most {stream_rate:g} MB/s per stream" if stream_rate else "unpaced"
            print(f"site: gibatch serve (pid {site.pid}) at {base}, {pace}; "
                  f"{os.cpu_count()} CPUs; "
                  f"{repeats} repeats; SHA-256 alone here: {sha_cost():.2f} CPU s/GB")
            for size in sizes:
                runs: dict[str, list[dict[str, Any]]] = {label(k, c): [] for k, c in clients}
                for kind, conc in clients:  # a warm-up round, not counted: page cache, memory
                    run_client(kind, conc, base, size, placed[size], tmp / "out", site.pid)
                for rep in range(repeats):
                    shift = rep % len(clients)
                    for kind, conc in clients[shift:] + clients[:shift]:
                        fig = run_client(kind, conc, base, size, placed[size], tmp / "out",
                                         site.pid)
                        runs[label(kind, conc)].append(fig)
                table(size, len(placed[size][0]), runs)
        finally:
            site.terminate()
            site.wait(timeout=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,10,100",
                        help="file sizes in MB (0.1 for 100 kB)")
    parser.add_argument("--total-mb", type=int, default=400,
                        help="about this many MB per run (at least 8 files)")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream-rate", type=float, default=0.0,
                        help="the site serves each download at most this many MB/s")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["kind"], spec["base"], spec["names"], spec["size"],
                               spec["sha"], Path(spec["out"]), spec["concurrency"])))
        return
    run_benchmark([float(s) for s in args.sizes.split(",")], args.total_mb,
                  [int(c) for c in args.concurrency.split(",")], args.repeats,
                  args.stream_rate)


if __name__ == "__main__":
    main()
