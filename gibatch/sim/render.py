"""Density renders of particle snapshots: smoothed histograms turned into PNG and GIF.

Each particle is spread by a symmetric Gaussian kernel (a histogram on the plot's exact
window, then a Gaussian blur of SPLAT_PX pixels), shown on a logarithmic scale spanning
DYNAMIC_RANGE_DEX decades below the brightest pixel. Every frame carries its time and a
scale bar. Schemes: `whiteonblack` and `blackonwhite` (grey, total density) and `colour`
(galaxy 1 warm, galaxy 2 cool, on black: the two stay apart by eye through a merger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw
from scipy import ndimage

from gibatch.params import PlotParams
from gibatch.sim.galaxy import F64

PLOT_SIZE_PX = {"small": 256, "medium": 512, "large": 768}
THUMBNAIL_PX = 160
GIF_FRAME_MS = 80
SPLAT_PX = 1.2
DYNAMIC_RANGE_DEX = 3.0
GALAXY_RGB = (np.array([1.0, 0.72, 0.38]), np.array([0.42, 0.72, 1.0]))
# Indexed colour: COLOUR_STEPS brightness levels a galaxy, palette index level_1 *
# COLOUR_STEPS + level_2, each entry the RGB render's own sum of the two. 16 x 16 fills
# the GIF's 256 entries; its last, both galaxies at full brightness, is white, the ink.
COLOUR_STEPS = 16
_STEP = np.arange(COLOUR_STEPS**2)
COLOUR_PALETTE = (np.clip(np.outer(_STEP // COLOUR_STEPS, GALAXY_RGB[0])
                          + np.outer(_STEP % COLOUR_STEPS, GALAXY_RGB[1]), 0,
                          COLOUR_STEPS - 1) * (255 / (COLOUR_STEPS - 1))
                  ).round().astype(np.uint8).ravel().tobytes()
MOVIE_PX = 256
MOVIE_MIN_HALF_WIDTH_KPC = 60.0
_AXIS = {"x": 0, "y": 1, "z": 2}


def _bin(values: F64, low: float, high: float, px: int) -> NDArray[np.intp]:
    """Pixel of each value on px equal bins over [low, high] (high in the last bin, as
    np.histogram counts it); -1 outside."""
    index = np.floor((values - low) * (px / (high - low)))
    index[values == high] = px - 1
    index[(index < 0) | (index >= px) | np.isnan(index)] = -1
    return index.astype(np.intp)


def _smoothed(pos: F64, weights: F64, plot: PlotParams, px: int,
              group: NDArray[np.intp] | None = None, groups: int = 1) -> F64:
    """Smoothed density maps (groups, px, px), one per value of `group` (all in map 0
    if None): one bincount and one blur for all of them."""
    # np.histogram2d's result by index arithmetic: its bin search was most of a frame.
    i = _bin(pos[:, _AXIS[plot.x_axis]], plot.x_min, plot.x_max, px)
    j = _bin(pos[:, _AXIS[plot.y_axis]], plot.y_min, plot.y_max, px)
    inside = (i >= 0) & (j >= 0)
    cell = i[inside] * px + j[inside]
    if group is not None:
        cell += group[inside] * (px * px)
    hist = np.bincount(cell, weights=weights[inside],
                       minlength=groups * px * px).reshape(groups, px, px)
    blurred = ndimage.gaussian_filter(hist, (0, SPLAT_PX, SPLAT_PX), mode="constant")
    return np.asarray(blurred.transpose(0, 2, 1)[:, ::-1])  # rows top to bottom, y up


def _levels(density: F64, peak: float) -> F64:
    """0..1 brightness: log density over DYNAMIC_RANGE_DEX decades below `peak`."""
    if peak <= 0:
        return np.zeros_like(density)
    floor = peak * 10**-DYNAMIC_RANGE_DEX
    with np.errstate(divide="ignore"):
        logs = np.log10(np.maximum(density, floor * 1e-3) / floor) / DYNAMIC_RANGE_DEX
    return np.asarray(np.clip(logs, 0.0, 1.0))


def nice_length(span: float) -> float:
    """A round length (1, 2 or 5 times a power of ten) near a fifth of `span`."""
    target = span / 5
    power = 10 ** math.floor(math.log10(target))
    return float(max((m * power for m in (1, 2, 5) if m * power <= target), default=power))


def _annotate(image: Image.Image, plot: PlotParams, time_gyr: float | None, label: str) -> None:
    # 255: white in grey and in COLOUR_PALETTE, black in blackonwhite's inverted grey
    ink: int | tuple[int, int, int] = 0 if plot.colour_scheme == "blackonwhite" else 255
    if image.mode == "RGB":
        ink = (255, 255, 255)
    draw = ImageDraw.Draw(image)
    width, height = image.size
    top = " ".join(x for x in (f"t = {time_gyr:.2f} Gyr" if time_gyr is not None else "",
                               label) if x)
    draw.text((6, 4), top, fill=ink)
    span = plot.x_max - plot.x_min
    bar_kpc = nice_length(span)
    bar_px = round(bar_kpc / span * width)
    y = height - 10
    draw.line([(8, y), (8 + bar_px, y)], fill=ink, width=2)
    draw.text((8, y - 13), f"{bar_kpc:g} kpc", fill=ink)
    axes = f"{plot.x_axis}-{plot.y_axis}"
    draw.text((width - 6 * len(axes) - 6, y - 13), axes, fill=ink)


def density_image(pos: F64, mass: F64, plot: PlotParams, label: str = "",
                  galaxy: NDArray[np.int8] | None = None, time_gyr: float | None = None,
                  indexed: bool = False) -> Image.Image:
    """Project `pos` on the plot's axes, exactly its window, smoothed and log-scaled.

    `indexed`: the colour scheme as a palette image (COLOUR_PALETTE) instead of RGB, for
    GIF frames: a GIF holds 256 colours, and quantising each RGB frame was most of the
    time a movie took to save."""
    px = PLOT_SIZE_PX[plot.plot_size]
    if plot.colour_scheme == "colour":
        which = galaxy if galaxy is not None else np.zeros(len(mass), np.int8)
        maps = _smoothed(pos, mass, plot, px, which.astype(np.intp), 2)
        levels = _levels(maps, float(maps.max()))
        if indexed:
            steps = np.rint(levels * (COLOUR_STEPS - 1)).astype(np.uint8)
            image = Image.fromarray(steps[0] * COLOUR_STEPS + steps[1], mode="P")
            image.putpalette(COLOUR_PALETTE)
        else:
            rgb = np.einsum("gyx,gc->yxc", levels, np.stack(GALAXY_RGB))
            image = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8), mode="RGB")
    else:
        total = _smoothed(pos, mass, plot, px)[0]
        grey = (_levels(total, float(total.max())) * 255).astype(np.uint8)
        if plot.colour_scheme == "blackonwhite":
            grey = 255 - grey
        image = Image.fromarray(grey, mode="L")
    _annotate(image, plot, time_gyr, label)
    return image


@dataclass(frozen=True)
class MovieWindow:
    """The x-y window of the interaction's own movie: both galaxies and their orbit."""

    centre: tuple[float, float]
    half_width: float

    @classmethod
    def around(cls, centres: F64, masses: tuple[float, float]) -> MovieWindow:
        com = (masses[0] * centres[0] + masses[1] * centres[1]) / sum(masses)
        separation = float(np.linalg.norm(centres[1, :2] - centres[0, :2]))
        return cls((float(com[0]), float(com[1])),
                   max(MOVIE_MIN_HALF_WIDTH_KPC, 1.3 * separation))

    def plot(self) -> PlotParams:
        (x, y), h = self.centre, self.half_width
        return PlotParams(x_axis="x", y_axis="y", x_min=x - h, x_max=x + h, y_min=y - h,
                          y_max=y + h, colour_scheme="colour", plot_size="small")


def movie_frame(pos: F64, galaxy: NDArray[np.int8], window: MovieWindow, time_gyr: float
                ) -> Image.Image:
    return density_image(pos, np.ones(len(pos)), window.plot(), galaxy=galaxy,
                         time_gyr=time_gyr, indexed=True)


def save_png(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=True)


def save_gif(frames: list[Image.Image], path: Path) -> None:
    frames[0].save(
        path, format="GIF", save_all=True, append_images=frames[1:],
        duration=GIF_FRAME_MS, loop=0,
    )


def preview(pos: F64, mass: F64, extent: float) -> Image.Image:
    """Face-on (x-y) and edge-on (x-z) views side by side, for galaxy and merge results."""
    views = []
    for y_axis in ("y", "z"):
        plot = PlotParams(
            x_axis="x", y_axis=y_axis, x_min=-extent, x_max=extent, y_min=-extent,
            y_max=extent, colour_scheme="whiteonblack", plot_size="small",
        )
        views.append(density_image(pos, mass, plot, f"x-{y_axis}"))
    canvas = Image.new("L", (2 * views[0].width, views[0].height))
    canvas.paste(views[0], (0, 0))
    canvas.paste(views[1], (views[0].width, 0))
    return canvas
