"""What a person clicking in the browser submits: the 'browser task' fault.

A student may start a task by hand on a model number that gibatch is also driving
(site-protocol.md, section 3): before, between or after gibatch's own tasks. The local
site reproduces this on request. A click is a small, quick task of any kind, with
parameters no sweep would use, so its result can never be mistaken for a job's.
"""

from __future__ import annotations

import json
import random

from gibatch.params import GalaxyParams, InteractParams, MergeParams, PlotParams
from gibatch.steps import GALAXY1, GALAXY2, INTERACT, MERGE, Step, plot

CLICKABLE = ("galaxy1", "galaxy2", "merge", "interact", "plot")


def click_task(rng: random.Random, kind: str | None = None) -> tuple[Step, str]:
    """The step and validated JSON payload of one browser task (`kind` or a random one)."""
    kind = kind or rng.choice(CLICKABLE)
    depth = round(rng.uniform(-6.0, -3.0), 3)  # no sweep's value: a lineage of its own
    if kind in ("galaxy1", "galaxy2"):
        number = 1 if kind == "galaxy1" else 2
        galaxy = GalaxyParams.model_validate({
            "galaxy_number": number, "components_to_use": ["disk", "bulge", "halo"],
            "disk": {"number_of_particles": 40}, "bulge": {"number_of_particles": 10},
            "halo": {"number_of_particles": 40, "potential_well_depth": depth}})
        return (GALAXY1 if number == 1 else GALAXY2), _dump(galaxy)
    if kind == "merge":
        merge = MergeParams.model_validate({
            "length_scale": {"galaxy_1": 1, "galaxy_2": 0.5},
            "position_galaxy_2": {"x": 80, "y": 40, "z": 0},
            "velocity_galaxy_2": {"vx": -120, "vy": 10, "vz": 0}, "theta_galaxy_2": -depth})
        return MERGE, _dump(merge)
    if kind == "interact":
        interact = InteractParams.model_validate({
            "duration": 0.05, "nFrames": 2, "softening": 1, "mass_1": 10, "mass_2": -depth})
        return INTERACT, _dump(interact)
    if kind == "plot":
        shown = PlotParams.model_validate({
            "x_axis": "x", "y_axis": "y", "x_min": -200, "x_max": 200, "y_min": -200,
            "y_max": 200 + depth, "colour_scheme": "blackonwhite", "plot_size": "small"})
        return plot(0), _dump(shown)
    raise ValueError(f"not a task a browser can start: {kind!r} (one of {CLICKABLE})")


def _dump(params: GalaxyParams | MergeParams | InteractParams | PlotParams) -> str:
    return json.dumps(params.model_dump(mode="json", exclude_none=True))
