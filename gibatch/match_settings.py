"""What a student tells `match` and `search`: the metric, the centres, the blur.

Kept apart from `gibatch.match` so that the command line can declare its options
without importing the scorer's numerical stack (scipy, h5py, skimage: most of a
second), which every other command would otherwise pay at start.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gibatch.jobs import STATE_DIR

DEFAULT_BLUR_PX = 1.5
# Where `match` and `search` leave their ranking: `report` looks for it here before it
# loads the scorer (which costs a second and 30 MB to a report with no ranking).
MATCH_DIR = "match"
RANKING_FILE = "ranking.csv"
SETTINGS_FILE = "match.json"
# Frames scored first, evenly spread; the best renders are then refined by halving the
# spacing around them (gibatch.match.frame_search). A job with no more frames than this
# has every frame scored.
DEFAULT_COARSE_FRAMES = 10


class MatchError(Exception):
    """Input the matcher cannot use; the message says what and why."""


class Metric(StrEnum):
    SSIM = "ssim"
    IOU = "iou"
    NMI = "nmi"


@dataclass(frozen=True)
class Settings:
    """How jobs are matched: views (0: the plots' axes; N: N directions), ranking, the
    target's scale when its distance is known (kpc per target pixel, low and high):
    frames that would need another scale are not rendered; and the frames scored before
    refining around the best (0: every frame, no refining)."""

    views: int = 0
    metric: Metric = Metric.SSIM
    kpc_per_px: tuple[float, float] | None = None
    coarse_frames: int = DEFAULT_COARSE_FRAMES


def parse_centres(text: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """`X1,Y1,X2,Y2` in pixels (x right, y down, as image viewers show them)."""
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise MatchError(f"--centres {text!r}: expected four numbers X1,Y1,X2,Y2 (pixels of "
                         "galaxy 1's and galaxy 2's centres)") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise MatchError(f"--centres {text!r}: the numbers must be finite")
    return (x1, y1), (x2, y2)


def parse_scale(text: str) -> tuple[float, float]:
    """`LOW,HIGH` kpc per pixel of the target image as given (before any shrinking)."""
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise MatchError(f"--kpc-per-px {text!r}: expected two numbers LOW,HIGH (the "
                         "range of kiloparsecs one target pixel may span)") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 < low <= high):
        raise MatchError(f"--kpc-per-px {text!r}: need 0 < LOW <= HIGH, both finite")
    return low, high


def match_dir(root: Path) -> Path:
    return root / STATE_DIR / MATCH_DIR
