"""Equilibrium galaxy models in model units (G = 1, disk scale length 1).

- disk: exponential surface density, sech^2 vertical profile, rotating in the total
  potential (Freeman's exact exponential-disk curve plus the spheroids) with a radial
  dispersion set by Toomre Q, asymmetric drift corrected (Hernquist 1993, ApJS 86, 389);
- bulge and halo: truncated Hernquist spheres, isotropic Gaussian velocities whose
  dispersion solves the spherical Jeans equation in the total enclosed mass, capped
  below the local escape speed.

The halo's depth sets its mass: its (untruncated) central potential is
`potential_well_depth` = -M_halo / HALO_SCALE, so a deeper well is a more massive halo
and more mass in the centre. `mass_factor` multiplies the disk mass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import special

from gibatch.params import Component, GalaxyParams

F64 = NDArray[np.float64]

DISK_SCALE_HEIGHT = 0.1
DISK_R_MAX = 8.0
TOOMRE_Q = 1.5
BULGE_MASS = 0.3
BULGE_SCALE = 0.4
BULGE_R_MAX = 5.0
HALO_SCALE = 4.0
HALO_R_MAX = 40.0
ESCAPE_FRACTION = 0.95

COMPONENT_ID = {Component.DISK: 0, Component.BULGE: 1, Component.HALO: 2}
_GRID = np.geomspace(1e-3, 2 * HALO_R_MAX, 1200)


@dataclass(frozen=True)
class Hernquist:
    """A Hernquist sphere of total (untruncated) mass `mass`, cut at `r_max`."""

    mass: float
    scale: float
    r_max: float

    def enclosed(self, r: F64) -> F64:
        rc = np.minimum(r, self.r_max)
        return np.asarray(self.mass * rc**2 / (rc + self.scale) ** 2)

    def density(self, r: F64) -> F64:
        rho = self.mass * self.scale / (2 * np.pi * r * (r + self.scale) ** 3)
        return np.where(r <= self.r_max, rho, 0.0)

    @property
    def sampled_mass(self) -> float:
        return float(self.enclosed(np.array([self.r_max]))[0])

    def sample_radii(self, n: int, rng: np.random.Generator) -> F64:
        u_max = self.sampled_mass / self.mass
        s = np.sqrt(rng.uniform(0, u_max, n))
        return np.asarray(self.scale * s / (1 - s))


@dataclass(frozen=True)
class MassModel:
    """What a galaxy's smooth potential is made of, in model units (0: component unused).

    Kept with the particles (galaxy.h5, initial.h5) so that the interaction can rebuild
    the exact field the galaxy was sampled in, softened as the interaction asks.
    """

    disk_mass: float
    bulge_mass: float
    halo_mass: float

    def spheroids(self) -> dict[Component, Hernquist]:
        out = {}
        if self.bulge_mass > 0:
            out[Component.BULGE] = Hernquist(self.bulge_mass, BULGE_SCALE, BULGE_R_MAX)
        if self.halo_mass > 0:
            out[Component.HALO] = Hernquist(self.halo_mass, HALO_SCALE, HALO_R_MAX)
        return out

    def spheres(self) -> list[Hernquist]:
        return list(self.spheroids().values())

    def potential(self, softening: float = 0.0) -> Potential:
        return Potential(self.spheres(), self.disk_mass, softening)

    def as_array(self) -> F64:
        return np.array([self.disk_mass, self.bulge_mass, self.halo_mass])

    @classmethod
    def from_array(cls, values: F64) -> MassModel:
        return cls(float(values[0]), float(values[1]), float(values[2]))


@dataclass(frozen=True)
class Realisation:
    """Particles of one galaxy in model units, and the mass model they were drawn from."""

    pos: F64
    vel: F64
    mass: F64
    component: NDArray[np.int8]
    model: MassModel

    @property
    def total_mass(self) -> float:
        return float(self.mass.sum())


def _disk_enclosed(mass: float, r: F64) -> F64:
    rc = np.minimum(r, DISK_R_MAX)
    return np.asarray(mass * (1 - (1 + rc) * np.exp(-rc)))


def _isotropic(n: int, rng: np.random.Generator) -> F64:
    v = rng.normal(size=(n, 3))
    return np.asarray(v / np.linalg.norm(v, axis=1)[:, None])


class Potential:
    """A galaxy's spherically averaged mass model, softened, tabulated on a radial grid.

    The mass is the sum of the components' enclosed masses (the disk counted as a sphere
    of the same enclosed mass). With Plummer softening `softening` the potential is the
    sum over thin shells of the exact softened shell potential
        Phi_shell(r) = -m / (2 r s) [sqrt((r + s)^2 + eps^2) - sqrt((r - s)^2 + eps^2)],
    which is what softened gravity makes of this mass distribution, averaged over angles.
    `softening=0` is the unsoftened model the initial conditions are built in; the
    interaction's restricted physics moves stars in exactly this field, and both
    physics modes re-derive velocities from it (`equilibrate`).
    """

    def __init__(self, spheres: list[Hernquist], disk_mass: float, softening: float = 0.0
                 ) -> None:
        self.spheres = spheres
        self.disk_mass = disk_mass
        self.softening = softening
        self.grid = _GRID
        self.m_enc = _disk_enclosed(disk_mass, _GRID) + sum(
            (s.enclosed(_GRID) for s in spheres), np.zeros_like(_GRID)
        )
        if softening > 0:
            shell_r = np.concatenate([[0.5 * _GRID[0]], 0.5 * (_GRID[1:] + _GRID[:-1])])
            shell_m = np.diff(self.m_enc, prepend=0.0)
            r, s = _GRID[:, None], shell_r[None, :]
            eps2 = softening**2
            bracket = np.sqrt((r + s) ** 2 + eps2) - np.sqrt((r - s) ** 2 + eps2)
            self.phi = -np.sum(shell_m * bracket / (2 * r * s), axis=1)
            self.accel = np.asarray(np.gradient(self.phi, _GRID))
        else:
            self.accel = self.m_enc / _GRID**2
            # Phi(r) = -(integral of accel from r to the grid edge) - M / r_edge
            seg = 0.5 * (self.accel[1:] + self.accel[:-1]) * np.diff(_GRID)
            outer = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
            self.phi = -outer - self.m_enc[-1] / _GRID[-1]
        self.density = np.gradient(self.m_enc, _GRID) / (4 * np.pi * _GRID**2)

    @property
    def total_mass(self) -> float:
        return float(self.m_enc[-1])

    def radial_accel(self, r: F64) -> F64:
        """Inward acceleration at radius r (point mass beyond the grid)."""
        inside = np.interp(r, _GRID, self.accel)
        core = self.accel[0] * r / _GRID[0]  # below the grid: a harmonic core, a -> 0
        return np.asarray(np.where(r > _GRID[-1], self.total_mass / np.maximum(r, 1e-30) ** 2,
                                   np.where(r < _GRID[0], core, inside)))

    def potential(self, r: F64) -> F64:
        inside = np.interp(r, _GRID, self.phi)
        return np.asarray(np.where(r > _GRID[-1], -self.total_mass / np.maximum(r, 1e-30),
                                   inside))

    def circular_speed2(self, r: F64) -> F64:
        return np.asarray(r * self.radial_accel(r))

    def escape_speed(self, r: F64) -> F64:
        return np.asarray(np.sqrt(2 * -self.potential(r)))

    def jeans_dispersion(self, rho: F64, r: F64) -> F64:
        """Isotropic dispersion of a tracer of density `rho` (on the grid) at radius r."""
        integrand = rho * self.accel
        seg = 0.5 * (integrand[1:] + integrand[:-1]) * np.diff(_GRID)
        pressure = np.concatenate([np.cumsum(seg[::-1])[::-1], [0.0]])
        sigma2 = np.divide(pressure, rho, out=np.zeros_like(rho), where=rho > 0)
        return np.asarray(np.sqrt(np.maximum(np.interp(r, _GRID, sigma2), 0.0)))

    def spheroid_vc2(self, r: F64) -> F64:
        total = sum((s.enclosed(r) for s in self.spheres), np.zeros_like(r))
        return np.asarray(total / r)

    def softened(self, softening: float) -> Potential:
        return Potential(self.spheres, self.disk_mass, softening)


def _sample_spheroid(
    sphere: Hernquist, n: int, pot: Potential, rng: np.random.Generator
) -> tuple[F64, F64]:
    r = sphere.sample_radii(n, rng)
    pos = _isotropic(n, rng) * r[:, None]
    sigma = pot.jeans_dispersion(sphere.density(_GRID), r)
    v_cap = ESCAPE_FRACTION * pot.escape_speed(r)
    vel = rng.normal(size=(n, 3)) * sigma[:, None]
    speed = np.linalg.norm(vel, axis=1)
    too_fast = speed > v_cap
    vel[too_fast] *= (v_cap[too_fast] / speed[too_fast])[:, None]
    return pos, vel


def _disk_vc2(mass: float, pot: Potential, r: F64) -> F64:
    """Circular speed squared in the disk plane: Freeman's exponential disk plus spheroids."""
    y = r / 2
    sigma0 = mass / (2 * np.pi)
    bessel = special.i0e(y) * special.k0e(y) - special.i1e(y) * special.k1e(y)
    return np.asarray(4 * np.pi * sigma0 * y**2 * bessel + pot.spheroid_vc2(r))


def disk_rotation(mass: float, pot: Potential, radius: F64) -> tuple[F64, F64, F64]:
    """Mean azimuthal speed and radial/azimuthal dispersions at cylindrical radius."""
    r = _GRID[_GRID < DISK_R_MAX * 1.2]
    sigma0 = mass / (2 * np.pi)
    vc2 = _disk_vc2(mass, pot, r)
    omega2 = vc2 / r**2
    kappa2 = np.maximum(r * np.gradient(omega2, r) + 4 * omega2, 1e-12)
    surface = sigma0 * np.exp(-r)
    sigma_r = np.minimum(TOOMRE_Q * 3.36 * surface / np.sqrt(kappa2), 0.5 * np.sqrt(vc2))
    dlog = np.gradient(np.log(surface * sigma_r**2), np.log(r))
    vphi2 = vc2 + sigma_r**2 * (1 - kappa2 / (4 * omega2) + dlog)
    vphi = np.sqrt(np.maximum(vphi2, 0.0))
    sigma_phi = sigma_r * np.sqrt(kappa2 / (4 * omega2))
    return (
        np.interp(radius, r, vphi),
        np.interp(radius, r, sigma_r),
        np.interp(radius, r, sigma_phi),
    )


def _sample_disk(
    mass: float, n: int, pot: Potential, rng: np.random.Generator
) -> tuple[F64, F64]:
    radius = np.empty(0)
    while radius.size < n:  # gamma(2) is R exp(-R); cut at DISK_R_MAX
        draw = rng.gamma(2.0, 1.0, 2 * n)
        radius = np.concatenate([radius, draw[draw < DISK_R_MAX]])
    radius = radius[:n]
    phi = rng.uniform(0, 2 * np.pi, n)
    z = DISK_SCALE_HEIGHT * np.arctanh(rng.uniform(-0.999, 0.999, n))
    pos = np.column_stack([radius * np.cos(phi), radius * np.sin(phi), z])
    vphi, sig_r, sig_phi = disk_rotation(mass, pot, radius)
    surface = mass / (2 * np.pi) * np.exp(-radius)
    sig_z = np.sqrt(np.pi * surface * DISK_SCALE_HEIGHT)
    v_r = rng.normal(size=n) * sig_r
    v_phi = vphi + rng.normal(size=n) * sig_phi
    v_z = rng.normal(size=n) * sig_z
    vel = np.column_stack([
        v_r * np.cos(phi) - v_phi * np.sin(phi),
        v_r * np.sin(phi) + v_phi * np.cos(phi),
        v_z,
    ])
    return pos, vel


def halo_of(params: GalaxyParams) -> Hernquist | None:
    if Component.HALO not in params.components_to_use or params.halo is None:
        return None
    mass = -params.halo.potential_well_depth * HALO_SCALE
    return Hernquist(mass, HALO_SCALE, HALO_R_MAX)


def build(params: GalaxyParams, seed: int) -> Realisation:
    """Sample the galaxy `params` describes; the same seed gives the same particles."""
    rng = np.random.default_rng(seed)
    used = params.components_to_use
    halo = halo_of(params)
    bulge = Hernquist(BULGE_MASS, BULGE_SCALE, BULGE_R_MAX) if Component.BULGE in used else None
    disk_mass = params.disk.mass_factor if Component.DISK in used and params.disk else 0.0
    model = MassModel(disk_mass, bulge.mass if bulge else 0.0, halo.mass if halo else 0.0)
    pot = model.potential()

    parts: list[tuple[F64, F64, F64, NDArray[np.int8]]] = []
    for comp in used:
        n = getattr(params, comp.value).number_of_particles
        if comp is Component.DISK:
            pos, vel = _sample_disk(disk_mass, n, pot, rng)
            m_total = float(_disk_enclosed(disk_mass, np.array([DISK_R_MAX]))[0])
        else:
            sphere = bulge if comp is Component.BULGE else halo
            assert sphere is not None
            pos, vel = _sample_spheroid(sphere, n, pot, rng)
            m_total = sphere.sampled_mass
        ids = np.full(n, COMPONENT_ID[comp], dtype=np.int8)
        parts.append((pos, vel, np.full(n, m_total / n), ids))

    pos = np.concatenate([p[0] for p in parts])
    vel = np.concatenate([p[1] for p in parts])
    mass = np.concatenate([p[2] for p in parts])
    comp_ids = np.concatenate([p[3] for p in parts])
    # Not recentred on the particles' centre of mass: with a few heavy halo particles
    # that is kiloparsecs off the model's centre, where the smooth field sits.
    return Realisation(pos, vel, mass, comp_ids, model)


def equilibrate(
    pos: F64, vel: F64, component: NDArray[np.int8], model: MassModel, softening: float,
    normal: F64, rng: np.random.Generator, *, live: bool,
) -> F64:
    """Velocities (model units, galaxy frame) in equilibrium with the *softened* field.

    The galaxy was sampled in the unsoftened model; softening weakens the field inside a
    few softening lengths, and velocities that ignore it make the centre fly apart. Each
    spheroid particle's velocity is scaled by the ratio of softened to unsoftened Jeans
    dispersion at its radius (capped below the softened escape speed); each disk star's
    in-plane velocity by sqrt(softened / unsoftened circular speed^2).

    `live` (self-gravitating disk): the disk's in-plane target is the Freeman curve times
    the spherical model's softened/unsoftened force ratio, and vertical velocities stay
    (the disk's own gravity holds it). Restricted (`live=False`): stars move in the
    spherical field, so the target is its softened circular speed and, since there the
    vertical frequency is the orbital one, v_z = Omega(R) * zeta with zeta drawn from the
    disk's own sech^2 height law: the thickness then stays what it was built with.
    `normal` is the disk's spin axis (galaxy 2 is tilted). `pos` is relative to the centre.
    """
    base = model.potential()
    soft = model.potential(softening)
    vel = vel.copy()
    r = np.maximum(np.linalg.norm(pos, axis=1), _GRID[0])
    for comp, sphere in model.spheroids().items():
        sel = component == COMPONENT_ID[comp]
        if not sel.any():
            continue
        rho = sphere.density(_GRID)
        before = base.jeans_dispersion(rho, r[sel])
        after = soft.jeans_dispersion(rho, r[sel])
        ratio = np.divide(after, before, out=np.ones_like(after), where=before > 0)
        v = vel[sel] * ratio[:, None]
        speed = np.linalg.norm(v, axis=1)
        cap = ESCAPE_FRACTION * soft.escape_speed(r[sel])
        fast = speed > cap
        v[fast] *= (cap[fast] / speed[fast])[:, None]
        vel[sel] = v
    disk = component == COMPONENT_ID[Component.DISK]
    if disk.any() and model.disk_mass > 0:
        p, v = pos[disk], vel[disk]
        height = p @ normal
        planar = p - height[:, None] * normal
        radius = np.maximum(np.linalg.norm(planar, axis=1), _GRID[0])
        built = _disk_vc2(model.disk_mass, base, radius)
        ratio_force = soft.radial_accel(radius) / base.radial_accel(radius)
        target = built * ratio_force if live else soft.circular_speed2(radius)
        v_z = v @ normal
        v_plane = (v - v_z[:, None] * normal) * np.sqrt(target / built)[:, None]
        if not live:
            omega = np.sqrt(soft.radial_accel(radius) / radius)
            zeta = DISK_SCALE_HEIGHT * np.arctanh(rng.uniform(-0.999, 0.999, len(radius)))
            v_z = omega * zeta
        vel[disk] = v_plane + v_z[:, None] * normal
    return vel


def half_mass_radius(pos: F64, mass: F64) -> float:
    r = np.linalg.norm(pos - np.average(pos, axis=0, weights=mass), axis=1)
    order = np.argsort(r)
    cum = np.cumsum(mass[order])
    return float(r[order][np.searchsorted(cum, 0.5 * cum[-1])])
