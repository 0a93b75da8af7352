"""The four kinds of task the site runs, as plain functions for a worker process.

Each takes its validated parameters, the result folders of the sections it reads, and
an empty output folder; it writes its files there and a short `log.txt`. A task that
cannot run raises TaskFailed; the site turns that into status Failed with `error.txt`.

Output files (documented in README.md):
  Galaxy N            galaxy.h5 (model units), preview.png, log.txt
  Galaxy Merge        initial.h5 (kpc; velocities in model units), preview.png, log.txt
  Galaxy Interaction  snapshots.h5 (kpc, km/s, Gyr; every frame), preview.png, log.txt
  Plot N              final.png, animation.gif, thumbnail.png, log.txt
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gibatch.params import Component, GalaxyParams, InteractParams, MergeParams, PlotParams
from gibatch.sim import galaxy, nbody, render
from gibatch.sim.galaxy import Realisation

GALAXY_FILE = "galaxy.h5"
INITIAL_FILE = "initial.h5"
SNAPSHOT_FILE = "snapshots.h5"
PREVIEW_EXTENT_KPC = 250.0


class TaskFailed(Exception):
    """The task cannot produce a result; the message goes into error.txt."""


def _seed(payload: dict[str, Any]) -> int:
    blob = json.dumps(payload, sort_keys=True).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little")


@contextmanager
def _log(out: Path, kind: str, params: dict[str, Any]) -> Iterator[list[str]]:
    lines = [f"task: {kind}", f"parameters: {json.dumps(params, sort_keys=True)}"]
    start = time.perf_counter()
    yield lines
    lines.append(f"wall time: {time.perf_counter() - start:.2f} s")
    (out / "log.txt").write_text("\n".join(lines) + "\n")


def _require(folder: Path | None, filename: str, what: str) -> Path:
    if folder is None or not (folder / filename).is_file():
        raise TaskFailed(f"{what} has no completed result on this model number")
    return folder / filename


def run_galaxy(payload: dict[str, Any], out: Path) -> None:
    params = GalaxyParams.model_validate(payload)
    with _log(out, f"Galaxy {params.galaxy_number}", payload) as log:
        real = galaxy.build(params, _seed(payload))
        with h5py.File(out / GALAXY_FILE, "w") as f:
            f.attrs["units"] = "model: G=1, disk scale length 1"
            f.attrs["parameters"] = json.dumps(payload)
            f["position"] = real.pos
            f["velocity"] = real.vel
            f["mass"] = real.mass
            f["component"] = real.component
            f["component"].attrs["legend"] = "0 disk, 1 bulge, 2 halo"
        render.save_png(render.preview(real.pos, real.mass, 20.0), out / "preview.png")
        log.append(f"particles: {len(real.mass)}; model mass: {real.total_mass:.4f}")
        radius = galaxy.half_mass_radius(real.pos, real.mass)
        log.append(f"half-mass radius (model units): {radius:.3f}")


def _read_galaxy(path: Path) -> Realisation:
    with h5py.File(path, "r") as f:
        return Realisation(
            f["position"][...], f["velocity"][...], f["mass"][...], f["component"][...]
        )


def run_merge(payload: dict[str, Any], g1: Path | None, g2: Path | None, out: Path) -> None:
    params = MergeParams.model_validate(payload)
    first = _read_galaxy(_require(g1, GALAXY_FILE, "Galaxy 1"))
    second = _read_galaxy(_require(g2, GALAXY_FILE, "Galaxy 2"))
    with _log(out, "Galaxy Merge", payload) as log:
        ic = nbody.merge(first, second, params)
        with h5py.File(out / INITIAL_FILE, "w") as f:
            f.attrs["units"] = "position kpc; velocity_model in each galaxy's model units"
            f.attrs["parameters"] = json.dumps(payload)
            f.attrs["length_kpc"] = ic.length_kpc
            f.attrs["model_mass"] = ic.model_mass
            f.attrs["bulk_velocity_km_s"] = np.stack(ic.bulk_velocity_km_s)
            f["position"] = ic.pos_kpc
            f["velocity_model"] = ic.vel_model
            f["mass_model"] = ic.mass_model
            f["galaxy"] = ic.galaxy
            f["component"] = ic.component
        render.save_png(
            render.preview(ic.pos_kpc, ic.mass_model, PREVIEW_EXTENT_KPC), out / "preview.png"
        )
        log.append(f"particles: {len(ic.mass_model)} ({int((ic.galaxy == 0).sum())} + "
                   f"{int((ic.galaxy == 1).sum())})")


def _read_initial(path: Path) -> nbody.InitialCondition:
    with h5py.File(path, "r") as f:
        bulk = f.attrs["bulk_velocity_km_s"]
        return nbody.InitialCondition(
            pos_kpc=f["position"][...],
            vel_model=f["velocity_model"][...],
            mass_model=f["mass_model"][...],
            galaxy=f["galaxy"][...],
            component=f["component"][...],
            length_kpc=tuple(f.attrs["length_kpc"]),
            model_mass=tuple(f.attrs["model_mass"]),
            bulk_velocity_km_s=(bulk[0], bulk[1]),
        )


def run_interact(payload: dict[str, Any], merged: Path | None, out: Path) -> None:
    params = InteractParams.model_validate(payload)
    ic = _read_initial(_require(merged, INITIAL_FILE, "Galaxy Merge"))
    n = len(ic.mass_model)
    with _log(out, "Galaxy Interaction", payload) as log, h5py.File(out / SNAPSHOT_FILE, "w") as f:
        f.attrs["units"] = "position kpc, velocity km/s, time Gyr, mass 1e11 Msun"
        f.attrs["parameters"] = json.dumps(payload)
        _, _, mass = nbody.physical_state(ic, (params.mass_1, params.mass_2))
        f["mass"] = mass
        f["galaxy"] = ic.galaxy
        f["component"] = ic.component
        pos_ds = f.create_dataset("position", (params.nFrames, n, 3), dtype="f4")
        vel_ds = f.create_dataset("velocity", (params.nFrames, n, 3), dtype="f4")
        time_ds = f.create_dataset("time", (params.nFrames,), dtype="f8")

        def store(frame: nbody.Frame) -> None:  # one frame at a time: bounded memory
            pos_ds[frame.index] = frame.pos
            vel_ds[frame.index] = frame.vel
            time_ds[frame.index] = frame.time_gyr

        try:
            summary = nbody.interact(ic, params, store)
        except ValueError as exc:
            raise TaskFailed(str(exc)) from exc
        f.attrs["relative_energy_error"] = summary.relative_energy_error
        render.save_png(
            render.preview(pos_ds[-1], mass, PREVIEW_EXTENT_KPC), out / "preview.png"
        )
        log.append(f"particles: {n}; frames: {params.nFrames}; steps: {summary.steps}; "
                   f"dt: {summary.dt_gyr:.3e} Gyr")
        log.append(f"relative energy error: {summary.relative_energy_error:.3e}")


def run_plot(payload: dict[str, Any], interaction: Path | None, out: Path) -> None:
    params = PlotParams.model_validate(payload)
    snap = _require(interaction, SNAPSHOT_FILE, "Galaxy Interaction")
    with _log(out, "Plot", payload) as log, h5py.File(snap, "r") as f:
        # Plots show the stars (disk and bulge); the dark halo only where there are none.
        luminous = f["component"][...] != galaxy.COMPONENT_ID[Component.HALO]
        shown = luminous if luminous.any() else np.ones_like(luminous)
        mass = f["mass"][...][shown]
        times = f["time"][...]
        frames = [
            render.density_image(f["position"][k][shown], mass, params,
                                 f"t = {times[k]:.2f} Gyr")
            for k in range(len(times))
        ]
        render.save_png(frames[-1], out / "final.png")
        render.save_gif(frames, out / "animation.gif")
        thumb = frames[-1].copy()
        thumb.thumbnail((render.THUMBNAIL_PX, render.THUMBNAIL_PX))
        render.save_png(thumb, out / "thumbnail.png")
        log.append(f"frames: {len(frames)}; size: {params.plot_size}")
