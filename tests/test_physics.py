"""The local simulator's physics: equilibrium, energy, placement, frames, output formats."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from gibatch.params import GalaxyParams, InteractParams, MergeParams
from gibatch.sim import galaxy, nbody, tasks
from gibatch.sim.units import MODEL_LENGTH_KPC
from tests.conftest import read_base


def example(name: str) -> dict[str, object]:
    return read_base()[name]


@pytest.mark.slow
def test_isolated_galaxy_stays_in_equilibrium_for_1_gyr() -> None:
    params = GalaxyParams.model_validate(example("galaxy1.json"))
    g = galaxy.build(params, seed=1)
    n = len(g.mass)
    ic = nbody.InitialCondition(
        g.pos * MODEL_LENGTH_KPC, g.vel, g.mass, np.zeros(n, np.int8), g.component,
        (MODEL_LENGTH_KPC, MODEL_LENGTH_KPC), (g.total_mass, 1.0), (np.zeros(3), np.zeros(3)),
    )
    run = InteractParams(duration=1.0, nFrames=2, softening=1.0, mass_1=15, mass_2=1)
    frames: list[nbody.Frame] = []
    summary = nbody.interact(ic, run, frames.append)
    r0 = galaxy.half_mass_radius(frames[0].pos, g.mass)
    r1 = galaxy.half_mass_radius(frames[-1].pos, g.mass)
    assert abs(r1 / r0 - 1) < 0.10, (r0, r1)
    assert summary.relative_energy_error < 0.01


def test_merge_places_scales_and_tilts_galaxy_2() -> None:
    g1 = galaxy.build(GalaxyParams.model_validate(example("galaxy1.json")), seed=1)
    g2 = galaxy.build(GalaxyParams.model_validate(example("galaxy2.json")), seed=2)
    merge = MergeParams.model_validate({**example("merge.json"), "theta_galaxy_2": 90})
    ic = nbody.merge(g1, g2, merge)
    second = ic.galaxy == 1
    centre = np.average(ic.pos_kpc[second], axis=0, weights=ic.mass_model[second])
    assert np.allclose(centre, [100, 100, 0], atol=1e-6)
    assert np.allclose(np.average(ic.pos_kpc[~second], axis=0, weights=g1.mass), 0, atol=1e-6)
    # Tilted by 90 degrees about x: the disk's thin axis (z) now lies along y.
    disk = ic.component[second] == galaxy.COMPONENT_ID[galaxy.Component.DISK]
    spread = np.std(ic.pos_kpc[second][disk] - centre, axis=0)
    assert spread[1] < 0.3 * spread[2]
    # Scaled: galaxy 2 (length scale 0.4) is smaller than galaxy 1 by that factor.
    r1 = galaxy.half_mass_radius(g1.pos, g1.mass) * MODEL_LENGTH_KPC
    r2 = galaxy.half_mass_radius(ic.pos_kpc[second], ic.mass_model[second])
    assert r2 / r1 == pytest.approx(0.4 * galaxy.half_mass_radius(g2.pos, g2.mass)
                                    / galaxy.half_mass_radius(g1.pos, g1.mass), rel=1e-6)
    vel = np.average(nbody.physical_state(ic, (15, 1.5))[1][second], axis=0,
                     weights=ic.mass_model[second])
    assert np.allclose(vel, [-100, -100, 0], atol=1e-6)


@pytest.mark.slow
def test_full_chain_writes_readable_outputs(tmp_path: Path) -> None:
    dirs = {k: tmp_path / k for k in ("g1", "g2", "merge", "interact", "plot")}
    for d in dirs.values():
        d.mkdir()
    tasks.run_galaxy(example("galaxy1.json"), dirs["g1"])
    tasks.run_galaxy(example("galaxy2.json"), dirs["g2"])
    tasks.run_merge(example("merge.json"), dirs["g1"], dirs["g2"], dirs["merge"])
    interact = {**example("interact.json"), "nFrames": 12, "duration": 1.0}
    tasks.run_interact(interact, dirs["merge"], dirs["interact"])
    tasks.run_plot(example("plot1.json"), dirs["interact"], dirs["plot"])
    with h5py.File(dirs["interact"] / "snapshots.h5") as f:
        assert f["position"].shape[0] == 12 and f["time"][-1] == pytest.approx(1.0)
        assert np.allclose(np.diff(f["time"][...]), 1.0 / 11)
        assert f.attrs["relative_energy_error"] < 0.01
    with Image.open(dirs["plot"] / "animation.gif") as gif:
        assert gif.n_frames == 12
    with Image.open(dirs["plot"] / "final.png") as png:
        assert png.size == (512, 512)
    assert "relative energy error" in (dirs["interact"] / "log.txt").read_text()


def test_merge_without_galaxies_fails_with_reason(tmp_path: Path) -> None:
    with pytest.raises(tasks.TaskFailed, match="Galaxy 1 has no completed result"):
        tasks.run_merge(example("merge.json"), None, None, tmp_path)
