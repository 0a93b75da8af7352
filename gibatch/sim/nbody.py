"""Merge two model galaxies into one initial condition, and integrate their interaction.

The interaction is a softened, self-gravitating N-body problem integrated with
REBOUND's symplectic leapfrog and direct-summation gravity, in kpc, km/s, 1e11 Msun.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import rebound

from gibatch.params import InteractParams, MergeParams
from gibatch.sim.galaxy import F64, Realisation
from gibatch.sim.units import (
    G_KPC_KMS2_PER_1E11MSUN,
    GYR_PER_TIME_UNIT,
    MODEL_LENGTH_KPC,
    velocity_unit_km_s,
)

# dt = ACCEL_ETA * sqrt(softening / max |a|) (Power et al. 2003, MNRAS 338, 14); chosen
# so the examples keep their relative energy error well under 1 % (tests/test_physics.py).
ACCEL_ETA = 0.3
MAX_STEPS = 200_000


@dataclass(frozen=True)
class InitialCondition:
    """Both galaxies placed in kpc; velocities still in model units until masses are known.

    The interaction's masses fix each galaxy's velocity scale, so the merge keeps the
    internal velocities in model units (rotated) and the bulk velocities in km/s.
    """

    pos_kpc: F64
    vel_model: F64
    mass_model: F64
    galaxy: np.ndarray
    component: np.ndarray
    length_kpc: tuple[float, float]
    model_mass: tuple[float, float]
    bulk_velocity_km_s: tuple[F64, F64]


def tilt(vectors: F64, theta_deg: float) -> F64:
    """Rotate about the x axis: a disk in the x-y plane is inclined by theta."""
    t = math.radians(theta_deg)
    rot = np.array([[1, 0, 0], [0, math.cos(t), -math.sin(t)], [0, math.sin(t), math.cos(t)]])
    return np.asarray(vectors @ rot.T)


def merge(g1: Realisation, g2: Realisation, params: MergeParams) -> InitialCondition:
    """Scale both galaxies, tilt galaxy 2 and place it relative to galaxy 1."""
    l1 = params.length_scale.galaxy_1 * MODEL_LENGTH_KPC
    l2 = params.length_scale.galaxy_2 * MODEL_LENGTH_KPC
    p, v = params.position_galaxy_2, params.velocity_galaxy_2
    offset = np.array([p.x, p.y, p.z])
    bulk2 = np.array([v.vx, v.vy, v.vz], dtype=float)
    pos = np.concatenate([g1.pos * l1, tilt(g2.pos, params.theta_galaxy_2) * l2 + offset])
    vel = np.concatenate([g1.vel, tilt(g2.vel, params.theta_galaxy_2)])
    galaxy = np.concatenate([np.zeros(len(g1.mass), np.int8), np.ones(len(g2.mass), np.int8)])
    return InitialCondition(
        pos_kpc=pos,
        vel_model=vel,
        mass_model=np.concatenate([g1.mass, g2.mass]),
        galaxy=galaxy,
        component=np.concatenate([g1.component, g2.component]),
        length_kpc=(l1, l2),
        model_mass=(g1.total_mass, g2.total_mass),
        bulk_velocity_km_s=(np.zeros(3), bulk2),
    )


def physical_state(ic: InitialCondition, masses: tuple[float, float]) -> tuple[F64, F64, F64]:
    """Particle masses (1e11 Msun) and velocities (km/s) once the galaxy masses are set."""
    mass = np.empty_like(ic.mass_model)
    vel = np.empty_like(ic.vel_model)
    for g in (0, 1):
        sel = ic.galaxy == g
        mass[sel] = ic.mass_model[sel] * masses[g] / ic.model_mass[g]
        unit = velocity_unit_km_s(ic.model_mass[g], masses[g], ic.length_kpc[g])
        vel[sel] = ic.vel_model[sel] * unit + ic.bulk_velocity_km_s[g]
    return ic.pos_kpc, vel, mass


def timestep(pos: F64, mass: F64, softening: float) -> float:
    """A fixed leapfrog step from the strongest initial acceleration: eta * sqrt(eps / a)."""
    _, accel = _pairwise(pos, mass, softening)
    a_max = float(np.max(np.linalg.norm(accel, axis=1)))
    return ACCEL_ETA * math.sqrt(softening / max(a_max, 1e-30))


@dataclass(frozen=True)
class Frame:
    index: int
    time_gyr: float
    pos: F64
    vel: F64


@dataclass(frozen=True)
class RunSummary:
    steps: int
    dt_gyr: float
    energy_start: float
    energy_end: float

    @property
    def relative_energy_error(self) -> float:
        return abs(self.energy_end - self.energy_start) / abs(self.energy_start)


def _pairwise(pos: F64, mass: F64, softening: float) -> tuple[float, F64]:
    """Softened potential energy and accelerations by direct summation, in blocks."""
    potential = 0.0
    accel = np.zeros_like(pos)
    eps2 = softening**2
    block = max(1, 4_000_000 // max(len(mass), 1))  # bounds the pairwise block's memory
    for start in range(0, len(mass), block):
        stop = min(start + block, len(mass))
        sep = pos[None, :, :] - pos[start:stop, None, :]
        inv_r = 1.0 / np.sqrt(np.sum(sep**2, axis=2) + eps2)
        rows = np.arange(start, stop)
        inv_r[rows - start, rows] = 0.0
        potential -= 0.5 * float(np.sum(mass[start:stop, None] * mass[None, :] * inv_r))
        accel[start:stop] = np.einsum("ij,ijk->ik", mass[None, :] * inv_r**3, sep)
    return G_KPC_KMS2_PER_1E11MSUN * potential, G_KPC_KMS2_PER_1E11MSUN * accel


def softened_energy(pos: F64, vel: F64, mass: F64, softening: float) -> float:
    """Total energy with the Plummer-softened potential the integration actually uses.

    REBOUND's own `energy()` leaves softening out of the potential, which would report
    a spurious error for any softened system.
    """
    kinetic = 0.5 * float(np.sum(mass * np.sum(vel**2, axis=1)))
    return kinetic + _pairwise(pos, mass, softening)[0]


def frame_times_gyr(duration_gyr: float, n_frames: int) -> list[float]:
    """`n_frames` snapshots evenly spread over [0, duration] (just the end for one)."""
    if n_frames == 1:
        return [duration_gyr]
    return [duration_gyr * k / (n_frames - 1) for k in range(n_frames)]


def simulation(pos: F64, vel: F64, mass: F64, softening: float) -> rebound.Simulation:
    """A REBOUND leapfrog with direct softened gravity, in kpc, km/s and 1e11 Msun."""
    sim = rebound.Simulation()
    sim.G = G_KPC_KMS2_PER_1E11MSUN
    sim.integrator = "leapfrog"
    sim.gravity = "basic"
    sim.softening = softening
    for m in mass:
        sim.add(m=float(m))
    sim.set_serialized_particle_data(
        xyz=np.ascontiguousarray(pos), vxvyvz=np.ascontiguousarray(vel)
    )
    return sim


def interact(
    ic: InitialCondition, params: InteractParams, on_frame: Callable[[Frame], None]
) -> RunSummary:
    """Integrate the interaction, calling `on_frame` for each of the nFrames snapshots."""
    pos, vel, mass = physical_state(ic, (params.mass_1, params.mass_2))
    sim = simulation(pos, vel, mass, params.softening)

    times = frame_times_gyr(params.duration, params.nFrames)
    interval = (times[1] - times[0]) if len(times) > 1 else times[0]
    dt_max = timestep(pos, mass, params.softening)
    interval_units = interval / GYR_PER_TIME_UNIT
    substeps = max(1, math.ceil(interval_units / dt_max))
    steps_total = substeps * (len(times) - 1) + (substeps if len(times) == 1 else 0)
    if steps_total > MAX_STEPS:
        raise ValueError(
            f"this interaction needs {steps_total} steps (limit {MAX_STEPS}): "
            "shorten the duration or raise the softening"
        )
    sim.dt = interval_units / substeps
    energy_start = softened_energy(pos, vel, mass, params.softening)

    buf_pos = np.empty_like(pos)
    buf_vel = np.empty_like(vel)
    done = 0
    for index, t_gyr in enumerate(times):
        if t_gyr > 0:
            sim.steps(substeps)
            done += substeps
        sim.serialize_particle_data(xyz=buf_pos, vxvyvz=buf_vel)
        on_frame(Frame(index, t_gyr, buf_pos.copy(), buf_vel.copy()))
    energy_end = softened_energy(buf_pos, buf_vel, mass, params.softening)
    return RunSummary(done, sim.dt * GYR_PER_TIME_UNIT, energy_start, energy_end)
