"""`gibatch report`: one static HTML page for a sweep, and a contact sheet of final frames.

The page works from `file://` with no server and no network: the jobs are one compact
JSON array in the page, laid out 500 rows at a time by a few lines of inline JavaScript
(sorting and filtering work on all of them), so 100,000 jobs make a page of a few MB
that opens at once. Thumbnails are small PNGs made here and lazy-loaded, and each opens
the plot's animation straight from the job's `output/`. Only complete jobs (completion
record present and whole) show images: a half-downloaded file is never shown as a
result. The contact sheet shows the first `SHEET_MAX_TILES` complete jobs.
"""

from __future__ import annotations

import csv
import hashlib
import html
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

from gibatch import discovery
from gibatch.jobs import OUTPUT_DIR, STATE_DIR, Job, Sweep, open_regular
from gibatch.status import JobState, JobStatus, SweepStatus
from gibatch.steps import Stage, Step
from gibatch.text import printable

THUMB_PX = 160
SHEET_TILE_PX = 200
SHEET_MAX_TILES = 400  # 20 x 20 tiles: 4,000 px square, about 50 MB while it is made
REPORT_FILE = "report.html"
SHEET_FILE = "contact-sheet.png"
_ANIMATION_SUFFIXES = (".gif", ".mp4", ".webm")
_STILL_NAMES = ("final.png",)

Value = int | float | str
# What a corrupt, truncated, hostile or oversized image can make Pillow raise.
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
                 Image.DecompressionBombWarning)
log = logging.getLogger("gibatch")


@dataclass(frozen=True)
class Shot:
    """One plot of one job: its still (last frame) and its animation, if any."""

    section: str
    still: Path | None
    animation: Path | None


@dataclass
class Row:
    name: str
    state: JobState
    reason: str | None
    values: dict[str, Value]
    shots: list[Shot] = field(default_factory=list)
    # (section, file in the job's folder, thumbnail file) of each shot shown. The shots'
    # paths are let go once thumbnailed, but for the contact sheet's: 100,000 jobs.
    pictures: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Report:
    page: Path
    sheet: Path | None
    rows: int
    thumbnails: int


def _walk(prefix: str, node: object, out: dict[str, Value]) -> None:
    """`node`'s parameters into `out` as `prefix.dotted.key` -> scalar (lists joined;
    null and other values left out, as absent)."""
    if isinstance(node, dict):
        for k, v in node.items():
            _walk(f"{prefix}.{k}", v, out)
    elif isinstance(node, list):
        out[prefix] = "+".join(map(str, node))
    elif isinstance(node, int | float | str):
        out[prefix] = node


def flatten(job: Job) -> dict[str, Value]:
    """Every parameter of a job as `file.dotted.key` -> scalar (lists joined)."""
    out: dict[str, Value] = {}
    # The validated payloads, not the typed parameters: 100,000 jobs need no pydantic.
    for step, body in job.payloads.items():
        _walk(step.name, body, out)
    return out


_ABSENT = object()


def _same(a: object, b: object) -> bool:
    """The same JSON: 1, 1.0 and true differ, and so do 0.0 and -0.0."""
    return type(a) is type(b) and a == b and (type(a) is not float or repr(a) == repr(b))


class Variation:
    """The parameters that are not the same in every job (absent counts as a value),
    and each job's values of those.

    Each job is compared with the first, descending only into what differs (a job's
    galaxies are most often everyone's): 100,000 jobs never hold 100,000 dictionaries
    of every parameter. A parameter that differs from the first job's in some job
    varies; one that never does is the same in all. So a job's value of a varying
    parameter is its own where it differs from the first job, else the first job's.
    """

    def __init__(self) -> None:
        self._first: Job | None = None
        self._first_payloads: dict[Step, dict[str, Any]] = {}
        self._first_flat: dict[str, Value] = {}
        self._varying: set[str] = set()
        self._rows: list[tuple[Row, dict[str, object]]] = []

    def add(self, row: Row, job: Job) -> None:
        """Take `row`'s job; the row's values are filled in by `finish`."""
        differs: dict[str, object] = {}
        first = self._first
        if first is None:
            self._first, self._first_payloads = job, job.payloads_once()
            for step, body in self._first_payloads.items():
                _walk(step.name, body, self._first_flat)
        elif job.lineage != first.lineage:
            payloads = job.payloads_once()
            # An equal lineage is a hash of the same JSON: nothing to compare.
            self._diff("", {s.name: b for s, b in self._first_payloads.items()
                            if first.lineage[s] != job.lineage.get(s)},
                       {s.name: b for s, b in payloads.items()
                        if job.lineage[s] != first.lineage.get(s)}, differs)
            self._varying.update(differs)
        self._rows.append((row, differs))

    def _diff(self, prefix: str, first: dict[str, Any], mine: dict[str, Any],
              out: dict[str, object]) -> None:
        for key in {**first, **mine}:
            a, b = first.get(key, _ABSENT), mine.get(key, _ABSENT)
            where = f"{prefix}.{key}" if prefix else key
            if type(a) is dict and type(b) is dict:
                if not (a == b and repr(a) == repr(b)):  # C speed; repr: 1 vs 1.0
                    self._diff(where, a, b, out)
            elif type(a) is list or not _same(a, b):  # lists: as their joined text
                self._leaves(where, a, b, out)

    @staticmethod
    def _leaves(prefix: str, first: object, mine: object, out: dict[str, object]) -> None:
        """The parameters of `mine` under `prefix` that differ from those of `first`."""
        theirs: dict[str, Value] = {}
        ours: dict[str, Value] = {}
        if first is not _ABSENT:
            _walk(prefix, first, theirs)
        if mine is not _ABSENT:
            _walk(prefix, mine, ours)
        for key in {**theirs, **ours}:
            if not _same(theirs.get(key, _ABSENT), value := ours.get(key, _ABSENT)):
                out[key] = value

    def finish(self) -> list[str]:
        """The varying parameters, sorted; each row added gets its values of those."""
        keys = sorted(self._varying)
        for row, differs in self._rows:
            values: dict[str, Value] = {}
            for key in keys:
                value = differs.get(key, self._first_flat.get(key, _ABSENT))
                if value is not _ABSENT:
                    values[key] = cast(Value, value)
            row.values = values
        self._rows = []
        return keys


def find_shot(section_dir: Path) -> Shot:
    try:  # names, not Paths: 100,000 jobs
        names = sorted(os.listdir(section_dir))
    except OSError:  # none, or not a folder
        names = []

    def first(found: Iterable[str]) -> Path | None:
        name = next(iter(found), None)
        return None if name is None else section_dir / name

    animation = first(n for n in names if n.lower().endswith(_ANIMATION_SUFFIXES))
    still = first(n for n in names if n in _STILL_NAMES)
    if still is None and animation is not None and animation.suffix.lower() == ".gif":
        still = animation  # its last frame is taken below
    if still is None:
        still = first(n for n in names if n.lower().endswith(".png"))
    return Shot(section_dir.name, still, animation)


def placeholder(size: int = THUMB_PX) -> Image.Image:
    """A grey square saying the image could not be read."""
    image = Image.new("RGB", (size, size), "#d0d0d0")
    ImageDraw.Draw(image).text((8, size // 2 - 6), "unreadable image", fill="black")
    return image


def last_frame(path: Path) -> Image.Image:
    """`path`'s last frame in RGB, or a placeholder if it cannot be read: one corrupt
    file costs its own picture, not the whole report. A bomb is refused, not decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as f, Image.open(f) as image:
                frames = getattr(image, "n_frames", 1)
                if frames > 1:
                    image.seek(frames - 1)
                return image.convert("RGB")
    except _IMAGE_ERRORS as exc:
        why = ("not an image format Pillow reads" if isinstance(exc, UnidentifiedImageError)
               else exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc))
        log.warning("%s: cannot read the image (%s); shown as a placeholder",
                    printable(str(path)), printable(why))
        return placeholder()


def thumbnail_name(job: str, section: str) -> str:
    """One file name per job and plot, whatever the job's position: a thumbnail kept
    because it is newer than its image must be of that image, also after jobs were
    added to the sweep (named by position, another job's would be kept)."""
    digest = hashlib.blake2b(os.fsencode(job), digest_size=8).hexdigest()
    return f"{digest}-{section.replace(' ', '')}.png"


def make_thumbnail(still: Path, dest: Path, size: int = THUMB_PX) -> None:
    """A small PNG of `still`'s last frame; kept if newer than its source."""
    try:
        if dest.stat().st_mtime >= still.stat().st_mtime:
            return
    except OSError:  # none yet, or a dangling link (last_frame makes the placeholder)
        pass
    image = last_frame(still)
    image.thumbnail((size, size))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.png")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, dest)


def contact_sheet(rows: list[Row], dest: Path, tile: int = SHEET_TILE_PX,
                  most: int = SHEET_MAX_TILES) -> int:
    """The first plot of the first `most` complete jobs, side by side with their names;
    returns how many (0: no sheet written)."""
    shots = [(r.name, r.shots[0].still) for r in rows if r.shots and r.shots[0].still][:most]
    if not shots:
        return 0
    cols = min(len(shots), max(4, math.ceil(math.sqrt(len(shots)))))
    label = 14
    sheet = Image.new("RGB", (cols * tile, math.ceil(len(shots) / cols) * (tile + label)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, still) in enumerate(shots):
        assert still is not None
        image = last_frame(still)
        image.thumbnail((tile - 4, tile - 4))
        x, y = (i % cols) * tile, (i // cols) * (tile + label)
        sheet.paste(image, (x + 2, y + 2))
        draw.text((x + 3, y + tile), name[: tile // 6], fill="black")
    tmp = dest.with_suffix(".tmp.png")
    sheet.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, dest)
    return len(shots)


def collect_rows(sweep: Sweep, status: SweepStatus,
                 take: Callable[[Row], None] = lambda row: None) -> tuple[list[Row], list[str]]:
    """A row per job (invalid ones last), with its values of the parameters that vary
    (returned too, sorted) and, for a complete job, its plots; `take` sees each job's
    row as soon as its plots are found."""
    by_name = {j.name: j for j in status.jobs}
    rows = []
    variation = Variation()
    for job in sweep.jobs:
        st = by_name.get(job.name, JobStatus(job.name, JobState.PENDING))
        row = Row(job.name, st.state, st.reason, {})
        variation.add(row, job)
        if st.state is JobState.COMPLETE:
            output = job.output
            row.shots = [find_shot(output / step.section) for step in job.steps
                         if step.stage is Stage.PLOT]
        take(row)
        rows.append(row)
    keys = variation.finish()
    for st in status.jobs:
        if st.state is JobState.INVALID:
            rows.append(Row(st.name, st.state, st.reason, {}))
    return rows, keys


def _url(path: Path, start: Path) -> str:
    """`path` relative to `start` as a URL: its bytes, so undecodable names work too."""
    return quote(os.fsencode(os.path.relpath(path, start).replace(os.sep, "/")))


def _json_in_html(data: object) -> str:
    """JSON to sit inside <script>: no `<` can close the element or open a comment."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


def page_data(rows: list[Row], keys: list[str], root: Path, page_dir: Path,
              media: Path) -> str:
    """The table as the page's script reads it, as JSON to sit in <script>; compact:
    per row its name, state (an index into `states`), reason, the text of each key's
    value (null if absent) and its shots as [index into `targets`, thumbnail file].
    Links are relative to the page: `jobs` + the job's name (encoded by the script, or
    by the row's sixth item when not UTF-8) + a target's link; `media` + a thumbnail
    file. Each row becomes text at once: 100,000 rows never exist as Python lists."""
    states = [s.value for s in JobState]
    targets: dict[tuple[str, str], int] = {}
    out = []
    for r in rows:
        shots = []
        for section, link, thumb in r.pictures:  # most jobs share a handful of links
            shots.append([targets.setdefault((section, link), len(targets)), quote(thumb)])
        row: list[object] = [r.name, states.index(r.state.value), r.reason,
                             [None if (v := r.values.get(k)) is None else str(v)
                              for k in keys], shots]
        if shots and not discovery.storable(r.name):  # the script cannot encode it
            row.append(quote(os.fsencode(r.name), safe=""))
        out.append(_json_in_html(row))
    head = _json_in_html({
        "jobs": _url(root, page_dir) + "/", "media": _url(media, page_dir) + "/",
        "states": states,
        "targets": [[section, quote(os.fsencode(link))] for section, link in targets]})
    return f'{head[:-1]},"rows":[{",".join(out)}]}}'


def render_page(title: str, rows: list[Row], keys: list[str], data: str,
                sheet: Path | None, page_dir: Path, sheet_tiles: int = 0,
                match_html: str = "") -> str:
    head = "".join(f'<th data-key="{html.escape(k)}" title="sort by {html.escape(k)}">'
                   f"{html.escape(k)}</th>" for k in keys)
    numeric = [k for k in keys if all(isinstance(r.values.get(k, 0), int | float)
                                      for r in rows)]
    filters = "".join(
        f'<label>{html.escape(k)} <input type="number" step="any" data-min="{i}" '
        f'placeholder="min"> <input type="number" step="any" data-max="{i}" '
        f'placeholder="max"></label>'
        for i, k in enumerate(keys) if k in numeric)
    complete = sum(1 for r in rows if r.pictures)
    sheet_link = "" if sheet is None else (
        f'<a href="{_url(sheet, page_dir)}">contact sheet</a>'
        + (f" (the first {sheet_tiles} complete jobs)" if sheet_tiles < complete else ""))
    counts = ", ".join(f"{sum(1 for r in rows if r.state is s)} {s.value}" for s in JobState
                       if any(r.state is s for r in rows))
    parts = {"title": html.escape(title), "counts": html.escape(counts), "sheet": sheet_link,
             "filters": filters, "head": head, "thumb_px": str(THUMB_PX),
             "data": data, "match": match_html}
    template = resources.files("gibatch").joinpath("report.html").read_text()
    # One pass: a job named "{{match}}" stays a name.
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m[1]], template)


def build_report(sweep: Sweep, status: SweepStatus, page: Path | None = None) -> Report:
    """Write the page (default `JOBS/report.html`), its thumbnails and the contact sheet."""
    root = sweep.root
    default = page is None or page == root / REPORT_FILE
    page = root / REPORT_FILE if page is None else page
    # Beside the default page, the media hide in JOBS/.gibatch (a folder there would
    # be taken for a job); beside any other page, in PAGE_files/.
    media = root / STATE_DIR / "report" if default else page.with_name(page.stem + "_files")
    sheet = page.with_name(SHEET_FILE) if default else media / SHEET_FILE
    media.mkdir(parents=True, exist_ok=True)
    sheet_rows = 0

    def take(row: Row) -> None:
        """Thumbnails made; the shots kept only if the contact sheet will show them."""
        nonlocal sheet_rows
        for shot in row.shots:
            if shot.still is not None:
                name = thumbnail_name(row.name, shot.section)
                make_thumbnail(shot.still, media / name)
                target = shot.animation or shot.still
                row.pictures.append(
                    (shot.section, f"{OUTPUT_DIR}/{shot.section}/{target.name}", name))
        if row.shots and row.shots[0].still and sheet_rows < SHEET_MAX_TILES:
            sheet_rows += 1
        else:
            row.shots = []

    rows, keys = collect_rows(sweep, status, take)
    tiles = contact_sheet(rows, sheet, most=SHEET_MAX_TILES)
    data = page_data(rows, keys, root, page.parent, media)
    text = render_page(root.resolve().name, rows, keys, data, sheet if tiles else None,
                       page.parent, tiles, match_section(sweep, rows, keys, media, page.parent))
    tmp = page.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, page)
    return Report(page, sheet if tiles else None, len(rows), sum(len(r.pictures) for r in rows))


# -- the match section (when `gibatch match` or `gibatch search` has ranked the sweep)

MATCH_TOP = 5
PLOT_PX = (260, 170)


def match_section(sweep: Sweep, rows: list[Row], keys: list[str], media: Path,
                  page_dir: Path) -> str:
    """The target beside the best render of the top jobs, and score against each varied
    parameter; empty when no ranking exists. Renders are made again from the snapshots
    (cheap for five jobs), so the ranking file stays small."""
    from gibatch import match, match_settings

    folder = match.match_dir(sweep.root)
    try:
        meta = json.loads((folder / match.SETTINGS_FILE).read_text())
        with (folder / match.RANKING_FILE).open(newline="") as f:
            ranking = [r for r in csv.DictReader(f) if r["rank"]]
        (c1, c2) = (tuple(c) for c in meta["centres"])
        target = match.load_target(Path(meta["target"]), (c1, c2), float(meta["blur_px"]))
    except (OSError, ValueError, KeyError, TypeError, match_settings.MatchError) as exc:
        if (folder / match.RANKING_FILE).exists():
            log.warning("report: match results not shown: %s", exc)
        return ""
    jobs = {j.name: j for j in sweep.jobs}
    tiles = []
    for index, r in enumerate(ranking[:MATCH_TOP]):
        job = jobs.get(r["job"])
        if job is None:
            continue
        views = {v.name: v for v in match.views_for(job, int(meta.get("views", 0)))}
        try:
            snaps = match.load_snapshots(match.snapshot_path(job))
            done = match.render_one(snaps, int(r["frame"]), views[r["view"]],
                                    r["mirror"] == "1", target)
        except (OSError, KeyError, ValueError) as exc:
            log.warning("report: no render for %s: %s", job.name, exc)
            continue
        if done is None:
            continue
        pair = np.hstack([target.image, np.ones((target.image.shape[0], 2)), done[0]])
        dest = media / f"match-{index}.png"
        Image.fromarray((pair * 255).astype(np.uint8)).save(dest)
        tiles.append(f'<figure><img src="{_url(dest, page_dir)}" alt="target and render">'
                     f"<figcaption>{index + 1}. {html.escape(r['job'])}: score "
                     f"{html.escape(r['score'])}, t = {html.escape(r['time_gyr'])} Gyr, "
                     f"view {html.escape(r['view'])}{' mirrored' if r['mirror'] == '1' else ''}"
                     "</figcaption></figure>")
    scores = {r["job"]: float(r["score"]) for r in ranking}
    plots = []
    for k, key in enumerate(keys):
        points = [(float(v), scores[row.name]) for row in rows
                  if row.name in scores and isinstance(v := row.values.get(key), int | float)]
        if len(points) >= 2:
            dest = media / f"match-score-{k}.png"
            scatter(points, dest)
            plots.append(f'<figure><img src="{_url(dest, page_dir)}" alt="score vs '
                         f'{html.escape(key)}"><figcaption>{html.escape(meta["metric"])} '
                         f"against {html.escape(key)}</figcaption></figure>")
    return (f"<h2>Match against {html.escape(Path(meta['target']).name)} "
            f"(ranked by {html.escape(meta['metric'])})</h2>"
            f"<p>Target (left) and the best render of the top jobs (right).</p>"
            f"{''.join(tiles)}<h3>Score against each varied parameter</h3>{''.join(plots)}")


def scatter(points: list[tuple[float, float]], dest: Path) -> None:
    """A small scatter plot (PIL only): x the parameter, y the score, ranges labelled."""
    width, height = PLOT_PX
    image = Image.new("RGB", PLOT_PX, "white")
    draw = ImageDraw.Draw(image)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1
    left, bottom, pad = 40, height - 20, 8
    draw.rectangle([left, pad, width - pad, bottom], outline="#888")
    for x, y in points:
        px = left + (x - x0) / (x1 - x0) * (width - pad - left)
        py = bottom - (y - y0) / (y1 - y0) * (bottom - pad)
        draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill="#1f5fbf")
    draw.text((2, pad), f"{y1:.3g}", fill="black")
    draw.text((2, bottom - 10), f"{y0:.3g}", fill="black")
    draw.text((left, bottom + 4), f"{x0:.4g}", fill="black")
    draw.text((width - 50, bottom + 4), f"{x1:.4g}", fill="black")
    image.save(dest)
