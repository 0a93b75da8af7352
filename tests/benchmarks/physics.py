"""Benchmark of the local site's physics; prints figures, asserts nothing.

    python -m tests.benchmarks.physics [--sizes 5000,20000,100000] [--steps 20]
                                       [--reference N] [--grid PATH]

1. The example base job's chain through the site's own task functions: seconds and
   output bytes per step.
2. An isolated galaxy (example galaxy 1) over 1 Gyr, per component, in both physics:
   disk and bulge half-mass radius, disk median |z|, sigma_R and v_phi at 1-3 scale
   lengths, and the relative energy error (per star in restricted mode, total in live).
3. Seconds per 3 Gyr job and output bytes (HDF5 + CSV) for the star counts of --sizes,
   restricted physics, and seconds per live tree step for --steps steps.
4. With --reference N (N >= 50000 for the issue's figures; minutes to an hour): a
   self-consistent tree run of N particles for a 1:1 prograde and a 10:1 radial encounter
   against restricted physics: first pericentre time, first apocentre, merger time and
   tail fraction (disk stars beyond 50 kpc of both centres) at 0.5 and 0.75 Gyr; and a
   picture grid (restricted above, live below, same frames) saved to --grid.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gibatch.params import GalaxyParams, InteractParams, MergeParams, PlotParams
from gibatch.sim import galaxy, nbody, render, tasks
from gibatch.sim.physics import Physics

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "examples" / "base_job"
TAIL_KPC = 50.0
MERGED_KPC = 10.0


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _payloads() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in BASE.glob("*.json")}


def chain_benchmark() -> None:
    payloads = _payloads()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        outs = {name: tmp / name for name in ("g1", "g2", "merge", "interact", "plot1", "plot2")}
        for out in outs.values():
            out.mkdir()
        runs: list[tuple[str, Callable[[], None], str]] = [
            ("galaxy 1", lambda: tasks.run_galaxy(payloads["galaxy1"], outs["g1"]), "g1"),
            ("galaxy 2", lambda: tasks.run_galaxy(payloads["galaxy2"], outs["g2"]), "g2"),
            ("merge", lambda: tasks.run_merge(payloads["merge"], outs["g1"], outs["g2"],
                                              outs["merge"]), "merge"),
            ("interaction", lambda: tasks.run_interact(payloads["interact"], outs["merge"],
                                                       outs["interact"]), "interact"),
            ("plot 1", lambda: tasks.run_plot(payloads["plot1"], outs["interact"],
                                              outs["plot1"]), "plot1"),
            ("plot 2", lambda: tasks.run_plot(payloads["plot2"], outs["interact"],
                                              outs["plot2"]), "plot2"),
        ]
        print("example base job (examples/base_job), restricted physics, one process:")
        for label, run, key in runs:
            t0 = time.perf_counter()
            run()
            took = time.perf_counter() - t0
            files = ", ".join(f"{p.name} {p.stat().st_size / 1024:.0f} KiB"
                              for p in sorted(outs[key].iterdir()))
            print(f"  {label:<12} {took:6.2f} s   {_bytes(outs[key]) / 1024:7.0f} KiB  ({files})")
        total = sum(_bytes(o) for o in outs.values())
        print(f"  output bytes in all: {total / 2**20:.1f} MiB")


def _galaxy_spec(number: int, disk: int, bulge: int, halo: int) -> dict[str, Any]:
    spec = dict(_payloads()[f"galaxy{number}"])
    spec["disk"] = {**spec["disk"], "number_of_particles": disk}
    spec["bulge"] = {"number_of_particles": bulge}
    spec["halo"] = {**spec["halo"], "number_of_particles": halo}
    return spec


def _pair(counts: tuple[int, int, int], merge: dict[str, Any], second: tuple[int, int, int]
          ) -> nbody.InitialCondition:
    g1 = galaxy.build(GalaxyParams.model_validate(_galaxy_spec(1, *counts)), seed=1)
    g2 = galaxy.build(GalaxyParams.model_validate(
        {**_galaxy_spec(1, *second), "galaxy_number": 2}), seed=2)
    return nbody.merge(g1, g2, MergeParams.model_validate(merge))


def _far_away() -> dict[str, Any]:
    return {"length_scale": {"galaxy_1": 1, "galaxy_2": 1},
            "position_galaxy_2": {"x": 9e4, "y": 0, "z": 0},
            "velocity_galaxy_2": {"vx": 0, "vy": 0, "vz": 0}, "theta_galaxy_2": 0}


def _disk_figures(pos: np.ndarray, vel: np.ndarray, length: float) -> tuple[float, ...]:
    radius = np.hypot(pos[:, 0], pos[:, 1])
    v_r = (pos[:, 0] * vel[:, 0] + pos[:, 1] * vel[:, 1]) / radius
    v_phi = (pos[:, 0] * vel[:, 1] - pos[:, 1] * vel[:, 0]) / radius
    ring = (radius > length) & (radius < 3 * length)
    return (float(np.median(radius)), float(np.median(np.abs(pos[:, 2]))),
            float(v_r[ring].std()), float(v_phi[ring].mean()))


def isolated_benchmark(physics: Physics, counts: tuple[int, int, int]) -> None:
    ic = _pair(counts, _far_away(), (1, 1, 1))
    run = InteractParams(duration=1.0, nFrames=2, softening=1.0, mass_1=15, mass_2=1e-6)
    frames: list[nbody.Frame] = []
    t0 = time.perf_counter()
    summary = nbody.interact(ic, run, frames.append, physics, seed=3)
    took = time.perf_counter() - t0
    keep = nbody.followed(ic, physics)
    mine = ic.galaxy[keep] == 0
    disk = mine & (ic.component[keep] == 0)
    bulge = mine & (ic.component[keep] == 1)
    print(f"isolated galaxy 1 over 1 Gyr, {physics.value} physics, disk/bulge/halo "
          f"{counts[0]}/{counts[1]}/{counts[2]}, softening {summary.softening:g} kpc "
          f"({took:.1f} s):")
    rows = [_disk_figures(f.pos[disk], f.vel[disk], ic.length_kpc[0]) for f in frames]
    bulge_r = [float(np.median(np.linalg.norm(f.pos[bulge], axis=1))) for f in frames]
    names = ("disk R half-mass [kpc]", "disk median |z| [kpc]", "disk sigma_R 1-3 Rd [km/s]",
             "disk v_phi 1-3 Rd [km/s]")
    for k, name in enumerate(names):
        print(f"  {name:<28} {rows[0][k]:8.3f} -> {rows[1][k]:8.3f}")
    print(f"  {'bulge r half-mass [kpc]':<28} {bulge_r[0]:8.3f} -> {bulge_r[1]:8.3f}")
    if physics is Physics.RESTRICTED:
        field = nbody.prepare(ic, run, physics, seed=3).fields[0]
        energy = [0.5 * np.sum(f.vel[mine] ** 2, axis=1)
                  + field.potential(np.linalg.norm(f.pos[mine], axis=1)) for f in frames]
        error = np.abs(energy[1] / energy[0] - 1)
        print(f"  relative energy error per star: median {np.median(error):.1e}, "
              f"99th percentile {np.percentile(error, 99):.1e}")
    elif summary.relative_energy_error is not None:
        print(f"  relative energy error (total): {summary.relative_energy_error:.1e}")


def timing_benchmark(sizes: list[int], steps: int) -> None:
    payloads = _payloads()
    print("restricted physics, one 3 Gyr job of the base job's orbit, 100 frames "
          "(stars per galaxy: disk 10/11, bulge 1/11):")
    for n in sizes:
        disk, bulge = max(1, n * 10 // 11), max(1, n // 11)
        ic = _pair((disk, bulge, 10), payloads["merge"], (disk, bulge, 10))
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            (tmp / "merge").mkdir()
            (tmp / "out").mkdir()
            tasks.write_initial(ic, tmp / "merge" / tasks.INITIAL_FILE, payloads["merge"])
            interact = {**payloads["interact"], "duration": 3.0, "nFrames": 100}
            t0 = time.perf_counter()
            tasks.run_interact(interact, tmp / "merge", tmp / "out")
            took = time.perf_counter() - t0
            sizes_out = {p.name: p.stat().st_size for p in (tmp / "out").iterdir()}
        print(f"  N = {2 * (disk + bulge):6d} stars: {took:7.1f} s; output bytes "
              f"{sum(sizes_out.values()) / 2**20:7.1f} MiB (snapshots.h5 "
              f"{sizes_out[tasks.SNAPSHOT_FILE] / 2**20:.1f}, csv.gz "
              f"{sizes_out[tasks.ASCII_FILE] / 2**20:.1f})")
    print(f"live physics, REBOUND tree, seconds per step (mean of {steps} steps):")
    for n in sizes:
        per = max(1, n // 6)
        ic = _pair((per, per, per), payloads["merge"], (per, per, per))
        run = InteractParams.model_validate(payloads["interact"])
        state = nbody.prepare(ic, run, Physics.LIVE, seed=1)
        sim = nbody.simulation(state.pos, state.vel, state.mass, state.softening, 1e5)
        sim.dt = 1e-4
        sim.steps(1)
        t0 = time.perf_counter()
        sim.steps(steps)
        print(f"  N = {len(state.mass):6d}: {(time.perf_counter() - t0) / steps * 1000:8.1f} ms")


ENCOUNTERS = {  # name: (mass_2, length_scale 2, merge position, velocity)
    "1:1 prograde": (15.0, 1.0, (100.0, 30.0, 0.0), (-120.0, 60.0, 0.0)),
    "10:1 radial": (1.5, 0.4, (100.0, 100.0, 0.0), (-100.0, -100.0, 0.0)),
}


def _centres(frame: nbody.Frame, galaxy_id: np.ndarray, bulge: np.ndarray) -> np.ndarray:
    """Each galaxy's centre: the median of its bulge stars (the same estimator both ways)."""
    return np.stack([np.median(frame.pos[(galaxy_id == g) & bulge], axis=0) for g in (0, 1)])


def _orbit_figures(times: np.ndarray, sep: np.ndarray) -> tuple[float, float, float]:
    i = 1
    while i < len(sep) - 1 and not (sep[i] <= sep[i - 1] and sep[i] <= sep[i + 1]):
        i += 1
    k = i + 1
    while k < len(sep) - 1 and not (sep[k] >= sep[k - 1] and sep[k] >= sep[k + 1]):
        k += 1
    apart = np.flatnonzero(sep > MERGED_KPC)
    merged = times[apart[-1] + 1] if len(apart) and apart[-1] + 1 < len(times) else np.nan
    return float(times[i]), float(sep[min(k, len(sep) - 1)]), float(merged)


def reference_benchmark(n: int, grid: Path) -> None:
    print(f"restricted vs self-consistent tree reference of {n} particles:")
    rows: list[list[Image.Image]] = [[], []]
    for name, (mass_2, length_2, position, velocity) in ENCOUNTERS.items():
        merge = {"length_scale": {"galaxy_1": 1, "galaxy_2": length_2},
                 "position_galaxy_2": dict(zip("xyz", position, strict=True)),
                 "velocity_galaxy_2": dict(zip(("vx", "vy", "vz"), velocity, strict=True)),
                 "theta_galaxy_2": 0}
        per = n // 2
        counts = (per * 3 // 10, per // 10, per * 6 // 10)
        ic = _pair(counts, merge, counts)
        run = InteractParams(duration=2.0, nFrames=41, softening=1.0, mass_1=15,
                             mass_2=mass_2)
        for row, physics in enumerate((Physics.RESTRICTED, Physics.LIVE)):
            keep = nbody.followed(ic, physics)
            gal, comp = ic.galaxy[keep], ic.component[keep]
            frames: list[nbody.Frame] = []
            t0 = time.perf_counter()
            nbody.interact(ic, run, frames.append, physics, seed=5)
            took = time.perf_counter() - t0
            times = np.array([f.time_gyr for f in frames])
            centres = [_centres(f, gal, comp == 1) for f in frames]
            sep = np.array([np.linalg.norm(c[1] - c[0]) for c in centres])
            peri, apo, merged = _orbit_figures(times, sep)
            tails = []
            for t in (0.5, 0.75):
                k = int(np.argmin(np.abs(times - t)))
                d = [np.linalg.norm(frames[k].pos[comp == 0] - c, axis=1) for c in centres[k]]
                tails.append(float(np.mean((d[0] > TAIL_KPC) & (d[1] > TAIL_KPC))))
            print(f"  {name:<13} {physics.value:<10} first pericentre {peri:5.2f} Gyr, first "
                  f"apocentre {apo:6.1f} kpc, merger {merged:5.2f} Gyr, tail fraction "
                  f"{tails[0]:.3f}/{tails[1]:.3f} at 0.5/0.75 Gyr ({took:.0f} s)")
            plot = PlotParams(x_axis="x", y_axis="y", x_min=-150, x_max=150, y_min=-150,
                              y_max=150, colour_scheme="colour", plot_size="small")
            stars = comp != 2
            for k in (10, 15, 20, 30):
                rows[row].append(render.density_image(
                    frames[k].pos[stars], np.ones(int(stars.sum())), plot,
                    label=f"{name} {physics.value}", galaxy=gal[stars],
                    time_gyr=frames[k].time_gyr))
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * len(rows[0]), height * 2))
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB"), (c * width, r * height))
    sheet.save(grid)
    print(f"  picture grid (restricted above, live below): {grid}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,20000,100000")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--live-isolated", type=int, default=6000,
                        help="particles of the live isolated galaxy (minutes above 20000)")
    parser.add_argument("--reference", type=int, default=0,
                        help="particles of the self-consistent reference runs (0: skip)")
    parser.add_argument("--grid", type=Path, default=Path("physics-grid.png"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    chain_benchmark()
    stars = min(20_000, max(sizes))  # the 20k disk stars; fewer for a smoke test
    isolated_benchmark(Physics.RESTRICTED, (stars, stars // 10, 10))
    n = min(args.live_isolated, 4 * max(sizes))
    isolated_benchmark(Physics.LIVE, (n * 3 // 10, n // 10, n * 6 // 10))
    timing_benchmark(sizes, args.steps)
    if args.reference:
        reference_benchmark(args.reference, args.grid)
    else:
        print("reference comparison: skipped (--reference 50000 runs it; an hour on one core)")


if __name__ == "__main__":
    main()
