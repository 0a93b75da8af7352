"""`gibatch report`: one static HTML page for a sweep, and a contact sheet of final frames.

The page works from `file://` with no server and no network: the jobs are one compact
JSON array in the page, laid out 500 rows at a time by a few lines of inline JavaScript
(sorting and filtering work on all of them), so 100,000 jobs make a page of a few MB
that opens at once; the rows stream to disk as they are made, so no list of them is
ever held. Thumbnails are small PNGs made in a process pool (once, kept while newer
than their image; those of jobs or plots no longer shown are deleted) and lazy-loaded,
and each opens the plot's animation straight from the job's `output/`. Only complete
jobs (completion record present and whole) show images: a half-downloaded file is
never shown as a result. The contact sheet shows the first `SHEET_MAX_TILES` complete jobs.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import logging
import math
import operator
import os
import re
import shutil
import sqlite3
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO, cast
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from gibatch import discovery
from gibatch.database import Database
from gibatch.jobs import OUTPUT_DIR, STATE_DIR, Job, Sweep, open_regular
from gibatch.status import JobState, JobStatus, SweepStatus
from gibatch.steps import Stage, Step
from gibatch.text import printable

if TYPE_CHECKING:
    from gibatch.match import Target

THUMB_PX = 160
SHEET_TILE_PX = 200
SHEET_MAX_TILES = 400  # 20 x 20 tiles: 4,000 px square, about 50 MB while it is made
REPORT_FILE = "report.html"
SHEET_FILE = "contact-sheet.png"
_ANIMATION_SUFFIXES = (".gif", ".mp4", ".webm")
_STILL_NAMES = ("final.png",)
_THUMBNAIL = re.compile(r"[0-9a-f]{16}-.*\.png")  # thumbnail_name's (a .tmp.png too)

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


class ReportError(Exception):
    """The page cannot be written where it should go (a folder of that name)."""


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
        self._differs: list[dict[str, object] | None] = []
        self._keys: list[str] | None = None

    def add(self, job: Job) -> None:
        """Take the next job; its values come from `values`, once all are added."""
        differs: dict[str, object] = {}
        first = self._first
        if first is None:
            self._first, self._first_payloads = job, job.payloads_once()
            for step, body in self._first_payloads.items():
                _walk(step.name, body, self._first_flat)
        elif self._same_steps(job):
            # An equal lineage is a hash of the same JSON: nothing to compare.
            changed = [k for k, (a, b) in enumerate(zip(first.lineage.values(),
                                                        job.lineage.values(), strict=True))
                       if a != b]
            if changed:
                firsts = list(self._first_payloads.items())
                mine = list(job.payloads_once().values())
                self._diff("", {firsts[k][0].name: firsts[k][1] for k in changed},
                           {firsts[k][0].name: mine[k] for k in changed}, differs)
        elif job.lineage != first.lineage:
            payloads = job.payloads_once()
            self._diff("", {s.name: b for s, b in self._first_payloads.items()
                            if first.lineage[s] != job.lineage.get(s)},
                       {s.name: b for s, b in payloads.items()
                        if job.lineage[s] != first.lineage.get(s)}, differs)
        self._varying.update(differs)
        self._differs.append(differs)

    def _same_steps(self, job: Job) -> bool:
        """Whether `job` has the first job's Step objects, in order: jobs from the
        discovery cache share them, so most do, and are compared by position without
        hashing a Step (a dataclass's hash is Python code: 100,000 jobs x 7 steps)."""
        first = self._first
        assert first is not None
        return (len(job.lineage) == len(first.lineage)
                and all(map(operator.is_, job.lineage, first.lineage)))

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

    def keys(self) -> list[str]:
        """The varying parameters, sorted (once every job is added)."""
        if self._keys is None:
            self._keys = sorted(self._varying)
        return self._keys

    def values(self) -> Iterator[dict[str, Value]]:
        """Each job's values of `keys`, in the order added; each job's differences are
        let go once its values are made."""
        keys = self.keys()
        for k, differs in enumerate(self._differs):
            assert differs is not None, "values() is read once"
            self._differs[k] = None
            values: dict[str, Value] = {}
            for key in keys:
                value = differs.get(key, self._first_flat.get(key, _ABSENT))
                if value is not _ABSENT:
                    values[key] = cast(Value, value)
            yield values
        self._differs = []


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


def placeholder(size: int = THUMB_PX, text: str = "unreadable image") -> Image.Image:
    """A grey square saying the image could not be read (or `text`)."""
    image = Image.new("RGB", (size, size), "#d0d0d0")
    ImageDraw.Draw(image).text((8, size // 2 - 6), text, fill="black")
    return image


# Reaching an animation's last frame decodes every frame (a GIF's frames build on each
# other), about 80 million pixels a second, and a GIF of huge plain frames is small on
# disk: 40 frames of 4000x4000 in 0.55 MB cost 8 s. Pillow's bomb check is per frame.
# The site's largest plot is 768 px square and a run has at most 2,000 frames.
MAX_ANIMATION_FRAME_PX = 2048 * 2048
MAX_ANIMATION_PX = 2_000 * 768 * 768  # at most ~15 s of decoding


class _TooCostly(Exception):
    pass


def last_frame(path: Path) -> Image.Image:
    """`path`'s last frame in RGB, or a placeholder if it cannot be read: one corrupt
    file costs its own picture, not the whole report. A bomb is refused, not decoded,
    and so is an animation whose frames would take too long to reach the last."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_regular(path) as f, Image.open(f) as image:
                frames = getattr(image, "n_frames", 1)  # frame headers only: cheap
                if frames > 1:
                    pixels = image.width * image.height
                    if pixels > MAX_ANIMATION_FRAME_PX or pixels * frames > MAX_ANIMATION_PX:
                        raise _TooCostly(f"{frames} frames of {image.width}x{image.height}")
                    image.seek(frames - 1)
                return image.convert("RGB")
    except _TooCostly as exc:
        log.warning("%s: an animation too large to decode (%s); shown as a placeholder",
                    printable(str(path)), exc)
        return placeholder(text="image too large")
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


def thumbnail_fresh(still: Path | str, dest: Path | str) -> bool:
    """Whether `dest` is newer than `still`: kept, not made again."""
    try:
        return os.stat(dest).st_mtime >= os.stat(still).st_mtime
    except OSError:  # none yet, or a dangling link (last_frame makes the placeholder)
        return False


def make_thumbnail(still: Path, dest: Path, size: int = THUMB_PX) -> None:
    """A small PNG of `still`'s last frame; kept if newer than its source."""
    if thumbnail_fresh(still, dest):
        return
    image = last_frame(still)
    image.thumbnail((size, size))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".tmp.png")
    image.save(tmp, format="PNG", optimize=True)
    os.replace(tmp, dest)


class _Collected(logging.Handler):
    """A worker's warnings, handed back to the parent (a spawned worker has no logging
    set up: they would be lost)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _make_thumbnails(batch: list[tuple[str, str]]) -> list[str]:
    """In a worker process: `make_thumbnail` for each (still, dest); the warnings logged."""
    collected = _Collected()
    log.addHandler(collected)
    try:
        for still, dest in batch:
            make_thumbnail(Path(still), Path(dest))
    finally:
        log.removeHandler(collected)
    return collected.messages


class Thumbnails:
    """Makes the thumbnails that are missing or older than their image, in a process
    pool: 100,000 jobs have 200,000 to make the first time, each a decode and a PNG
    encode of its own. The pool starts only once `BATCH` are waiting (a few are made
    here at once, as starting workers costs more), and at most `2 x workers` batches
    are in flight, so a sweep's worth of paths is never held."""

    BATCH = 64

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or max(1, min(4, os.cpu_count() or 1))
        self._batch: list[tuple[str, str]] = []
        self._pool: ProcessPoolExecutor | None = None
        self._flying: deque[Future[list[str]]] = deque()

    def __enter__(self) -> Thumbnails:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def want(self, still: str, dest: str, made: bool = False) -> None:
        """`dest` will be a thumbnail of `still` once `finish` returns. `made`: it was
        made from `still` as it is now (`ShotCache`), so is good if it exists."""
        if os.path.exists(dest) if made else thumbnail_fresh(still, dest):
            return
        self._batch.append((still, dest))
        if len(self._batch) >= self.BATCH:
            if self._pool is None:
                from gibatch.children import process_pool  # only for a pool's worth

                self._pool = process_pool(self.workers)
            self._flying.append(self._pool.submit(_make_thumbnails, self._batch))
            self._batch = []
            while len(self._flying) > 2 * self.workers:
                self._done(self._flying.popleft())

    def finish(self) -> None:
        """Every thumbnail wanted is made."""
        for still, dest in self._batch:
            make_thumbnail(Path(still), Path(dest))
        self._batch = []
        while self._flying:
            self._done(self._flying.popleft())

    @staticmethod
    def _done(future: Future[list[str]]) -> None:
        for message in future.result():
            log.warning("%s", message)


def remove_stale(media: Path, keep: set[str]) -> int:
    """Delete the thumbnails in `media` not in `keep` (a job removed, or no longer
    complete, a plot gone): otherwise they pile up over a sweep's life. Returns how many."""
    removed = 0
    with os.scandir(media) as entries:
        for entry in entries:
            if _THUMBNAIL.fullmatch(entry.name) and entry.name not in keep:
                with contextlib.suppress(FileNotFoundError):  # another report's doing
                    os.unlink(entry.path)
                    removed += 1
    return removed


def contact_sheet(tiles: list[tuple[str, Path]], dest: Path, tile: int = SHEET_TILE_PX,
                  most: int = SHEET_MAX_TILES, scratch: Path | None = None) -> int:
    """Each (job name, still) of the first `most`, side by side with their names;
    returns how many (0: no sheet written). A sheet of the same tiles, newer than each
    still, is kept (`_sheet_kept`)."""
    shots = tiles[:most]
    if not shots:
        return 0
    key = hashlib.blake2b(repr((tile, [(n, os.fspath(p)) for n, p in shots])).encode(
        errors="surrogatepass"), digest_size=16).hexdigest()
    if _sheet_kept(dest, key, shots):
        return len(shots)
    cols = min(len(shots), max(4, math.ceil(math.sqrt(len(shots)))))
    label = 14
    sheet = Image.new("RGB", (cols * tile, math.ceil(len(shots) / cols) * (tile + label)),
                      "white")
    draw = ImageDraw.Draw(sheet)
    for i, (name, still) in enumerate(shots):
        image = last_frame(still)
        image.thumbnail((tile - 4, tile - 4))
        x, y = (i % cols) * tile, (i // cols) * (tile + label)
        sheet.paste(image, (x + 2, y + 2))
        draw.text((x + 3, y + tile), name[: tile // 6], fill="black")
    tmp = (scratch or dest.parent) / (dest.stem + ".tmp.png")  # `scratch`: same file system
    info = PngInfo()
    info.add_text(_SHEET_KEY, key)
    sheet.save(tmp, format="PNG", optimize=True, pnginfo=info)
    os.replace(tmp, dest)
    return len(shots)


_SHEET_KEY = "gibatch-tiles"  # a PNG text chunk: a digest of the tiles, their size


def _sheet_kept(sheet: Path, key: str, shots: list[tuple[str, Path]]) -> bool:
    """Whether `sheet` shows `key`'s tiles and is newer than each still: a warm report
    of a large sweep then spends neither the second nor the 50 MB of making it."""
    try:
        with Image.open(sheet) as image:
            if image.info.get(_SHEET_KEY) != key:
                return False
        made = os.stat(sheet).st_mtime
        return all(os.stat(still).st_mtime <= made for _, still in shots)
    except _IMAGE_ERRORS:
        return False


def shown_text(name: str) -> str:
    """A file or folder name as the page shows it: undecodable bytes (surrogates, which
    the UTF-8 page cannot hold: a UnicodeEncodeError ended the report) as U+FFFD. Rows
    carry names as JSON, whose escapes keep them exact."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _url(path: Path, start: Path) -> str:
    """`path` relative to `start` as a URL: its bytes, so undecodable names work too."""
    return quote(os.fsencode(os.path.relpath(path, start).replace(os.sep, "/")))


def _json_in_html(data: object) -> str:
    """JSON to sit inside <script>: no `<` can close the element or open a comment."""
    return json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")


_STATES = [s.value for s in JobState]


@dataclass
class Table:
    """What the page says beside its rows, gathered as the rows stream by (`write_rows`)."""

    keys: list[str]
    counts: Counter[JobState] = field(default_factory=Counter)
    not_numeric: set[str] = field(default_factory=set)  # keys with a value not a number
    with_pictures: int = 0  # rows
    pictures: int = 0
    targets: dict[tuple[str, str], int] = field(default_factory=dict)  # -> its index

    def row_text(self, name: str, state: JobState, reason: str | None,
                 values: dict[str, Value], pictures: list[tuple[str, str, str]]) -> str:
        """One row as the page's script reads it (`page_data`), as JSON text; counted."""
        self.counts[state] += 1
        self.not_numeric.update(k for k, v in values.items() if not isinstance(v, int | float))
        shots = [[self.targets.setdefault((section, link), len(self.targets)), quote(thumb)]
                 for section, link, thumb in pictures]  # most jobs share a handful of links
        self.with_pictures += bool(shots)
        self.pictures += len(shots)
        row: list[object] = [name, _STATES.index(state.value), reason,
                             [None if (v := values.get(k)) is None else str(v)
                              for k in self.keys], shots]
        if shots and not discovery.storable(name):  # the script cannot encode it
            row.append(quote(os.fsencode(name), safe=""))
        return _json_in_html(row)

    def head(self, root: Path, page_dir: Path, media: Path) -> str:
        """The page data's other members, as JSON text without its braces."""
        return _json_in_html({
            "jobs": _url(root, page_dir) + "/", "media": _url(media, page_dir) + "/",
            "states": _STATES,
            "targets": [[section, quote(os.fsencode(link))]
                        for section, link in self.targets]})[1:-1]


def write_rows(out: TextIO, sweep: Sweep, status: SweepStatus, table: Table,
               values: Iterable[dict[str, Value]],
               pictures: Callable[[Job, JobStatus], list[Picture]],
               ) -> list[tuple[str, Path]]:
    """Write the page's rows as JSON texts joined by commas (`Table.row_text`), one per
    job, invalid ones last, as each is made: 100,000 rows are never held. A complete
    job's plots are its `pictures`. Returns the first `SHEET_MAX_TILES` (name, still)
    of the contact sheet."""
    by_name = {j.name: j for j in status.jobs}
    tiles: list[tuple[str, Path]] = []
    sep = ""
    for job, vals in zip(sweep.jobs, values, strict=True):
        st = by_name.get(job.name, JobStatus(job.name, JobState.PENDING))
        shown: list[tuple[str, str, str]] = []
        if st.state is JobState.COMPLETE:
            for picture in pictures(job, st):
                if not shown and len(tiles) < SHEET_MAX_TILES:
                    tiles.append((job.name, Path(picture.still)))
                shown.append((picture.section, picture.link, picture.thumb))
        out.write(sep + table.row_text(job.name, st.state, st.reason, vals, shown))
        sep = ","
    for st in status.jobs:
        if st.state is JobState.INVALID:
            out.write(sep + table.row_text(st.name, st.state, st.reason, {}, []))
            sep = ","
    return tiles


_SHOTS_SCHEMA = """
CREATE TABLE IF NOT EXISTS report_shots (
    name TEXT PRIMARY KEY, signature TEXT NOT NULL, shots TEXT NOT NULL);
"""


class ShotCache(Database):
    """Each complete job's plots as `find_shot` found them (and thumbnailed), with the
    completion signature they were found under (`record.Completion`): while it holds,
    no section folder has changed its listing since, and each thumbnail made then is
    still of its image. Without it a warm report of 100,000 jobs lists 200,000 folders
    and stats 400,000 files, all of which `status` has just vouched for."""

    def __init__(self, root: Path) -> None:
        super().__init__(root / STATE_DIR / discovery.CACHE_FILE, _SHOTS_SCHEMA,
                         {"report_shots": ["name", "signature", "shots"]})

    def shots(self, name: str, signature: str) -> list[ShotNames] | None:
        with self._lock:
            found = self._db.execute("SELECT signature, shots FROM report_shots "
                                     "WHERE name = ?", (name,)).fetchone()
        if found is None or found[0] != signature:
            return None
        shots: list[ShotNames] = json.loads(found[1])
        return shots

    def store(self, rows: list[tuple[str, str, list[ShotNames]]]) -> None:
        """Remember (name, signature, shots) of each of `rows`."""
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO report_shots VALUES (?, ?, ?)",
                                 [(name, signature, json.dumps(shots))
                                  for name, signature, shots in rows])


# A shot's section, still and animation as names in the section's folder: paths would
# break when the sweep moves, and 100,000 jobs' Paths cost more than their stats.
ShotNames = tuple[str, str | None, str | None]


class Picture(NamedTuple):
    """One plot of a complete job as the page shows it."""

    section: str
    still: str  # its path
    link: str  # what it opens, in the job's folder (output/SECTION/NAME)
    thumb: str  # the thumbnail's file name


class Pictures:
    """A complete job's pictures for the page: its plots (`find_shot`, or remembered
    by `ShotCache`) and their thumbnails (`Thumbnails`), each thumbnail's name kept to
    tell the stale ones (`remove_stale`)."""

    def __init__(self, root: Path, media: Path, maker: Thumbnails) -> None:
        self.top, self.media, self.maker = os.fspath(root), os.fspath(media), maker
        self.shown: set[str] = set()  # thumbnail names
        self._found: list[tuple[str, str, list[ShotNames]]] = []  # to remember
        try:
            self._cache: ShotCache | None = ShotCache(root)
        except (OSError, sqlite3.Error):
            self._cache = None  # found anew each time: slower, never wrong

    def __call__(self, job: Job, st: JobStatus) -> list[Picture]:
        proof = st.proof if self._cache is not None else None
        shots = None if proof is None or self._cache is None else \
            self._cache.shots(job.name, proof)
        remembered = shots is not None
        if shots is None:
            found = [find_shot(job.output / step.section) for step in job.steps
                     if step.stage is Stage.PLOT]
            shots = [(shot.section, None if shot.still is None else shot.still.name,
                      None if shot.animation is None else shot.animation.name)
                     for shot in found]
            if proof is not None and discovery.storable(job.name):
                self._found.append((job.name, proof, shots))
        output = f"{self.top}/{job.name}/{OUTPUT_DIR}"  # a sweep's job is at ROOT/NAME
        out = []
        for section, still, animation in shots:
            if still is not None:
                thumb = thumbnail_name(job.name, section)
                path = f"{output}/{section}/{still}"
                self.maker.want(path, f"{self.media}/{thumb}", made=remembered)
                self.shown.add(thumb)
                out.append(Picture(section, path, f"{OUTPUT_DIR}/{section}/{animation or still}",
                                   thumb))
        return out

    def close(self, made: bool) -> None:
        """Remember the plots found if `made`: their thumbnails are (`Thumbnails.finish`);
        otherwise an old thumbnail would pass for a new image's."""
        if self._cache is None:
            return
        try:
            if made:
                with contextlib.suppress(sqlite3.Error):  # a later report remembers
                    self._cache.store(self._found)
        finally:
            self._found = []
            self._cache.close()


def render_page(title: str, table: Table, sheet: Path | None, page_dir: Path,
                sheet_tiles: int = 0, match_html: str = "") -> tuple[str, str]:
    """The page before and after its data (`{{data}}`), which is streamed between."""
    keys = table.keys
    head = "".join(f'<th data-key="{html.escape(k)}" title="sort by {html.escape(k)}">'
                   f"{html.escape(k)}</th>" for k in keys)
    filters = "".join(
        f'<label>{html.escape(k)} <input type="number" step="any" data-min="{i}" '
        f'placeholder="min"> <input type="number" step="any" data-max="{i}" '
        f'placeholder="max"></label>'
        for i, k in enumerate(keys) if k not in table.not_numeric)
    sheet_link = "" if sheet is None else (
        f'<a href="{_url(sheet, page_dir)}">contact sheet</a>'
        + (f" (the first {sheet_tiles} complete jobs)" if sheet_tiles < table.with_pictures
           else ""))
    counts = ", ".join(f"{table.counts[s]} {s.value}" for s in JobState if table.counts[s])
    parts = {"title": html.escape(title), "counts": html.escape(counts), "sheet": sheet_link,
             "filters": filters, "head": head, "thumb_px": str(THUMB_PX),
             "match": match_html}
    template = resources.files("gibatch").joinpath("report.html").read_text()
    before, after = template.split("{{data}}")
    # One pass each: a job named "{{match}}" stays a name.
    return (re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m[1]], before),
            re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m[1]], after))


def build_report(sweep: Sweep, status: SweepStatus, page: Path | None = None) -> Report:
    """Write the page (default `JOBS/report.html`), its thumbnails and the contact sheet.

    The rows go to a file beside the page as they are made, the page is then written
    around them: at 100,000 jobs neither every row nor the page is ever in memory."""
    root = sweep.root
    default = page is None or page == root / REPORT_FILE
    page = root / REPORT_FILE if page is None else page
    # Beside the default page, the media hide in JOBS/.gibatch (a folder there would
    # be taken for a job); beside any other page, in PAGE_files/.
    media = root / STATE_DIR / "report" if default else page.with_name(page.stem + "_files")
    sheet = page.with_name(SHEET_FILE) if default else media / SHEET_FILE
    for path in (page, sheet):  # a job folder may have any name, these two included
        if path.is_dir():
            raise ReportError(f"{printable(str(path))} is a folder; the report needs the "
                              "name for a file (pass --out to write it elsewhere)")
    media.mkdir(parents=True, exist_ok=True)
    variation = Variation()
    for job in sweep.jobs:
        variation.add(job)
    table = Table(variation.keys())
    ranking = load_ranking(root)
    ranked: dict[str, dict[str, Value]] = {}  # name -> values, of the jobs ranked

    def values() -> Iterator[dict[str, Value]]:
        for job, vals in zip(sweep.jobs, variation.values(), strict=True):
            if ranking is not None and job.name in ranking.scores:
                ranked[job.name] = vals
            yield vals

    # Temporaries among the media (same file system, so os.replace holds), not beside
    # the page where a job folder may be named report.tmp.
    rows = media / (page.name + ".rows.tmp")
    tmp = media / (page.name + ".tmp")
    try:
        with rows.open("w", encoding="utf-8") as out, Thumbnails() as maker:
            pictures = Pictures(root, media, maker)
            made = False
            try:
                tiles = write_rows(out, sweep, status, table, values(), pictures)
                maker.finish()
                made = True
            finally:
                pictures.close(made)
        remove_stale(media, pictures.shown)
        shown = contact_sheet(tiles, sheet, most=SHEET_MAX_TILES, scratch=media)
        match_html = "" if ranking is None else match_section(
            sweep, ranking, ranked, table.keys, media, page.parent)
        before, after = render_page(shown_text(root.resolve().name), table,
                                    sheet if shown else None,
                                    page.parent, shown, match_html)
        with tmp.open("w", encoding="utf-8") as f, rows.open(encoding="utf-8") as data:
            f.write(before + '{"rows":[')
            shutil.copyfileobj(data, f)
            f.write("]," + table.head(root, page.parent, media) + "}" + after)
        os.replace(tmp, page)
    finally:
        rows.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return Report(page, sheet if shown else None, sum(table.counts.values()), table.pictures)


# -- the match section (when `gibatch match` or `gibatch search` has ranked the sweep)

MATCH_TOP = 5
PLOT_PX = (260, 170)


@dataclass(frozen=True)
class Ranking:
    meta: dict[str, Any]
    rows: list[dict[str, str]]
    scores: dict[str, float]  # job -> score
    target: Target


def load_ranking(root: Path) -> Ranking | None:
    """What `gibatch match` or `gibatch search` ranked, if it did (None otherwise, or if
    it cannot be read, or no longer goes with its target: a warning then)."""
    from gibatch import match_settings

    folder = match_settings.match_dir(root)
    if not (folder / match_settings.RANKING_FILE).exists():
        return None  # no ranking: the scorer's numerical stack stays unloaded
    from gibatch import match

    try:
        meta = json.loads((folder / match_settings.SETTINGS_FILE).read_text())
        data = (folder / match_settings.RANKING_FILE).read_bytes()
        digest = meta.get(match.RANKING_DIGEST) if isinstance(meta, dict) else None
        if digest is not None and digest != hashlib.sha256(data).hexdigest():
            raise ValueError("the ranking and its settings are of two runs (one was cut "
                             "short); run gibatch match again")
        text = data.decode("utf-8", "surrogateescape")
        ranking = [r for r in csv.DictReader(io.StringIO(text, newline="")) if r["rank"]]
        (c1, c2) = (tuple(c) for c in meta["centres"])
        target = match.load_target(Path(meta["target"]), (c1, c2), float(meta["blur_px"]))
        if "target_key" in meta and target.key != meta["target_key"]:
            raise ValueError(f"the target {printable(meta['target'])} has changed since "
                             "the ranking; run gibatch match again")
        scores = {r["job"]: float(r["score"]) for r in ranking}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, csv.Error,
            RecursionError, match_settings.MatchError) as exc:
        log.warning("report: match results not shown: %s", exc)
        return None
    return Ranking(meta, ranking, scores, target)


def match_section(sweep: Sweep, ranking: Ranking, values: dict[str, dict[str, Value]],
                  keys: list[str], media: Path, page_dir: Path) -> str:
    """The target beside the best render of the top jobs, and score against each varied
    parameter (`values`: of the ranked jobs, in the page's order). Renders are made
    again from the snapshots (cheap for five jobs), so the ranking file stays small."""
    from gibatch import match

    meta, target = ranking.meta, ranking.target
    jobs = {j.name: j for j in sweep.jobs}
    tiles = []
    for index, r in enumerate(ranking.rows[:MATCH_TOP]):
        job = jobs.get(r["job"])
        if job is None:
            continue
        views = {v.name: v for v in match.views_for(job, int(meta.get("views", 0)))}
        if r.get("snapshot") and match.snapshot_digest(job) != r["snapshot"]:
            log.warning("report: no render for %s: its results changed since the ranking",
                        printable(job.name))
            continue
        try:
            snaps = match.load_snapshots(match.snapshot_path(job))
            done = match.render_one(snaps, int(r["frame"]), views[r["view"]],
                                    r["mirror"] == "1", target)
        except (OSError, KeyError, ValueError, IndexError, TypeError) as exc:
            log.warning("report: no render for %s: %s", printable(job.name), exc)
            continue
        if done is None:
            continue
        pair = np.hstack([target.image, np.ones((target.image.shape[0], 2)), done[0]])
        dest = media / f"match-{index}.png"
        Image.fromarray((pair * 255).astype(np.uint8)).save(dest)
        tiles.append(f'<figure><img src="{_url(dest, page_dir)}" alt="target and render">'
                     f"<figcaption>{index + 1}. {html.escape(shown_text(r['job']))}: score "
                     f"{html.escape(r['score'])}, t = {html.escape(r['time_gyr'])} Gyr, "
                     f"view {html.escape(r['view'])}{' mirrored' if r['mirror'] == '1' else ''}"
                     "</figcaption></figure>")
    plots = []
    for k, key in enumerate(keys):
        points = [(float(v), ranking.scores[name]) for name, row in values.items()
                  if isinstance(v := row.get(key), int | float)]
        if len(points) >= 2:
            dest = media / f"match-score-{k}.png"
            scatter(points, dest)
            plots.append(f'<figure><img src="{_url(dest, page_dir)}" alt="score vs '
                         f'{html.escape(key)}"><figcaption>{html.escape(meta["metric"])} '
                         f"against {html.escape(key)}</figcaption></figure>")
    return (f"<h2>Match against {html.escape(shown_text(Path(meta['target']).name))} "
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
