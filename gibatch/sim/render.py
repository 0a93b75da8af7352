"""Density renders of particle snapshots: numpy histograms turned into PNG and GIF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from gibatch.params import PlotParams
from gibatch.sim.galaxy import F64

PLOT_SIZE_PX = {"small": 256, "medium": 512, "large": 768}
THUMBNAIL_PX = 160
GIF_FRAME_MS = 80
_AXIS = {"x": 0, "y": 1, "z": 2}


def density_image(pos: F64, mass: F64, plot: PlotParams, label: str = "") -> Image.Image:
    """Project `pos` on the plot's axes and window: log mass density, one pixel a bin."""
    px = PLOT_SIZE_PX[plot.plot_size]
    hist, _, _ = np.histogram2d(
        pos[:, _AXIS[plot.x_axis]],
        pos[:, _AXIS[plot.y_axis]],
        bins=px,
        range=[[plot.x_min, plot.x_max], [plot.y_min, plot.y_max]],
        weights=mass,
    )
    # Spread each particle over a few pixels so sparse particles stay visible.
    hist = hist + np.roll(hist, 1, 0) + np.roll(hist, -1, 0) + np.roll(hist, 1, 1)
    lit = hist > 0
    level = np.zeros_like(hist)
    if lit.any():
        logs = np.log10(hist[lit])
        lo, hi = np.percentile(logs, 5), logs.max()
        level[lit] = 0.25 + 0.75 * np.clip((logs - lo) / max(hi - lo, 1e-9), 0, 1)
    grey = (level.T[::-1] * 255).astype(np.uint8)  # y up, like a plot
    if plot.colour_scheme == "blackonwhite":
        grey = 255 - grey
    image = Image.fromarray(grey, mode="L")
    if label:
        ink = 255 if plot.colour_scheme == "whiteonblack" else 0
        draw = ImageDraw.Draw(image)
        draw.text((6, 4), label, fill=ink)
        draw.text((6, px - 14), f"{plot.x_axis}-{plot.y_axis} [kpc]", fill=ink)
    return image


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
