"""Which physics the local site's interactions run (a site-wide choice, `--physics`).

- restricted (default): disk and bulge stars are test particles in the smooth, softened
  fields of two galaxies whose centres attract each other and feel dynamical friction,
  and which swell when an encounter has heated them (`restricted.py`); seconds per job,
  halo particle counts irrelevant.
- live: the self-consistent N-body problem with REBOUND's tree code (`nbody.py`);
  every particle, halo included, has mass; minutes per job.
"""

from __future__ import annotations

from enum import StrEnum


class Physics(StrEnum):
    RESTRICTED = "restricted"
    LIVE = "live"
