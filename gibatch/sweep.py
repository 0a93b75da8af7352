"""Sweep generation: job folders from a base job and variations of dotted keys.

    from gibatch import sweep
    varies = [sweep.parse_vary("merge.theta_galaxy_2=0:90:15"),
              sweep.parse_vary("interact.mass_2=1,1.5,2")]
    sweep.write_sweep(Path("base_job"), Path("jobs"), sweep.grid(varies))

A key is `FILE.PATH`: the job file's stem (`galaxy2`, `merge`, `interact`, `plot1`) and
the path inside its JSON (`halo.potential_well_depth`). It must exist in the base job,
so that a typo fails here rather than as an unknown key in 500 folders.

The `orbit.*` keys are derived: they set galaxy 2's position and velocity whole, from
`distance` (kpc), `speed` (km/s), `azimuth` (deg, position angle in the x-y plane from
+x), `elevation` (deg, above that plane) and `approach` (deg, angle between the velocity
and the line to galaxy 1: 0 falls straight in, 90 moves tangentially in the direction
of increasing azimuth). Orbit keys not varied keep the base job's values.

Generators with logic of their own build points (dicts of key -> value) in Python and
call `write_sweep`; every job is validated before any folder is written.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gibatch.jobs import JobInvalid, job_files, load_job

Value = int | float | str
Point = dict[str, Value]
SWEEP_FILE = "sweep.json"
ORBIT_KEYS = ("distance", "speed", "azimuth", "elevation", "approach")
_GRID_LIMIT = 100_000


class SweepError(Exception):
    """A sweep cannot be generated as asked; the message names the key or the file."""


@dataclass(frozen=True)
class Vary:
    """One varied key: explicit `values`, or a range `low:high[:step]`."""

    key: str
    values: tuple[Value, ...] = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None

    @property
    def text(self) -> str:
        if self.values:
            return f"{self.key}=" + ",".join(map(str, self.values))
        tail = f":{_fmt(self.step)}" if self.step is not None else ""
        return f"{self.key}={_fmt(self.low)}:{_fmt(self.high)}{tail}"

    def grid_values(self) -> tuple[Value, ...]:
        if self.values:
            return self.values
        if self.step is None or self.low is None or self.high is None:
            raise SweepError(f"{self.key}: a range needs a step for a grid "
                             "(low:high:step), or use --random N")
        steps = (self.high - self.low) / self.step  # may be inf: 0:1e308:1e-300
        if steps + 1 > _GRID_LIMIT:
            raise SweepError(f"{self.key}: more than {_GRID_LIMIT} values")
        count = math.floor(steps + 1e-9) + 1
        return tuple(_tidy(self.low + k * self.step) for k in range(count))

    def sample(self, rng: random.Random, integer: bool) -> Value:
        """One random value: a choice among values, else uniform in the range."""
        if self.values or self.step is not None:
            return rng.choice(self.grid_values())
        assert self.low is not None and self.high is not None
        if integer:
            return rng.randint(math.ceil(self.low), math.floor(self.high))
        return round(rng.uniform(self.low, self.high), 4)


def _scalar(token: str) -> Value:
    try:
        value = json.loads(token)
    except ValueError:
        return token
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return token
    return value


def _tidy(x: float) -> Value:
    x = round(float(x), 9)
    return int(x) if x.is_integer() else x


def _fmt(x: float | None) -> str:
    return "" if x is None else str(_tidy(x))


def parse_vary(text: str) -> Vary:
    """`KEY=a,b,c` (values) or `KEY=low:high[:step]` (a range, inclusive)."""
    key, sep, spec = text.partition("=")
    key, spec = key.strip(), spec.strip()
    if not sep or not key or not spec or "." not in key:
        raise SweepError(f"--vary {text!r}: expected FILE.KEY=VALUES, e.g. "
                         "merge.theta_galaxy_2=0:90:15 or interact.mass_2=1,1.5,2")
    if ":" in spec and "," not in spec:
        parts = [_scalar(p) for p in spec.split(":")]
        if len(parts) not in (2, 3) or not all(isinstance(p, int | float) for p in parts):
            raise SweepError(f"--vary {text!r}: a range is low:high or low:high:step, in numbers")
        low, high = parts[0], parts[1]
        step = parts[2] if len(parts) == 3 else None
        if not all(math.isfinite(p) for p in parts):  # type: ignore[arg-type]
            raise SweepError(f"--vary {text!r}: NaN and Infinity are no bounds of a range")
        if high < low or (step is not None and step <= 0):  # type: ignore[operator]
            raise SweepError(f"--vary {text!r}: needs low <= high and a positive step")
        return Vary(key, low=low, high=high, step=step)  # type: ignore[arg-type]
    values = tuple(_scalar(v.strip()) for v in spec.split(","))
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise SweepError(f"--vary {text!r}: NaN and Infinity are no values a job may hold")
    return Vary(key, values=values)


def distinct(varies: Sequence[Vary]) -> None:
    """Raise SweepError for a key varied twice: a point holds one value per key, so the
    second list silently replaced the first (4 jobs of which 2 were duplicates)."""
    seen: set[str] = set()
    for v in varies:
        if v.key in seen:
            raise SweepError(f"--vary {v.key}: given twice; give all its values at once "
                             "(a,b,c)")
        seen.add(v.key)


def grid(varies: Sequence[Vary]) -> list[Point]:
    """Every combination (the first key varies slowest)."""
    distinct(varies)
    keys = [v.key for v in varies]
    lists = [v.grid_values() for v in varies]
    if math.prod(len(v) for v in lists) > _GRID_LIMIT:
        raise SweepError(f"the grid has more than {_GRID_LIMIT} jobs")
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]


def zipped(varies: Sequence[Vary]) -> list[Point]:
    """The k-th value of every key together; all must have as many values."""
    distinct(varies)
    lists = [v.grid_values() for v in varies]
    if len({len(v) for v in lists}) > 1:
        raise SweepError("--zip needs as many values for every key: " + ", ".join(
            f"{v.key} has {len(values)}" for v, values in zip(varies, lists, strict=True)))
    return [dict(zip([v.key for v in varies], combo, strict=True))
            for combo in zip(*lists, strict=True)]


def random_points(varies: Sequence[Vary], count: int, seed: int,
                  base: Mapping[str, Any] | None = None) -> list[Point]:
    """`count` independent samples: uniform within ranges, uniform choice among values.

    A key whose value in the `base` job files is an integer (a particle count) is drawn
    as an integer; every other range as a float.
    """
    if count > _GRID_LIMIT:
        raise SweepError(f"--random {count}: more than {_GRID_LIMIT} jobs (as a grid)")
    distinct(varies)
    rng = random.Random(seed)
    integer = {v.key: isinstance(lookup(base or {}, v.key), int) for v in varies}
    for v in varies:  # random.randint(5, 4) would raise a bare ValueError
        if (integer[v.key] and not v.values and v.step is None and v.low is not None
                and v.high is not None and math.ceil(v.low) > math.floor(v.high)):
            raise SweepError(f"--vary {v.text}: {v.key} is an integer in the base job, "
                             "and this range holds none")
    return [{v.key: v.sample(rng, integer[v.key]) for v in varies} for _ in range(count)]


def lookup(files: Mapping[str, Any], key: str) -> object:
    """The value at dotted `key` (`galaxy1.disk.number_of_particles`) in job files, or None."""
    node: object = files
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


# -- applying a point to the base job

def orbit_of(merge: Mapping[str, Any]) -> dict[str, float]:
    """The base job's orbit keys, read back from its position and velocity."""
    p, v = merge["position_galaxy_2"], merge["velocity_galaxy_2"]
    x, y, z = float(p["x"]), float(p["y"]), float(p["z"])
    vx, vy, vz = float(v["vx"]), float(v["vy"]), float(v["vz"])
    distance = math.sqrt(x * x + y * y + z * z)
    speed = math.sqrt(vx * vx + vy * vy + vz * vz)
    azimuth = math.atan2(y, x)
    elevation = math.asin(z / distance) if distance else 0.0
    inward = -math.cos(elevation) * math.cos(azimuth) * vx - math.cos(elevation) * math.sin(
        azimuth) * vy - math.sin(elevation) * vz
    tangential = -math.sin(azimuth) * vx + math.cos(azimuth) * vy
    return {"distance": distance, "speed": speed, "azimuth": math.degrees(azimuth),
            "elevation": math.degrees(elevation),
            "approach": math.degrees(math.atan2(tangential, inward)) if speed else 0.0}


def orbit_state(o: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Position and velocity of galaxy 2 from orbit keys (see the module docstring)."""
    az, el, ap = (math.radians(o[k]) for k in ("azimuth", "elevation", "approach"))
    radial = (math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el))
    tangent = (-math.sin(az), math.cos(az), 0.0)
    pos = [o["distance"] * r for r in radial]
    vel = [o["speed"] * (-math.cos(ap) * r + math.sin(ap) * t)
           for r, t in zip(radial, tangent, strict=True)]
    return ({k: round(c, 4) + 0.0 for k, c in zip("xyz", pos, strict=True)},
            {k: round(c, 4) + 0.0 for k, c in zip(("vx", "vy", "vz"), vel, strict=True)})


_ORBIT_SETS = ("merge.position_galaxy_2", "merge.velocity_galaxy_2")  # what orbit.* sets


def apply_point(base: Mapping[str, Any], point: Mapping[str, Value]) -> dict[str, Any]:
    """The job files (stem -> JSON object) of `base` with `point`'s values set."""
    files = copy.deepcopy(dict(base))
    orbit: dict[str, float] = {}
    overwritten = [k for k in point if k.startswith(_ORBIT_SETS)]
    if overwritten and any(k.startswith("orbit.") for k in point):
        raise SweepError(f"{overwritten[0]}: orbit.* keys set galaxy 2's position and "
                         "velocity whole, overwriting it; vary one or the other")
    for key, value in point.items():
        stem, _, path = key.partition(".")
        if stem == "orbit":
            if path not in ORBIT_KEYS or not isinstance(value, int | float):
                raise SweepError(f"{key}: orbit keys are {', '.join(ORBIT_KEYS)}, with numbers")
            orbit[path] = float(value)
            continue
        if stem not in files:
            raise SweepError(f"{key}: the base job has no {stem}.json")
        node = files[stem]
        *parents, leaf = path.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node, dict) or part not in node:
                raise SweepError(f"{key}: {stem}.json has no key "
                                 f"{'.'.join(parents[: i + 1])!r}")
            node = node[part]
        if not isinstance(node, dict) or leaf not in node:
            raise SweepError(f"{key}: {stem}.json has no key {path!r} (keys are taken from "
                             "the base job so that a typo cannot pass)")
        node[leaf] = value
    if orbit:
        merge = files.get("merge")
        if merge is None:
            raise SweepError("orbit.*: the base job has no merge.json")
        full = {**orbit_of(merge), **orbit}
        merge["position_galaxy_2"], merge["velocity_galaxy_2"] = orbit_state(full)
    return files


def job_name(index: int, width: int, point: Mapping[str, Value]) -> str:
    """`007-theta_galaxy_2_45-mass_2_1.5`: readable, unique by its index, safe."""
    parts = [f"{index:0{width}d}"]
    for key, value in point.items():
        leaf = key.rsplit(".", 1)[-1]
        parts.append(re.sub(r"[^A-Za-z0-9_.+]", "_", f"{leaf}_{value}"))
    return "-".join(parts)[:96]


def read_base(base: Path) -> dict[str, Any]:
    """The base job's files, checked: it must itself be a valid job."""
    if not base.is_dir():
        raise SweepError(f"{base}: no such job folder")
    try:
        return job_files(load_job(base))
    except JobInvalid as exc:
        raise SweepError(f"the base job is not valid: {exc}") from None


def _check_keys(files: Mapping[str, Any], points: Sequence[Point]) -> None:
    """Raise SweepError for a key the base job lacks (or keys that overwrite each other)
    before any folder is made: `out` was left behind, empty, by a typo."""
    for point in {tuple(p): p for p in points}.values():  # each set of keys once
        apply_point(files, point)


def write_sweep(base: Path, out: Path, points: Sequence[Point], *, how: Mapping[str, Any]
                | None = None, overwrite: bool = False) -> list[Path]:
    """Write one job folder per point under `out`, and `out/sweep.json`.

    Every job is written to a staging folder and validated first; nothing lands in
    `out` unless all are valid. Existing job folders of the same names (or an existing
    sweep.json) are an error unless `overwrite`.
    """
    if not points:
        raise SweepError("no jobs to write")
    files = read_base(base)
    width = max(3, len(str(len(points))))
    named = [(job_name(i + 1, width, p), p) for i, p in enumerate(points)]
    if os.path.lexists(out) and not out.is_dir():
        raise SweepError(f"--out {out}: is not a folder")
    _check_keys(files, points)
    out.mkdir(parents=True, exist_ok=True)
    clashes = [n for n, _ in named if os.path.lexists(out / n)]
    if os.path.lexists(out / SWEEP_FILE):
        clashes.append(SWEEP_FILE)
    if clashes and not overwrite:
        raise SweepError(f"{out}: would overwrite {len(clashes)} existing entries (e.g. "
                         f"{clashes[0]}); pass --force to replace them")
    with tempfile.TemporaryDirectory(dir=out, prefix=".gibatch-sweep-") as staging:
        problems: list[str] = []
        for name, point in named:
            folder = Path(staging) / name
            folder.mkdir()
            for stem, obj in apply_point(files, point).items():
                (folder / f"{stem}.json").write_text(json.dumps(obj, indent=2) + "\n")
            try:
                load_job(folder)
            except JobInvalid as exc:
                problems.extend(str(p) for p in exc.problems)
        if problems:
            raise SweepError(f"{len(problems)} problems in the generated jobs, nothing "
                             "written:\n  " + "\n  ".join(problems[:20]))
        for name, _ in named:
            old = out / name
            if old.is_symlink() or (os.path.lexists(old) and not old.is_dir()):
                old.unlink()  # a link is replaced, never what it points to
            elif old.exists():
                shutil.rmtree(old)
            (Path(staging) / name).rename(old)
        record = {"base": str(base.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  **(how or {}), "jobs": dict(named)}
        staged = Path(staging) / SWEEP_FILE
        staged.write_text(json.dumps(record, indent=2) + "\n")
        staged.replace(out / SWEEP_FILE)  # a link there is replaced, never written through
    return [out / n for n, _ in named]
