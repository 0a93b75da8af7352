"""Typed parameter models for the five kinds of step, shared by client and local site.

The same models validate a job folder before any request (client) and a task POST
(local site), so the two can never disagree on what a valid parameter set is.
Ranges are generous physical sanity bounds: they exist to catch a typo such as a
particle count of 10**30, not to second-guess a student's science.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

MAX_PARTICLES_PER_COMPONENT = 200_000
MAX_FRAMES = 2_000
MAX_ABS_KPC = 1e5
MAX_ABS_KM_S = 1e5


class StrictModel(BaseModel):
    """Unknown keys are errors (a misspelt key must never be read as a default).

    NaN and infinities are refused whatever parsed them (the local site's POST body
    included): a NaN passes no range check by comparison, and neither is JSON.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class Component(StrEnum):
    DISK = "disk"
    BULGE = "bulge"
    HALO = "halo"


Particles = Annotated[int, Field(ge=1, le=MAX_PARTICLES_PER_COMPONENT)]


class DiskParams(StrictModel):
    number_of_particles: Particles
    mass_factor: Annotated[float, Field(gt=0, le=100)] = 1.0


class BulgeParams(StrictModel):
    number_of_particles: Particles


class HaloParams(StrictModel):
    number_of_particles: Particles
    potential_well_depth: Annotated[float, Field(ge=-100, lt=0)]


def _int_only(value: object) -> object:
    """A Literal matches by equality: without this, `true` and `1.0` pass as 1."""
    if type(value) is not int:
        raise PydanticCustomError("literal_error", "Input should be 1 or 2")
    return value


class GalaxyParams(StrictModel):
    galaxy_number: Annotated[Literal[1, 2], BeforeValidator(_int_only)]
    components_to_use: Annotated[
        list[Annotated[Component, Field(strict=False)]], Field(min_length=1, max_length=3)
    ]
    disk: DiskParams | None = None
    bulge: BulgeParams | None = None
    halo: HaloParams | None = None

    @model_validator(mode="after")
    def _components_present(self) -> GalaxyParams:
        used = self.components_to_use
        if len(set(used)) != len(used):
            raise ValueError("components_to_use lists a component twice")
        for comp in used:
            if getattr(self, comp.value) is None:
                raise ValueError(
                    f"components_to_use lists {comp.value!r} but there is no {comp.value!r} object"
                )
        return self

    def particle_count(self) -> int:
        return sum(getattr(self, c.value).number_of_particles for c in self.components_to_use)


Positive = Annotated[float, Field(gt=0, le=100)]
Kpc = Annotated[float, Field(ge=-MAX_ABS_KPC, le=MAX_ABS_KPC)]
KmS = Annotated[float, Field(ge=-MAX_ABS_KM_S, le=MAX_ABS_KM_S)]


class LengthScale(StrictModel):
    galaxy_1: Positive
    galaxy_2: Positive


class Position(StrictModel):
    x: Kpc
    y: Kpc
    z: Kpc


class Velocity(StrictModel):
    vx: KmS
    vy: KmS
    vz: KmS


class MergeParams(StrictModel):
    length_scale: LengthScale
    position_galaxy_2: Position
    velocity_galaxy_2: Velocity
    theta_galaxy_2: Annotated[float, Field(ge=-360, le=360)]


class InteractParams(StrictModel):
    duration: Annotated[float, Field(gt=0, le=100)]
    nFrames: Annotated[int, Field(ge=1, le=MAX_FRAMES)]  # the site's own key
    softening: Annotated[float, Field(gt=0, le=100)]
    mass_1: Annotated[float, Field(gt=0, le=10_000)]
    mass_2: Annotated[float, Field(gt=0, le=10_000)]


Axis = Literal["x", "y", "z"]


class PlotParams(StrictModel):
    x_axis: Axis
    y_axis: Axis
    x_min: Kpc
    x_max: Kpc
    y_min: Kpc
    y_max: Kpc
    # colour: the local site's own addition (galaxy 1 warm, galaxy 2 cool on black)
    colour_scheme: Literal["whiteonblack", "blackonwhite", "colour"]
    plot_size: Literal["small", "medium", "large"]

    @model_validator(mode="after")
    def _sane_window(self) -> PlotParams:
        if self.x_axis == self.y_axis:
            raise ValueError("x_axis and y_axis must differ")
        if not self.x_min < self.x_max:
            raise ValueError("x_min must be below x_max")
        if not self.y_min < self.y_max:
            raise ValueError("y_min must be below y_max")
        return self


StepParams = GalaxyParams | MergeParams | InteractParams | PlotParams

# Where users commonly go wrong, keyed by (model, unknown key): a hint that names the fix.
_HINTS: dict[tuple[str, str], str] = {
    ("Velocity", "x"): "velocity_galaxy_2 takes vx, vy, vz (not x, y, z)",
    ("Velocity", "y"): "velocity_galaxy_2 takes vx, vy, vz (not x, y, z)",
    ("Velocity", "z"): "velocity_galaxy_2 takes vx, vy, vz (not x, y, z)",
    ("InteractParams", "nframes"): "the key is spelt nFrames",
    ("InteractParams", "n_frames"): "the key is spelt nFrames",
    ("PlotParams", "color_scheme"): "the key is spelt colour_scheme",
}


def describe_errors(exc: ValidationError) -> list[tuple[str, str]]:
    """Turn a pydantic error into (dotted field, readable message) pairs, with hints."""
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            parent = err["loc"][-2] if len(err["loc"]) > 1 else ""
            model = _MODEL_OF_FIELD.get(str(parent), exc.title)
            hint = _HINTS.get((model, str(err["loc"][-1])))
            msg = "unknown key" + (f" ({hint})" if hint else "")
        elif kind == "missing":
            msg = "missing"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if "input" in err and kind not in ("value_error",):
                msg += f" (got {_short(err['input'])})"
        out.append((loc, msg))
    return out


_MODEL_OF_FIELD = {"velocity_galaxy_2": "Velocity", "position_galaxy_2": "Position"}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
