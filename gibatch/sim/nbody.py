"""Merge two model galaxies into one initial condition, and integrate their interaction.

Two physics (`physics.Physics`), one preparation: `prepare` turns the merged galaxies
into physical units, re-derives velocities in equilibrium with the softened field the
chosen physics has (`galaxy.equilibrate`) and boosts everything to the pair's centre
of mass frame, so the pair stays where the plot windows look (galaxy 1 starts at the
origin, galaxy 2 where merge put it). Then:

- restricted (`restricted.py`): disk and bulge stars in the galaxies' smooth fields;
- live: the softened, self-gravitating N-body problem, REBOUND's leapfrog with its
  Barnes-Hut tree (opening angle LIVE_OPENING_ANGLE), softening at most
  LIVE_SOFTENING_FRACTION of the smaller disk scale length, in kpc, km/s, 1e11 Msun.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import rebound

from gibatch.params import Component, InteractParams, MergeParams
from gibatch.sim import restricted
from gibatch.sim.galaxy import COMPONENT_ID, F64, MassModel, Realisation, equilibrate
from gibatch.sim.physics import Physics
from gibatch.sim.units import (
    G_KPC_KMS2_PER_1E11MSUN,
    GYR_PER_TIME_UNIT,
    MODEL_LENGTH_KPC,
    velocity_unit_km_s,
)

# dt = ACCEL_ETA * sqrt(softening / max |a|) (Power et al. 2003, MNRAS 338, 14), max |a|
# the peak of the softened model fields.
ACCEL_ETA = 0.3
MAX_STEPS = 200_000
LIVE_SOFTENING_FRACTION = 0.2
LIVE_OPENING_ANGLE = 0.7
ENERGY_CHECK_MAX_N = 20_000  # the softened energy is a direct O(N^2) sum


@dataclass(frozen=True)
class InitialCondition:
    """Both galaxies placed in kpc; velocities still in model units until masses are known.

    The interaction's masses fix each galaxy's velocity scale, so the merge keeps the
    internal velocities in model units (rotated) and the bulk velocities in km/s.
    `centre_kpc`, `normal` (disk spin axes) and `models` say where each galaxy's smooth
    field sits and what it is made of.
    """

    pos_kpc: F64
    vel_model: F64
    mass_model: F64
    galaxy: np.ndarray
    component: np.ndarray
    length_kpc: tuple[float, float]
    model_mass: tuple[float, float]
    bulk_velocity_km_s: tuple[F64, F64]
    centre_kpc: F64
    normal: F64
    models: tuple[MassModel, MassModel]


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
    offset = np.array([p.x, p.y, p.z], dtype=float)
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
        centre_kpc=np.stack([np.zeros(3), offset]),
        normal=np.stack([np.array([0.0, 0.0, 1.0]),
                         tilt(np.array([0.0, 0.0, 1.0]), params.theta_galaxy_2)]),
        models=(g1.model, g2.model),
    )


def softening_used(ic: InitialCondition, params: InteractParams, physics: Physics) -> float:
    """The job's softening; live mode caps it at a fraction of the smaller disk's scale
    length, since a coarser softening makes a live disk a different, thicker galaxy."""
    if physics is Physics.LIVE:
        return min(params.softening, LIVE_SOFTENING_FRACTION * min(ic.length_kpc))
    return params.softening


def followed(ic: InitialCondition, physics: Physics) -> np.ndarray:
    """Which particles the physics integrates: all (live), or the stars (restricted)."""
    if physics is Physics.LIVE:
        return np.ones(len(ic.mass_model), dtype=bool)
    return np.asarray(ic.component != COMPONENT_ID[Component.HALO])


def particle_masses(ic: InitialCondition, params: InteractParams) -> F64:
    """Each particle's mass (1e11 Msun): its galaxy's model mass scaled to mass_1/mass_2."""
    masses = (params.mass_1, params.mass_2)
    scale = np.where(ic.galaxy == 0, masses[0] / ic.model_mass[0], masses[1] / ic.model_mass[1])
    return np.asarray(ic.mass_model * scale)


@dataclass(frozen=True)
class Prepared:
    """Physical initial state of the followed particles, centre-of-mass frame."""

    pos: F64
    vel: F64
    mass: F64
    centre_pos: F64
    centre_vel: F64
    fields: tuple[restricted.Field, restricted.Field]
    softening: float


def prepare(ic: InitialCondition, params: InteractParams, physics: Physics, seed: int
            ) -> Prepared:
    """Masses (1e11 Msun), equilibrium velocities (km/s), the pair's fields, COM frame."""
    softening = softening_used(ic, params, physics)
    masses = (params.mass_1, params.mass_2)
    rng = np.random.default_rng(seed)
    mass = particle_masses(ic, params)
    vel = np.empty_like(ic.vel_model)
    fields = []
    for g in (0, 1):
        sel = ic.galaxy == g
        unit = velocity_unit_km_s(ic.model_mass[g], masses[g], ic.length_kpc[g])
        model_vel = equilibrate(
            (ic.pos_kpc[sel] - ic.centre_kpc[g]) / ic.length_kpc[g], ic.vel_model[sel],
            ic.component[sel], ic.models[g], softening / ic.length_kpc[g], ic.normal[g], rng,
            live=physics is Physics.LIVE,
        )
        if physics is Physics.LIVE:  # sampling noise must not make the galaxy drift
            model_vel -= np.average(model_vel, axis=0, weights=ic.mass_model[sel])
        vel[sel] = model_vel * unit + ic.bulk_velocity_km_s[g]
        fields.append(restricted.Field(masses[g], ic.length_kpc[g],
                                       ic.models[g].potential(softening / ic.length_kpc[g])))
    bulk = np.stack(ic.bulk_velocity_km_s)
    com_vel = (masses[0] * bulk[0] + masses[1] * bulk[1]) / (masses[0] + masses[1])
    keep = followed(ic, physics)
    return Prepared(ic.pos_kpc[keep], vel[keep] - com_vel, mass[keep], ic.centre_kpc.copy(),
                    bulk - com_vel, (fields[0], fields[1]), softening)


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
    softening: float
    energy_start: float | None = None
    energy_end: float | None = None
    centres: F64 | None = None  # (frames, 2, 3) kpc, restricted mode

    @property
    def relative_energy_error(self) -> float | None:
        if self.energy_start is None or self.energy_end is None:
            return None
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


def simulation(pos: F64, vel: F64, mass: F64, softening: float, box_kpc: float
               ) -> rebound.Simulation:
    """A REBOUND leapfrog with tree gravity, in kpc, km/s and 1e11 Msun."""
    sim = rebound.Simulation()
    sim.G = G_KPC_KMS2_PER_1E11MSUN
    sim.integrator = "leapfrog"
    sim.gravity = "tree"
    sim.opening_angle2 = LIVE_OPENING_ANGLE**2
    sim.root_size = box_kpc
    sim.N_root_x = sim.N_root_y = sim.N_root_z = 1
    sim.boundary = "open"
    sim.softening = softening
    for m in mass:
        sim.add(m=float(m))
    sim.set_serialized_particle_data(
        xyz=np.ascontiguousarray(pos), vxvyvz=np.ascontiguousarray(vel)
    )
    return sim


def peak_acceleration(fields: tuple[restricted.Field, ...]) -> float:
    """The strongest pull anywhere in the softened fields, (km/s)^2 / kpc."""
    return max(float(np.max(f.accel(f.model.grid * f.length_kpc))) for f in fields)


def interact(
    ic: InitialCondition, params: InteractParams, on_frame: Callable[[Frame], None],
    physics: Physics = Physics.RESTRICTED, seed: int = 0,
) -> RunSummary:
    """Integrate the interaction, calling `on_frame` for each of the nFrames snapshots
    (the followed particles only: see `followed`)."""
    state = prepare(ic, params, physics, seed)
    times = frame_times_gyr(params.duration, params.nFrames)
    if physics is Physics.LIVE:
        return _interact_live(state, params, times, on_frame)
    return _interact_restricted(state, params, times, on_frame)


def _interact_restricted(state: Prepared, params: InteractParams, times: list[float],
                         on_frame: Callable[[Frame], None]) -> RunSummary:
    run = restricted.State.start(0.0, state.pos, state.vel, state.centre_pos, state.centre_vel)
    expected = restricted.estimated_star_steps(run, state.fields,
                                               params.duration / GYR_PER_TIME_UNIT)
    if expected > restricted.MAX_STAR_STEPS:
        raise ValueError(
            f"this interaction needs about {expected:.2g} star-steps (limit "
            f"{restricted.MAX_STAR_STEPS:.0g}): fewer stars, a shorter duration or a larger "
            "softening")
    centres = np.empty((len(times), 2, 3))

    def emit(index: int, now: restricted.State) -> None:
        centres[index] = now.centre_pos
        on_frame(Frame(index, times[index], now.positions(), now.velocities()))

    steps = restricted.run(run, state.fields, [t / GYR_PER_TIME_UNIT for t in times], emit)
    base = min(restricted.BASE_STEP_MAX, params.duration / GYR_PER_TIME_UNIT)
    return RunSummary(steps, base * GYR_PER_TIME_UNIT, state.softening, centres=centres)


def _interact_live(state: Prepared, params: InteractParams, times: list[float],
                   on_frame: Callable[[Frame], None]) -> RunSummary:
    pos, vel, mass = state.pos, state.vel, state.mass
    extent = float(np.max(np.abs(pos))) + 1.5 * float(np.max(np.abs(vel))) * (
        params.duration / GYR_PER_TIME_UNIT)
    sim = simulation(pos, vel, mass, state.softening, 2.2 * extent)
    interval = (times[1] - times[0]) if len(times) > 1 else times[0]
    dt_max = ACCEL_ETA * math.sqrt(state.softening / peak_acceleration(state.fields))
    interval_units = interval / GYR_PER_TIME_UNIT
    substeps = max(1, math.ceil(interval_units / dt_max))
    steps_total = substeps * (len(times) - 1) + (substeps if len(times) == 1 else 0)
    if steps_total > MAX_STEPS:
        raise ValueError(
            f"this interaction needs {steps_total} steps (limit {MAX_STEPS}): "
            "shorten the duration or raise the softening"
        )
    sim.dt = interval_units / substeps
    check = len(mass) <= ENERGY_CHECK_MAX_N
    energy_start = softened_energy(pos, vel, mass, state.softening) if check else None

    buf_pos = np.empty_like(pos)
    buf_vel = np.empty_like(vel)
    done = 0
    for index, t_gyr in enumerate(times):
        if t_gyr > 0:
            sim.steps(substeps)
            done += substeps
        if len(mass) != sim.N:
            raise ValueError("a particle left the tree's box: shorten the duration")
        sim.serialize_particle_data(xyz=buf_pos, vxvyvz=buf_vel)
        on_frame(Frame(index, t_gyr, buf_pos.copy(), buf_vel.copy()))
    energy_end = softened_energy(buf_pos, buf_vel, mass, state.softening) if check else None
    return RunSummary(done, sim.dt * GYR_PER_TIME_UNIT, state.softening, energy_start,
                      energy_end)
