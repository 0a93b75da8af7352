"""Matching runs to an observed pair: which job, frame and view looks most like the target.

The target is an image of an interacting pair with the pixel positions of its two
centres (galaxy 1 first). For every frame of a job's `snapshots.h5` and every viewing
direction, the galaxies' centres are found in the particles (a shrinking sphere on each
galaxy's stars), and the similarity transform of the sky plane (scale, rotation, offset)
that puts them on the target's two centres places the projected stars on the target's
own pixel grid. There they are binned by mass, blurred (`blur_px`, comparable to the
target's resolution) and log-stretched, as the course's plots are, and compared:

- SSIM: `skimage.metrics.structural_similarity` with Gaussian weights and data range 1,
  computed by `ssim_of` to within float32 rounding of skimage's value (tests check it),
  in about half the time: the target's side of the formula is filtered once, not per
  render, and the render's three filtered images go through one separable filter call,
- IoU, the overlap of the two images' masks above MASK_LEVEL (galaxyJSPAM's measure),
- NMI, normalised mutual information ((H(A) + H(B)) / H(A, B), 1 to 2).

Higher is better for all three. A mirror image (the sky may show the encounter flipped)
is tried for every view: it is the conjugate of the sky-plane coordinates. Rotation in
the sky plane needs no trying, the transform absorbs it; so only directions matter, and
a hemisphere of them suffices (the opposite direction sees the mirror image).

Targets are any image PIL reads, or FITS (read here: see "FITS targets"). When the
target's scale is known (`Settings.kpc_per_px`), frames whose centres would need
another are not rendered at all. A job of many frames is searched coarse to fine
(`Settings.coarse_frames`, see "coarse to fine over frames"): a few frames spread over
the run first, then the neighbours of the best renders, at halving spacings.

Scores are cached in SQLite (`DIR/.gibatch/match/scores.db`) per (target, job results,
frame, view, mirror): the job's results are named by the sha256 of its snapshots in its
completion record, the target by its bytes, centres and settings, so a rerun scores
only what is new, and a job run again with other results is scored again.
"""

from __future__ import annotations

import cmath
import csv
import gzip
import hashlib
import io
import json
import math
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError
from scipy import ndimage

from gibatch import record, steps
from gibatch.children import process_pool
from gibatch.database import Database
from gibatch.jobs import Job, read_regular
from gibatch.match_settings import (
    DEFAULT_BLUR_PX,
    RANKING_FILE,
    SETTINGS_FILE,
    MatchError,
    Metric,
    Settings,
    match_dir,
)
from gibatch.params import PlotParams
from gibatch.text import printable

F64 = NDArray[np.float64]
F32 = NDArray[np.float32]

SNAPSHOT_SECTION = "Galaxy Interaction"
SNAPSHOT_FILE = "snapshots.h5"
# Targets are compared on a grid of at most this many pixels a side: tails and bridges
# span tens of pixels there, and SSIM's cost grows with the pixel count.
GRID_PX_MAX = 160
BLUR_PX_MAX = 32.0  # a blur of half the grid (FWHM 75 px) leaves nothing to compare
DYNAMIC_RANGE_DEX = 2.5  # log stretch: this many decades below the brightest pixel
MASK_LEVEL = 0.25  # of the 0..1 brightness: what counts as "galaxy" for IoU
SSIM_SIGMA_PX = 1.5  # Wang et al.'s Gaussian window
SSIM_TRUNCATE = 3.5  # skimage's, for Gaussian weights: an 11-pixel window at sigma 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al.'s constants (skimage's defaults)
BLUR_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default
NMI_BINS = 32
MIN_SEPARATION_KPC = 0.5  # projected centres closer than this give no transform
_CORE_MIN = 8  # stars the shrinking sphere keeps at least
SCORE_VERSION = 2  # part of the target key: bump when scoring changes
_AXIS = {"x": 0, "y": 1, "z": 2}


# -- the target


@dataclass(frozen=True)
class Target:
    """The target on its comparison grid: brightness 0..1, centres in grid pixels (x, y)."""

    image: F64 | F32
    centres: tuple[tuple[float, float], tuple[float, float]]
    key: str  # bytes, centres and settings: the cache's name for this target
    path: Path
    blur_px: float = DEFAULT_BLUR_PX
    given: tuple[tuple[float, float], tuple[float, float]] | None = None  # as the user gave
    # Comparison-grid pixels to the pixels of the image as given (and its convention):
    # x = ax * x_grid + bx, y = ay * y_grid + by.
    grid_to_given: tuple[float, float, float, float] = (1.0, 0.0, 1.0, 0.0)

    # Computed once per target (and per scoring process), not per render.
    @cached_property
    def mask(self) -> NDArray[np.bool_]:
        return np.asarray(self.image > MASK_LEVEL)

    @cached_property
    def levels(self) -> NDArray[np.int64]:
        return levels(self.image)

    @cached_property
    def ssim_side(self) -> SsimSide:
        return SsimSide.of(self.image)

    @property
    def given_px_per_grid_px(self) -> float:
        ax, _, ay, _ = self.grid_to_given
        return math.sqrt(abs(ax * ay))

    def on_grid(self, kpc_per_px: tuple[float, float]) -> tuple[float, float]:
        """A scale range per pixel of the image as given, per pixel of the comparison grid
        (a shrunk target's pixels span more)."""
        per = self.given_px_per_grid_px
        return kpc_per_px[0] * per, kpc_per_px[1] * per

    def as_given(self, score: Score) -> Score:
        """A score's scale and offsets in pixels of the image as given (the cache keeps
        them in comparison-grid pixels)."""
        if score.kpc_per_px is None or score.offset_x_px is None or score.offset_y_px is None:
            return score
        ax, bx, ay, by = self.grid_to_given
        return replace(score, kpc_per_px=score.kpc_per_px / self.given_px_per_grid_px,
                       offset_x_px=ax * score.offset_x_px + bx,
                       offset_y_px=ay * score.offset_y_px + by)


def _grey(image: Image.Image) -> F64:
    """Brightness of any PIL mode as floats (colour by luminance, alpha dropped)."""
    if image.mode in ("I", "I;16", "I;16B", "F"):
        return np.asarray(image.convert("F"), dtype=np.float64)
    return np.asarray(image.convert("L"), dtype=np.float64)


def normalise(grey: F64) -> F64:
    """0..1: the sky (the median pixel) to 0, the brightest 0.1 % to 1.

    An observed image comes with its own stretch and sky level; this keeps its shape
    and puts its range where the renders' is.
    """
    low = float(np.median(grey))
    high = float(np.percentile(grey, 99.9))
    if high <= low:
        high = float(grey.max())
    if high <= low:
        raise MatchError("the target is blank (every pixel the same)")
    return np.clip((grey - low) / (high - low), 0.0, 1.0)


def load_target(path: Path, centres: tuple[tuple[float, float], tuple[float, float]],
                blur_px: float = DEFAULT_BLUR_PX) -> Target:
    """Read, check and grid the target image; raise MatchError saying what is wrong.

    PNG, JPEG and whatever else PIL reads take centres in pixels from the top-left corner
    (x right, y down); a FITS file (`.fits`, `.fits.gz`: the first 2-D image HDU) takes
    them as FITS pixels, as ds9 shows them: 1-based, y up.
    """
    try:  # bounded, regular files only: /dev/zero would fill the memory, a FIFO hang
        data = read_regular(path, TARGET_BYTES_MAX + 1)
    except OSError as exc:
        raise MatchError(f"--target {path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > TARGET_BYTES_MAX:
        raise MatchError(f"--target {path}: larger than {TARGET_BYTES_MAX >> 20} MiB; "
                         "crop or bin the image")
    fits = is_fits(data)
    image = _fits_image(data, path) if fits else _finite(_pil_image(data, path), path)
    width, height = image.size
    # Where the centres lie in the image as stored top row first, pixel x spanning x..x+1.
    on_image = (tuple((x - 0.5, height + 0.5 - y) for x, y in centres) if fits
                else centres)
    for which, (x, y), (ix, iy) in zip(("galaxy 1", "galaxy 2"), centres, on_image,
                                       strict=True):
        if not (0 <= ix < width and 0 <= iy < height):
            raise MatchError(f"--centres: {which}'s centre ({x:g}, {y:g}) lies outside the "
                             f"target, which is {width}x{height} pixels"
                             + (" (FITS pixels: 1-based, y up)" if fits else ""))
    (x1, y1), (x2, y2) = centres
    if math.hypot(x2 - x1, y2 - y1) < 1.0:
        raise MatchError("--centres: the two centres are the same point; give galaxy 1's "
                         "centre, then galaxy 2's")
    # Bounded: the Gaussian's kernel is 8 sigma wide, filtered over every row and column
    # of the target and of every render (--blur 1e5, a slip for 1.5, ran for hours).
    if not 0 <= blur_px <= BLUR_PX_MAX:  # NaN too
        raise MatchError(f"--blur {blur_px:g}: must be a number of pixels from 0 to "
                         f"{BLUR_PX_MAX:g} (the comparison grid is at most {GRID_PX_MAX} "
                         "pixels a side)")
    shrink = min(1.0, GRID_PX_MAX / max(width, height))
    if shrink < 1.0:
        size = (max(1, round(width * shrink)), max(1, round(height * shrink)))
        image = image.convert("F") if image.mode.startswith("I") else image
        image = image.resize(size, Image.Resampling.BOX)
    sx, sy = image.size[0] / width, image.size[1] / height
    # Pixel (x, y) spans x..x+1, so its centre maps to (x + 0.5) * s - 0.5.
    on_grid = tuple(((x + 0.5) * sx - 0.5, (y + 0.5) * sy - 0.5) for x, y in on_image)
    back = ((1 / sx, 0.5 / sx, -1 / sy, height + 1 - 0.5 / sy) if fits  # 1-based, y up
            else (1 / sx, 0.5 / sx - 0.5, 1 / sy, 0.5 / sy - 0.5))
    key = hashlib.sha256(json.dumps([hashlib.sha256(data).hexdigest(), centres, blur_px,
                                     SCORE_VERSION, GRID_PX_MAX]).encode()).hexdigest()[:24]
    # The target gets the renders' blur too: both at one resolution, and its pixel noise
    # (which SSIM's structure term would otherwise compare) smoothed away.
    grey = ndimage.gaussian_filter(_grey(image), blur_px) if blur_px > 0 else _grey(image)
    return Target(normalise(grey), on_grid, key, path.resolve(),  # type: ignore[arg-type]
                  blur_px, centres, back)


def _pil_image(data: bytes, path: Path) -> Image.Image:
    """The image, decoded once (no copy). One of more pixels than Pillow deems safe is
    refused from its header: a 0.7 MB PNG of 13000x13000 pixels took 1.4 GB and 10 s
    (Pillow only warns below twice its limit)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
            opened.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MatchError(f"--target {path}: more pixels than a target needs (at most "
                         f"{Image.MAX_IMAGE_PIXELS}); crop or bin the image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise MatchError(f"--target {path}: not an image PIL can read (PNG, JPEG, ...) "
                         f"nor FITS: {exc}") from None
    if opened.mode in _BRIGHTNESS_MODES or opened.mode.startswith("I;16"):
        return opened
    try:  # a mode Pillow cannot turn into brightness (LAB) was a ValueError traceback
        return opened.convert("L")
    except ValueError:
        raise MatchError(f"--target {path}: an image in mode {opened.mode}, which has no "
                         "brightness gibatch can read; save it as greyscale or RGB") from None


# Modes `_grey` reads as they are; any other is converted to L when read, or refused.
_BRIGHTNESS_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "I",
                     "F")


def _finite(image: Image.Image, path: Path) -> Image.Image:
    """A float image (a 32-bit TIFF) with its undefined pixels (NaN, inf: blanked stars,
    a mosaic's edge) set to the median, as FITS targets have: one NaN made the median,
    hence the whole normalised target, NaN, and every job's score with it."""
    if image.mode != "F":
        return image
    values = np.asarray(image, dtype=np.float32).copy()
    finite = np.isfinite(values)
    if finite.all():
        return image
    if not finite.any():
        raise MatchError(f"--target {path}: no pixel of the image has a value (all NaN "
                         "or infinite)")
    values[~finite] = np.median(values[finite])
    return Image.fromarray(values, mode="F")


# -- FITS targets: the first 2-D image of an uncompressed (or gzipped) file
#
# The format (FITS 4.0, sections 3-5) is 2880-byte blocks: a header of 80-character
# "KEY     = value / comment" cards ending in END, then big-endian data. astropy reads
# it, but is a large dependency for the one array a target needs.

FITS_BLOCK = 2880
FITS_CARD = 80
_FITS_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"
FITS_PIXELS_MAX = 100_000_000  # PIL refuses images of this order as decompression bombs
FITS_BYTES_MAX = 1 << 30  # what a .fits.gz may inflate to
TARGET_BYTES_MAX = 1 << 30  # the target file as read (an image of FITS_PIXELS_MAX)


def is_fits(data: bytes) -> bool:
    """Whether the bytes (or their gzip stream) begin as every FITS file must."""
    try:
        return _inflated(data, 9)[:9] == b"SIMPLE  ="
    except (OSError, EOFError, zlib.error):
        return False


def _inflated(data: bytes, limit: int) -> bytes:
    """The data, or at most `limit` bytes of their gzip stream."""
    if data[:2] != _GZIP_MAGIC:
        return data
    return gzip.GzipFile(fileobj=io.BytesIO(data)).read(limit)


def _fits_header(data: bytes, start: int) -> tuple[dict[str, str], int]:
    """The cards of the header at `start` (first of each key) and where its data start."""
    cards: dict[str, str] = {}
    pos = start
    while True:
        block = data[pos:pos + FITS_BLOCK]
        if len(block) < FITS_BLOCK:
            raise MatchError("a header ends before its END card (truncated file?)")
        pos += FITS_BLOCK
        for i in range(0, FITS_BLOCK, FITS_CARD):
            card = block[i:i + FITS_CARD].decode("ascii", errors="replace")
            key = card[:8].strip()
            if key == "END":
                return cards, pos
            if card[8:10] == "= ":
                value = card[10:].strip()
                if value.startswith("'"):  # a string: up to its closing quote
                    value = value[1:].split("'", 1)[0].strip()
                else:
                    value = value.split("/", 1)[0].strip()
                cards.setdefault(key, value)


def read_fits(data: bytes) -> F32:
    """The first HDU holding a 2-D image (axes beyond two must be 1), as floats with
    BSCALE, BZERO and BLANK applied, top row first (FITS stores the bottom row first)."""
    data = _inflated(data, FITS_BYTES_MAX + 1)
    if len(data) > FITS_BYTES_MAX:
        raise MatchError(f"more than {FITS_BYTES_MAX} bytes once inflated")
    pos, hdu = 0, 0
    while pos < len(data):
        header, pos = _fits_header(data, pos)
        try:
            bitpix = int(header["BITPIX"])
            axes = [int(header[f"NAXIS{k}"]) for k in range(1, int(header["NAXIS"]) + 1)]
            extra = int(header.get("PCOUNT", "0"))
            groups = int(header.get("GCOUNT", "1"))
        except (KeyError, ValueError) as exc:
            raise MatchError(f"HDU {hdu}: a bad or missing mandatory keyword: {exc}") from None
        if bitpix not in _FITS_DTYPES:
            raise MatchError(f"HDU {hdu}: BITPIX {bitpix} is not a FITS data type")
        if min(*axes, extra, groups, 0) < 0:  # a negative size walked back: for ever
            raise MatchError(f"HDU {hdu}: a negative NAXISn, PCOUNT or GCOUNT")
        count = math.prod(axes) if axes else 0
        size = abs(bitpix) // 8 * groups * (extra + count)
        if header.get("ZIMAGE") == "T":
            raise MatchError(f"HDU {hdu} is a tile-compressed image: uncompress it first "
                             "(funpack)")
        image = hdu == 0 or header.get("XTENSION") == "IMAGE"
        if image and len(axes) >= 2 and axes[0] > 1 and axes[1] > 1:
            if any(n != 1 for n in axes[2:]):
                raise MatchError(f"HDU {hdu} is a {'x'.join(map(str, axes))} cube: give one "
                                 "2-D image")
            if count > FITS_PIXELS_MAX:
                raise MatchError(f"HDU {hdu}: {count} pixels is more than a target needs")
            if len(data) < pos + abs(bitpix) // 8 * count:
                raise MatchError(f"HDU {hdu}: the data end early (truncated file?)")
            raw = np.frombuffer(data, _FITS_DTYPES[bitpix], count, pos)
            return _fits_pixels(raw.reshape(axes[1], axes[0])[::-1], header, hdu)
        pos += -(-size // FITS_BLOCK) * FITS_BLOCK
        hdu += 1
    raise MatchError("no HDU holds a 2-D image")


def _fits_pixels(raw: NDArray[Any], header: dict[str, str], hdu: int) -> F32:
    """The stored values (rows turned top first) as float32 with BLANK, BSCALE and BZERO
    applied in place: one copy of the pixels, where three in float64 made a 98 KB
    .fits.gz of 10,000 x 10,000 pixels take 2.5 GB."""
    values = raw.astype(np.float32)
    if raw.dtype.kind in "iu" and "BLANK" in header:
        values[raw == _fits_number(header, "BLANK", hdu)] = np.nan
    scale, zero = _fits_number(header, "BSCALE", hdu, 1.0), _fits_number(header, "BZERO", hdu)
    with np.errstate(over="ignore", invalid="ignore"):  # past float32: inf, then replaced
        if scale != 1.0:
            values *= np.float32(scale)
        if zero != 0.0:
            values += np.float32(zero)
    return values


def _fits_number(header: dict[str, str], key: str, hdu: int, default: float = 0.0) -> float:
    """A card's number, with a Fortran exponent (`1.0D0`: the standard's for doubles) as
    well; MatchError naming the card if it holds no number (it was a ValueError)."""
    text = header.get(key)
    if text is None:
        return default
    try:
        value = float(text.replace("D", "E").replace("d", "e"))
    except ValueError:
        raise MatchError(f"HDU {hdu}: {key} = {printable(text)!r} is not a number") from None
    if not math.isfinite(value):
        raise MatchError(f"HDU {hdu}: {key} = {printable(text)!r} is not a finite number")
    return value


def _fits_image(data: bytes, path: Path) -> Image.Image:
    """A FITS target as a float PIL image; undefined pixels (NaN, BLANK) as the median."""
    try:
        values = read_fits(data)
    except MatchError as exc:
        raise MatchError(f"--target {path}: not a FITS image gibatch can read: {exc}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise MatchError(f"--target {path}: a broken gzip stream: {exc}") from None
    finite = np.isfinite(values)
    if not finite.all():
        if not finite.any():
            raise MatchError(f"--target {path}: no pixel of the FITS image has a value")
        values[~finite] = np.median(values[finite])
    del finite
    return Image.fromarray(values, mode="F")


# -- views


@dataclass(frozen=True)
class View:
    """A viewing direction: the sky plane's right (u) and up (v) axes in the sim's frame."""

    name: str
    u: tuple[float, float, float]
    v: tuple[float, float, float]


def axes_view(x_axis: str, y_axis: str) -> View:
    """The view of a plot with these axes (x right, y up)."""
    u = [0.0, 0.0, 0.0]
    v = [0.0, 0.0, 0.0]
    u[_AXIS[x_axis]] = 1.0
    v[_AXIS[y_axis]] = 1.0
    return View(f"{x_axis}-{y_axis}", (u[0], u[1], u[2]), (v[0], v[1], v[2]))


def plot_views(job: Job) -> list[View]:
    """The job's plots' own axes, each pair once, in plot order."""
    seen: dict[str, View] = {}
    for step, params in job.params.items():
        if step.stage is steps.Stage.PLOT and isinstance(params, PlotParams):
            view = axes_view(params.x_axis, params.y_axis)
            seen.setdefault(view.name, view)
    return list(seen.values())


def sphere_views(count: int) -> list[View]:
    """`count` directions spread evenly (a Fibonacci lattice) over the upper hemisphere.

    The lower half is not needed: looking from -n shows the mirror image of the view
    from n, and mirrors are always tried.
    """
    views = []
    golden = math.pi * (3.0 - math.sqrt(5.0))
    for k in range(count):
        z = 1.0 - (k + 0.5) / count  # cos(polar angle), evenly in area over z in (0, 1]
        r = math.sqrt(max(0.0, 1.0 - z * z))
        phi = (k * golden) % (2 * math.pi)
        n = np.array([r * math.cos(phi), r * math.sin(phi), z])
        ref = np.array([0.0, 0.0, 1.0]) if abs(z) < 0.99 else np.array([0.0, 1.0, 0.0])
        u = np.cross(ref, n)
        u /= np.linalg.norm(u)
        v = np.cross(n, u)
        name = f"n{k + 1}(θ={math.degrees(math.acos(z)):.0f},φ={math.degrees(phi):.0f})"
        views.append(View(name, (float(u[0]), float(u[1]), float(u[2])),
                          (float(v[0]), float(v[1]), float(v[2]))))
    return views


def views_for(job: Job, count: int) -> list[View]:
    """`count` directions over the sphere, or the job's plot axes when count is 0."""
    return sphere_views(count) if count > 0 else plot_views(job)


# -- the particles


@dataclass(frozen=True)
class Snapshots:
    """The stars (disk and bulge) of every frame, with their galaxy and weight."""

    time_gyr: F64
    position: F64  # frames x stars x 3, kpc
    galaxy: NDArray[np.int8]
    weight: F64
    centres: F64 | None = None  # frames x 2 x 3, when the simulator saved them


def snapshot_path(job: Job) -> Path:
    return job.output / SNAPSHOT_SECTION / SNAPSHOT_FILE


def snapshot_digest(job: Job) -> str | None:
    """The sha256 its completion record gives the job's snapshots; None if not complete."""
    data = record.complete_record(job)
    if data is None:
        return None
    for f in data.get("sections", {}).get(SNAPSHOT_SECTION, []):
        if f.get("name") == SNAPSHOT_FILE:
            return str(f["sha256"])
    return None


_SNAPSHOT_DATASETS = ("time", "position", "component", "mass", "galaxy")


def load_snapshots(path: Path) -> Snapshots:
    """Stars only: the halo is dark, and its particles are most of the file.

    Raises ValueError naming the dataset when the file is not laid out as the
    simulator writes it (frames x particles x 3 positions, one component, mass and
    galaxy per particle, one time per frame), OSError when it cannot be read."""
    with h5py.File(path, "r") as f:
        for name in _SNAPSHOT_DATASETS:
            if not isinstance(f.get(name), h5py.Dataset):
                raise ValueError(f"{path.name}: no dataset {name!r}")
        frames, particles = f["time"].shape[:1] or (0,), f["component"].shape[:1] or (0,)
        shapes = {"time": frames, "position": (*frames, *particles, 3),
                  "component": particles, "mass": particles, "galaxy": particles}
        for name, shape in shapes.items():
            if f[name].shape != shape:
                raise ValueError(f"{path.name}: dataset {name!r} has shape {f[name].shape}, "
                                 f"not {shape} (frames, particles)")
        component = np.asarray(f["component"][()])
        stars = component != 2
        position = np.asarray(f["position"][()], dtype=np.float64)[:, stars, :]
        mass = np.asarray(f["mass"][()], dtype=np.float64)[stars]
        galaxy = np.asarray(f["galaxy"][()], dtype=np.int8)[stars]
        time_gyr = np.asarray(f["time"][()], dtype=np.float64)
        centres = (np.asarray(f["centres"][()], dtype=np.float64)
                   if isinstance(f.get("centres"), h5py.Dataset)
                   and f["centres"].shape == (len(time_gyr), 2, 3) else None)
    # Massless test stars (restricted physics) are drawn equally bright.
    weight = mass if mass.sum() > 0 else np.ones_like(mass)
    return Snapshots(time_gyr, position, galaxy, weight, centres)


def centre(points: F64) -> F64:
    """A galaxy's centre: a shrinking sphere from its median (robust to tidal tails)."""
    c = np.median(points, axis=0)
    radius = float(np.percentile(np.linalg.norm(points - c, axis=1), 90))
    keep = max(_CORE_MIN, len(points) // 10)
    for _ in range(20):
        inside = points[np.linalg.norm(points - c, axis=1) < radius]
        if len(inside) < keep:
            break
        c = inside.mean(axis=0)
        radius *= 0.8
    return np.asarray(c)


# -- rendering on the target's grid


@dataclass(frozen=True)
class Transform:
    """Sky plane (kpc) to target pixels: w = a z + b, in complex numbers x - i y."""

    a: complex
    b: complex
    mirror: bool

    @property
    def kpc_per_px(self) -> float:
        return 1.0 / abs(self.a)

    @property
    def rotation_deg(self) -> float:
        return math.degrees(math.atan2(self.a.imag, self.a.real))


def _pixels_complex(xy: tuple[float, float]) -> complex:
    return complex(xy[0], -xy[1])  # y down in images: flip it so rotations keep their sense


def sky(points: F64, view: View, mirror: bool) -> NDArray[np.complex128]:
    """Projected positions as complex numbers u + i v (conjugated for the mirror)."""
    z = points @ np.asarray(view.u) + 1j * (points @ np.asarray(view.v))
    return np.asarray(np.conj(z) if mirror else z)


def transform(c1: complex, c2: complex, target: Target, mirror: bool) -> Transform | None:
    """The similarity putting sky points c1, c2 on the target's centres (None if they
    coincide in projection: no scale would do)."""
    # Not `< MIN_SEPARATION_KPC`: stars gone to NaN or inf (an integration that blew
    # up) would give a transform of NaN, and a blank render a real-looking score.
    if not (cmath.isfinite(c1) and cmath.isfinite(c2) and abs(c2 - c1) >= MIN_SEPARATION_KPC):
        return None
    t1, t2 = (_pixels_complex(c) for c in target.centres)
    a = (t2 - t1) / (c2 - c1)
    return Transform(a, t1 - a * c1, mirror)


def gaussian_kernel(sigma: float, truncate: float) -> F64:
    """scipy.ndimage's Gaussian weights: radius int(truncate * sigma + 0.5), sum 1.

    Symmetric, so correlating with it is convolving with it.
    """
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * x.astype(np.float64) ** 2)
    return np.asarray(phi / phi.sum())


def smooth(image: F32, kernel: F64, mode: str) -> F32:
    """A separable filter over the last two axes: a stack of images in one call a side."""
    rows = ndimage.correlate1d(image, kernel, axis=-2, mode=mode)
    return np.asarray(ndimage.correlate1d(rows, kernel, axis=-1, mode=mode))


def stretch(density: F32) -> F32:
    """0..1: log density over DYNAMIC_RANGE_DEX decades below the brightest pixel."""
    peak = float(density.max())
    if peak <= 0:
        return np.zeros_like(density)
    floor = np.float32(peak * 10.0**-DYNAMIC_RANGE_DEX)
    logs = np.log10(np.maximum(density, floor * np.float32(1e-3)) / floor)
    return np.asarray(np.clip(logs / np.float32(DYNAMIC_RANGE_DEX), 0.0, 1.0))


def render(z: NDArray[np.complex128], weight: F64, where: Transform, shape: tuple[int, int],
           blur_px: float) -> F32:
    """Bin sky points by weight onto a grid of `shape`, blur, stretch: 0..1 (float32)."""
    w = where.a * z + where.b
    col = np.rint(w.real).astype(np.int64)
    row = np.rint(-w.imag).astype(np.int64)
    height, width = shape
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    density = np.bincount(row[inside] * width + col[inside], weights=weight[inside],
                          minlength=height * width).astype(np.float32).reshape(shape)
    if blur_px > 0:
        density = smooth(density, _kernel(blur_px, BLUR_TRUNCATE), "constant")
    return stretch(density)


def _kernel(sigma: float, truncate: float) -> F64:
    key = (sigma, truncate)
    if key not in _KERNELS:
        _KERNELS[key] = gaussian_kernel(sigma, truncate)
    return _KERNELS[key]


_KERNELS: dict[tuple[float, float], F64] = {}


@dataclass(frozen=True)
class SsimSide:
    """The target's terms of SSIM, filtered once: 2 mu_x, mu_x^2 + C1, var_x + C2 (cropped
    as skimage crops: the window's half-width off every edge)."""

    image: F32
    two_mean: F32
    mean_sq_c1: F32
    var_c2: F32
    crop: tuple[slice, slice]

    @classmethod
    def of(cls, image: F64 | F32) -> SsimSide:
        pad = (len(_kernel(SSIM_SIGMA_PX, SSIM_TRUNCATE)) - 1) // 2
        crop = (slice(pad, -pad or None), slice(pad, -pad or None))
        x = image.astype(np.float32)
        mean, sq = smooth(np.stack([x, x * x]), _kernel(SSIM_SIGMA_PX, SSIM_TRUNCATE),
                          "reflect")[(slice(None), *crop)]
        c1, c2 = np.float32(SSIM_K1**2), np.float32(SSIM_K2**2)
        return cls(x, 2 * mean, mean * mean + c1, sq - mean * mean + c2, crop)


def ssim_of(target: Target, image: F32) -> float:
    """skimage's `structural_similarity(target.image, image, data_range=1,
    gaussian_weights=True, sigma=SSIM_SIGMA_PX, use_sample_covariance=False)`, in float32.

    Only the render's mean, second moment and product with the target are filtered here,
    as one stack; skimage filters five images per call and checks its input each time.
    """
    side = target.ssim_side
    y = image.astype(np.float32, copy=False)
    mean, sq, cross = smooth(np.stack([y, y * y, side.image * y]),
                             _kernel(SSIM_SIGMA_PX, SSIM_TRUNCATE),
                             "reflect")[(slice(None), *side.crop)]
    c1, c2 = np.float32(SSIM_K1**2), np.float32(SSIM_K2**2)
    mean_x = side.two_mean * np.float32(0.5)
    numerator = (side.two_mean * mean + c1) * (2 * (cross - mean_x * mean) + c2)
    denominator = (side.mean_sq_c1 + mean * mean) * (side.var_c2 + sq - mean * mean)
    return float((numerator / denominator).mean(dtype=np.float64))


def skimage_ssim(target: Target, image: F32) -> float:
    """SSIM by skimage itself (float64): the reference `ssim_of` is checked against."""
    from skimage.metrics import structural_similarity  # 1 s to import: only when asked

    return float(structural_similarity(  # type: ignore[no-untyped-call]
        target.image.astype(np.float64), image.astype(np.float64), data_range=1.0,
        gaussian_weights=True, sigma=SSIM_SIGMA_PX, use_sample_covariance=False))


SsimFunction = Callable[["Target", F32], float]


@dataclass(frozen=True)
class Score:
    """One (frame, view, mirror) of a job against the target; None scores: no transform."""

    frame: int
    time_gyr: float
    view: str
    mirror: bool
    ssim: float | None
    iou: float | None
    nmi: float | None
    kpc_per_px: float | None = None
    rotation_deg: float | None = None
    offset_x_px: float | None = None
    offset_y_px: float | None = None

    def value(self, metric: Metric) -> float | None:
        value: float | None = getattr(self, metric.value)
        return value


def compare(target: Target, image: F32, ssim: SsimFunction = ssim_of
            ) -> tuple[float, float, float]:
    """(SSIM, IoU, NMI) of a render against the target (see the module docstring)."""
    mine, theirs = image > MASK_LEVEL, target.mask
    union = int(np.count_nonzero(mine | theirs))
    iou = int(np.count_nonzero(mine & theirs)) / union if union else 0.0
    return ssim(target, image), iou, nmi_of(target.levels, image)


def levels(image: F64 | F32) -> NDArray[np.int64]:
    """Brightness 0..1 as NMI_BINS bin indices."""
    return np.minimum((image * NMI_BINS).astype(np.int64), NMI_BINS - 1)


def _entropy(counts: NDArray[np.int64]) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi_of(target_levels: NDArray[np.int64], image: F32) -> float:
    """(H(A) + H(B)) / H(A, B) over NMI_BINS bins of 0..1 (Studholme et al. 1999).

    skimage's `normalized_mutual_information` computes the same from a histogramdd over
    each image's own range, ten times slower; both images here already span 0..1.
    """
    joint = np.bincount(target_levels.ravel() * NMI_BINS + levels(image).ravel(),
                        minlength=NMI_BINS * NMI_BINS)
    both = _entropy(joint)
    square = joint.reshape(NMI_BINS, NMI_BINS)
    return (_entropy(square.sum(axis=1)) + _entropy(square.sum(axis=0))) / both if both else 2.0


def _galaxy_centres(snaps: Snapshots, frame: int) -> tuple[F64, F64]:
    """The simulator's own centres if it saved them (restricted physics knows them
    exactly), else found in the stars."""
    if snaps.centres is not None:
        return snaps.centres[frame, 0], snaps.centres[frame, 1]
    pos = snaps.position[frame]
    return centre(pos[snaps.galaxy == 0]), centre(pos[snaps.galaxy == 1])


def render_one(snaps: Snapshots, frame: int, view: View, mirror: bool, target: Target
               ) -> tuple[F32, Transform] | None:
    """The render of one frame, view and mirror on the target's grid, and its transform."""
    g1, g2 = _galaxy_centres(snaps, frame)
    where = _transform_at(view, mirror, target, g1, g2)
    return None if where is None else (_render_at(snaps, frame, view, target, where), where)


def _transform_at(view: View, mirror: bool, target: Target, g1: F64, g2: F64
                  ) -> Transform | None:
    c1, c2 = sky(np.stack([g1, g2]), view, mirror)
    return transform(complex(c1), complex(c2), target, mirror)


def _render_at(snaps: Snapshots, frame: int, view: View, target: Target, where: Transform
               ) -> F32:
    z = sky(snaps.position[frame], view, where.mirror)
    shape = (target.image.shape[0], target.image.shape[1])
    return render(z, snaps.weight, where, shape, target.blur_px)


Key = tuple[int, str, bool]  # (frame, view name, mirror): one render and its scores


def all_keys(frames: int, views: Sequence[View]) -> list[Key]:
    """Every frame x view x mirror, frame first."""
    return [(frame, view.name, mirror) for frame in range(frames) for view in views
            for mirror in (False, True)]


def score_keys(snaps: Snapshots, views: Sequence[View], target: Target, keys: Iterable[Key],
               ssim: SsimFunction = ssim_of, kpc_per_px: tuple[float, float] | None = None
               ) -> list[Score]:
    """The scores of these (frame, view, mirror): the one place renders are scored.

    With a `kpc_per_px` range (the target's scale, when its distance is known), a frame
    whose two centres would need another scale to land on the target's is not rendered:
    its Score has the transform and no metric, like a frame whose centres coincide.
    """
    by_name = {view.name: view for view in views}
    centres: dict[int, tuple[F64, F64]] = {}
    out: list[Score] = []
    for frame, name, mirror in keys:
        if frame not in centres:
            centres[frame] = _galaxy_centres(snaps, frame)
        g1, g2 = centres[frame]
        t = float(snaps.time_gyr[frame])
        view = by_name[name]
        where = _transform_at(view, mirror, target, g1, g2)
        if where is None:
            out.append(Score(frame, t, name, mirror, None, None, None))
            continue
        placed = (where.kpc_per_px, where.rotation_deg, where.b.real, -where.b.imag)
        if kpc_per_px and not kpc_per_px[0] <= where.kpc_per_px <= kpc_per_px[1]:
            out.append(Score(frame, t, name, mirror, None, None, None, *placed))
            continue
        similarity, iou, nmi = compare(target, _render_at(snaps, frame, view, target, where),
                                       ssim)
        out.append(Score(frame, t, name, mirror, similarity, iou, nmi, *placed))
    return out


def score_snapshots(snaps: Snapshots, views: Sequence[View], target: Target,
                    skip: frozenset[Key] = frozenset(), ssim: SsimFunction = ssim_of,
                    kpc_per_px: tuple[float, float] | None = None) -> list[Score]:
    """Every frame x view x mirror not in `skip` (`ssim`: another SSIM to time or check)."""
    return score_keys(snaps, views, target,
                      [k for k in all_keys(len(snaps.time_gyr), views) if k not in skip],
                      ssim, kpc_per_px)


# -- coarse to fine over frames
#
# A frame's score changes smoothly with time between neighbouring frames (the stars move
# a fraction of a tail's length per frame): so a coarse subset of frames finds where the
# best renders are, and halving the spacing around the best of them finds their peaks,
# as a bisection would. The best of them, not the best few: a match is a peak a few
# frames wide above a plateau (two undisturbed disks score nearly as well early on), and
# a coarse frame on the peak's flank may score below the plateau's. Measured on three
# sweeps of 20 jobs of 40 frames (targets at 0.3, 0.5 and 0.7 Gyr, 300 and 1,000 disk
# stars), with 10 coarse frames: refining the best two fifths found every job's best
# render, about 245 of 480 renders with 6 views and 85 of 160 with 2; the best fifth
# missed it in 2 jobs with 2 views, the best 3 or 6 in 1-4 jobs of each sweep. See
# tests/benchmarks/match.py for the time and the rankings against every frame.

REFINE_FRACTION = 0.4  # of the first pass's renders: those refined at each spacing


class _Uncached(Exception):
    """The coarse-to-fine search needs a score the cache does not hold."""


def coarse_step(frames: int, coarse: int) -> int:
    """The first pass's spacing: about `coarse` frames (0, or no more frames: all)."""
    return 1 if coarse <= 0 else max(1, -(-frames // coarse))


def coarse_frames(frames: int, coarse: int) -> list[int]:
    """The first pass: every `coarse_step`-th frame, and the last."""
    return sorted({*range(0, frames, coarse_step(frames, coarse)), frames - 1}) if frames else []


def frame_search(frames: int, views: Sequence[View], metric: Metric, coarse: int,
                 score: Callable[[list[Key]], Iterable[Score]]) -> dict[Key, Score]:
    """The scores a coarse-to-fine search over frames asks `score` for, by key.

    First every view and mirror of `coarse_frames`; then, with the spacing halved each
    time down to 1, the frames that far either side of the best renders so far (same
    view and mirror; as many as REFINE_FRACTION of the first pass). Deterministic given
    the scores, so the cache alone tells whether a job is done: the search replayed on
    its cached scores asks for nothing new.
    """
    known: dict[Key, Score] = {}
    order = {view.name: i for i, view in enumerate(views)}

    def need(keys: Iterable[Key]) -> None:
        todo = list(dict.fromkeys(k for k in keys if k not in known))
        if todo:
            for s in score(todo):
                known[(s.frame, s.view, s.mirror)] = s

    first = [(f, view.name, mirror) for f in coarse_frames(frames, coarse) for view in views
             for mirror in (False, True)]
    need(first)
    best = max(1, math.ceil(REFINE_FRACTION * len(first)))
    spacing = coarse_step(frames, coarse)
    while spacing > 1:
        spacing = (spacing + 1) // 2
        ranked = sorted((s for s in known.values() if s.value(metric) is not None),
                        key=lambda s: (-(s.value(metric) or 0.0), s.frame, order[s.view],
                                       s.mirror))
        need((s.frame + d, s.view, s.mirror) for s in ranked[:best]
             for d in (-spacing, spacing) if 0 <= s.frame + d < frames)
    return known


def _cached_first(cached: Iterable[Score], fresh: Callable[[list[Key]], list[Score]]
                  ) -> Callable[[list[Key]], list[Score]]:
    """A scorer for `frame_search` that takes what it can from `cached`, the rest from
    `fresh`."""
    have = {(s.frame, s.view, s.mirror): s for s in cached}

    def score(keys: list[Key]) -> list[Score]:
        return [*(have[k] for k in keys if k in have),
                *fresh([k for k in keys if k not in have])]
    return score


def search_is_cached(frames: int, views: Sequence[View], settings: Settings,
                     cached: Iterable[Score]) -> bool:
    """Whether the job's frame search needs no score beyond `cached`."""
    def refuse(keys: list[Key]) -> list[Score]:
        if keys:
            raise _Uncached
        return []

    try:
        frame_search(frames, views, settings.metric, settings.coarse_frames,
                     _cached_first(cached, refuse))
    except _Uncached:
        return False
    return True


# -- the cache


_SCHEMA = """
CREATE TABLE IF NOT EXISTS scores (
    target TEXT NOT NULL, job TEXT NOT NULL, snapshot TEXT NOT NULL, frame INTEGER NOT NULL,
    view TEXT NOT NULL, mirror INTEGER NOT NULL, time_gyr REAL NOT NULL,
    ssim REAL, iou REAL, nmi REAL, kpc_per_px REAL, rotation_deg REAL,
    offset_x_px REAL, offset_y_px REAL,
    PRIMARY KEY (target, job, snapshot, frame, view, mirror));
"""
_FIELDS = [f.name for f in Score.__dataclass_fields__.values()]


class ScoreCache(Database):
    """Scores by (target, job, snapshots sha256, frame, view, mirror)."""

    def __init__(self, root: Path) -> None:
        folder = match_dir(root)
        folder.mkdir(parents=True, exist_ok=True)
        super().__init__(folder / "scores.db", _SCHEMA)

    @staticmethod
    def _text(job: str) -> str:
        """A job's name as SQLite text: a name of undecodable bytes holds surrogates,
        which SQLite refuses (such a job was never scored). Two names may read alike
        here, but a row is also keyed by the snapshots' sha256: equal keys, equal scores."""
        return job.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")

    def get(self, target: str, job: str, snapshot: str) -> list[Score]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_FIELDS)} FROM scores WHERE target=? AND job=? AND "
                "snapshot=?", (target, self._text(job), snapshot)).fetchall()
        return [Score(**{**dict(zip(_FIELDS, r, strict=True)), "mirror": bool(r[3])})
                for r in rows]

    def put(self, target: str, job: str, snapshot: str, scores: Iterable[Score]) -> None:
        rows = [(target, self._text(job), snapshot, *(getattr(s, f) for f in _FIELDS))
                for s in scores]
        marks = ", ".join("?" * (3 + len(_FIELDS)))
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany(f"INSERT OR REPLACE INTO scores (target, job, snapshot, "
                                 f"{', '.join(_FIELDS)}) VALUES ({marks})", rows)
            self._db.execute("COMMIT")


# -- one job, and a sweep


@dataclass
class Result:
    """A job's best (frame, view, mirror) by the ranking metric; `best` None: unscorable."""

    job: str
    best: Score | None
    scored: int = 0
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    snapshot: str = ""  # the sha256 of the snapshots scored (the report checks it)


def _finite_value(score: Score, metric: Metric) -> float | None:
    value = score.value(metric)
    return value if value is not None and math.isfinite(value) else None


def best_of(scores: Iterable[Score], metric: Metric) -> Score | None:
    """The highest score by `metric`, whatever order the scores come in (ties: the
    earliest frame, then unmirrored, then by view name); NaN is no score."""
    found = [s for s in scores if _finite_value(s, metric) is not None]
    return min(found, key=lambda s: (-(_finite_value(s, metric) or 0.0), s.frame, s.mirror,
                                     s.view), default=None)


def _result(job: str, scores: list[Score], metric: Metric, target: Target, snapshot: str
            ) -> Result:
    best = best_of(scores, metric)
    return Result(job, None if best is None else target.as_given(best), len(scores),
                  snapshot=snapshot)


# What a snapshots file the scorer cannot use raises (one job's problem, not the sweep's).
_SNAPSHOT_ERRORS = (OSError, KeyError, ValueError, IndexError, TypeError)


def _score_job(job_name: str, path: Path, views: list[View], target: Target,
               cached: list[Score], settings: Settings,
               kpc_per_px: tuple[float, float] | None) -> tuple[str, list[Score], str]:
    """The scores the job's frame search needs that `cached` lacks (`kpc_per_px`: the
    scale range on the comparison grid), and why there are none if its snapshots
    cannot be used ("" otherwise)."""
    new: list[Score] = []
    try:
        snaps = load_snapshots(path)

        def fresh(keys: list[Key]) -> list[Score]:
            scores = score_keys(snaps, views, target, keys, kpc_per_px=kpc_per_px)
            new.extend(scores)
            return scores

        frame_search(len(snaps.time_gyr), views, settings.metric, settings.coarse_frames,
                     _cached_first(cached, fresh))
    except _SNAPSHOT_ERRORS as exc:
        return job_name, [], f"unusable snapshots: {exc}"
    return job_name, new, ""


def cache_key(target: Target, settings: Settings) -> str:
    """The target's key, with the scale range when one is set: it decides what is scored."""
    if settings.kpc_per_px is None:
        return target.key
    low, high = settings.kpc_per_px
    return f"{target.key}:{low:g}-{high:g}"


def _unscored(cache: ScoreCache, key: str, job: Job, views: Sequence[View]
              ) -> tuple[str | None, list[Score], int]:
    """(snapshot digest, cached scores of these views, frames) for one job."""
    digest = snapshot_digest(job)
    if digest is None:
        return None, [], 0
    cached = [s for s in cache.get(key, job.name, digest) if s.view in {v.name for v in views}]
    with h5py.File(snapshot_path(job), "r") as f:
        frames = int(f["time"].shape[0])
    return digest, cached, frames


@dataclass(frozen=True)
class _Work:
    """A job with scores still to compute, and what the cache has."""

    job: Job
    digest: str
    views: list[View]
    cached: list[Score]


def match_jobs(root: Path, jobs: Sequence[Job], target: Target, settings: Settings,
               workers: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[Result]:
    """Score every complete job (from the cache where it can), best first.

    Jobs with work left go to a pool of `workers` processes (default: every core);
    `progress(done, total)` is called as jobs finish.
    """
    key = cache_key(target, settings)
    cache = ScoreCache(root)
    try:
        results: dict[str, Result] = {}
        todo: dict[str, _Work] = {}
        for job in jobs:
            views = views_for(job, settings.views)
            try:
                digest, cached, frames = _unscored(cache, key, job, views)
            except _SNAPSHOT_ERRORS as exc:
                results[job.name] = Result(job.name, None, reason=f"unreadable snapshots: {exc}")
                continue
            if digest is None:
                results[job.name] = Result(job.name, None, reason="not complete")
                continue
            if not search_is_cached(frames, views, settings, cached):
                todo[job.name] = _Work(job, digest, views, cached)
            else:
                results[job.name] = _result(job.name, cached, settings.metric, target, digest)
        total = len(jobs)
        finished = total - len(todo)
        if progress:
            progress(finished, total)
        scale = None if settings.kpc_per_px is None else target.on_grid(settings.kpc_per_px)
        for work, scores, reason in _run_pool(list(todo.values()), target, settings, scale,
                                              workers):
            if reason:
                results[work.job.name] = Result(work.job.name, None, reason=reason)
            else:
                cache.put(key, work.job.name, work.digest, scores)
                results[work.job.name] = _result(work.job.name, [*work.cached, *scores],
                                                 settings.metric, target, work.digest)
            finished += 1
            if progress:
                progress(finished, total)
    finally:
        cache.close()
    return rank(list(results.values()), settings.metric)


def _run_pool(todo: Sequence[_Work], target: Target, settings: Settings,
              kpc_per_px: tuple[float, float] | None, workers: int | None
              ) -> Iterable[tuple[_Work, list[Score], str]]:
    """Score the jobs in `todo`: in this process for one job or one worker, else a pool.
    Each comes with its scores and why it has none ("" if it has).

    The pool uses `spawn`: a fork of a process with threads (an event loop's) may
    inherit a held lock.
    """
    count = workers if workers is not None else (os.cpu_count() or 1)
    if count <= 1 or len(todo) <= 1:
        for work in todo:
            _, scores, reason = _score_job(work.job.name, snapshot_path(work.job), work.views,
                                           target, work.cached, settings, kpc_per_px)
            yield work, scores, reason
        return
    by_name = {work.job.name: work for work in todo}
    pool = process_pool(min(count, len(todo)))
    try:
        futures = [pool.submit(_score_job, work.job.name, snapshot_path(work.job), work.views,
                               target, work.cached, settings, kpc_per_px) for work in todo]
        for future in as_completed(futures):
            name, scores, reason = future.result()
            yield by_name[name], scores, reason
    finally:
        # Jobs not started are dropped, not run: on Ctrl-C (the workers ignore SIGINT)
        # the pool's own exit scored every job still queued before the command ended.
        pool.shutdown(wait=True, cancel_futures=True)


def rank(results: list[Result], metric: Metric) -> list[Result]:
    """Scored jobs best first (ties by name: not in the order the pool finished them),
    then the unscorable ones (by name); a NaN score is none."""
    def value(r: Result) -> float | None:
        return None if r.best is None else _finite_value(r.best, metric)

    scored = sorted((r for r in results if value(r) is not None),
                    key=lambda r: (-(value(r) or 0.0), r.job))
    rest = sorted((r for r in results if value(r) is None), key=lambda r: r.job)
    return scored + rest


# -- what a match leaves behind (the report reads it)


CSV_COLUMNS = ["rank", "job", "score", "ssim", "iou", "nmi", "time_gyr", "frame", "view",
               "mirror", "kpc_per_px", "rotation_deg", "offset_x_px", "offset_y_px", "note",
               "snapshot"]
RANKING_DIGEST = "ranking_sha256"  # match.json's name for the ranking it goes with


def write_results(root: Path, results: Sequence[Result], target: Target, settings: Settings
                  ) -> Path:
    """`DIR/.gibatch/match/ranking.csv` and `match.json` (the target and the settings).

    Scale and offsets are in pixels of the target as given (FITS: 1-based, y up); each
    ranked row names the snapshots it scored (their sha256). Both files are written
    whole and renamed into place, the settings naming the ranking's sha256: a kill
    between the two renames leaves a pair the report sees does not belong together
    (it showed the new ranking's renders against the old target).
    """
    folder = match_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RANKING_FILE
    out = io.StringIO(newline="")
    rows = csv.writer(out)
    rows.writerow(CSV_COLUMNS)
    for index, r in enumerate(results, start=1):
        b = r.best
        if b is None:
            rows.writerow(["", r.job, *[""] * 12, r.reason or "no usable frame", ""])
            continue
        rows.writerow([index, r.job, _num(b.value(settings.metric)), _num(b.ssim),
                       _num(b.iou), _num(b.nmi), _num(b.time_gyr), b.frame, b.view,
                       int(b.mirror), _num(b.kpc_per_px), _num(b.rotation_deg),
                       _num(b.offset_x_px), _num(b.offset_y_px), "", r.snapshot])
    ranking = out.getvalue().encode("utf-8", "surrogateescape")
    meta = {"target": str(target.path), "target_key": target.key,
            "centres": target.given or target.centres, "blur_px": target.blur_px,
            **asdict(settings), RANKING_DIGEST: hashlib.sha256(ranking).hexdigest()}
    staged = [(_staged(folder, ranking), path),
              (_staged(folder, (json.dumps(meta, indent=1) + "\n").encode()),
               folder / SETTINGS_FILE)]
    try:
        for tmp, dest in staged:
            os.replace(tmp, dest)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return path


def _staged(folder: Path, data: bytes) -> Path:
    """`data` in a new temporary file of `folder` (flushed to disk), for os.replace."""
    fd, name = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(name)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
