"""Physical units of jobs.md and the galaxy model's own units.

Physical: kpc, km/s, 1e11 Msun, Gyr. The N-body integration runs in kpc, km/s and
1e11 Msun, whose time unit is 1 kpc / (1 km/s) = 0.9778 Gyr.

A galaxy is built in model units (G = 1, disk scale length 1, disk mass = mass_factor)
and given physical size and mass later: the merge scales lengths by
`length_scale * MODEL_LENGTH_KPC`, the interaction scales its total mass to `mass_i`;
velocities then scale by sqrt(G M / L), which keeps the galaxy in equilibrium.
"""

from __future__ import annotations

G_KPC_KMS2_PER_1E11MSUN = 4.30091e5
GYR_PER_TIME_UNIT = 0.977792
MODEL_LENGTH_KPC = 5.0


def velocity_unit_km_s(model_mass: float, mass_1e11: float, length_kpc: float) -> float:
    """km/s per model velocity unit for a galaxy of `model_mass` made `mass_1e11` heavy."""
    return float((G_KPC_KMS2_PER_1E11MSUN * mass_1e11 / (model_mass * length_kpc)) ** 0.5)
