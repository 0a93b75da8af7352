"""Benchmark of the local site's physics; prints figures, asserts nothing.

    python -m tests.benchmarks.physics [--sizes 1000,3000,10000] [--steps 20]

Part 1 runs the example base job's chain (galaxy 1, galaxy 2, merge, interaction,
plots) through the same task functions the site's workers call, and prints seconds per
step, particles, the interaction's step count and energy error, and output bytes.
Part 2 times REBOUND's direct softened gravity per step for N = 1k, 3k, 10k particles
sampled from the same galaxy models, and the growth ratios (direct summation: ~N^2).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from gibatch.params import GalaxyParams, InteractParams, MergeParams
from gibatch.sim import galaxy, nbody, tasks

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "examples" / "base_job"


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def chain_benchmark() -> None:
    payloads = {p.stem: json.loads(p.read_text()) for p in BASE.glob("*.json")}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        outs = {name: tmp / name for name in ("g1", "g2", "merge", "interact", "plot1", "plot2")}
        for out in outs.values():
            out.mkdir()
        runs = [
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
        print("example base job (examples/base_job), one process:")
        for label, run, key in runs:
            t0 = time.perf_counter()
            run()
            took = time.perf_counter() - t0
            files = ", ".join(f"{p.name} {p.stat().st_size / 1024:.0f} KiB"
                              for p in sorted(outs[key].iterdir()))
            print(f"  {label:<12} {took:6.2f} s   {_bytes(outs[key]) / 1024:7.0f} KiB  ({files})")
        log = (outs["interact"] / "log.txt").read_text()
        for line in log.splitlines():
            if line.startswith(("particles:", "relative energy error")):
                print(f"  interaction {line}")
        total = sum(_bytes(o) for o in outs.values())
        print(f"  output bytes in all: {total / 2**20:.1f} MiB")


def scaling_benchmark(sizes: list[int], steps: int) -> None:
    """Seconds per leapfrog step with direct softened gravity, as the site integrates."""
    print(f"direct gravity, REBOUND leapfrog, seconds per step (mean of {steps} steps):")
    spec = json.loads((BASE / "galaxy1.json").read_text())
    merge = MergeParams.model_validate(json.loads((BASE / "merge.json").read_text()))
    interact = InteractParams.model_validate(json.loads((BASE / "interact.json").read_text()))
    previous: tuple[int, float] | None = None
    for n in sizes:
        per = max(1, n // 6)  # two galaxies of three components
        for comp in ("disk", "bulge", "halo"):
            spec[comp]["number_of_particles"] = per
        g1 = galaxy.build(GalaxyParams.model_validate(spec), seed=1)
        g2 = galaxy.build(GalaxyParams.model_validate({**spec, "galaxy_number": 2}), seed=2)
        ic = nbody.merge(g1, g2, merge)
        pos, vel, mass = nbody.physical_state(ic, (interact.mass_1, interact.mass_2))
        sim = nbody.simulation(pos, vel, mass, interact.softening)
        sim.dt = 1e-4
        sim.steps(1)  # warm up
        t0 = time.perf_counter()
        sim.steps(steps)
        per_step = (time.perf_counter() - t0) / steps
        growth = ""
        if previous is not None:
            ratio = per_step / previous[1]
            growth = (f"   x{ratio:.1f} for x{len(mass) / previous[0]:.1f} particles "
                      f"(N^2 would be x{(len(mass) / previous[0]) ** 2:.1f})")
        print(f"  N = {len(mass):6d}: {per_step * 1000:8.1f} ms{growth}")
        previous = (len(mass), per_step)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,3000,10000")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    chain_benchmark()
    scaling_benchmark([int(s) for s in args.sizes.split(",")], args.steps)


if __name__ == "__main__":
    main()
