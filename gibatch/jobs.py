"""Job folders: discovery in natural order, validation into typed parameters, lineage.

A job's *lineage* gives every step a hash of its own parameters and of everything
upstream of it (jobs.md): two steps with equal lineage produce the same result, so a
model number already holding that lineage need not run the step again.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import BaseModel, ValidationError

from gibatch import steps
from gibatch.params import (
    GalaxyParams,
    InteractParams,
    MergeParams,
    PlotParams,
    StepParams,
    describe_errors,
)
from gibatch.steps import Stage, Step
from gibatch.text import printable

OUTPUT_DIR = "output"
STATE_DIR = ".gibatch"
# ASCII digits, no leading zero: `plot01.json` or `plot١.json` must not pass for plot 1.
_PLOT_FILE = re.compile(r"^plot([1-9][0-9]*)\.json$")
_MAX_JOB_FILE_BYTES = 1 << 20
# A job file needs 2 levels ({"halo": {...}}); far deeper is an attack or an accident,
# and would reach recursion limits in the parser, pydantic or the lineage hash.
MAX_JSON_DEPTH = 32
# No parameter needs more digits; a longer integer is refused before int() spends
# quadratic time on it (or trips Python's 4300-digit conversion limit).
_MAX_INT_DIGITS = 32
# Byte-order marks of encodings an editor may have saved the file in instead of UTF-8.
_BOMS = {b"\xef\xbb\xbf": "starts with a UTF-8 byte-order mark (BOM); save it as UTF-8 "
                          "without BOM",
         b"\xff\xfe": "is UTF-16 text; save it as UTF-8",
         b"\xfe\xff": "is UTF-16 text; save it as UTF-8"}
# POSIX flags (absent elsewhere): never block on a FIFO, never adopt a terminal.
_OPEN_FLAGS = os.O_RDONLY | sum(getattr(os, f, 0) for f in ("O_NONBLOCK", "O_NOCTTY",
                                                             "O_CLOEXEC"))
_MODEL_OF_STAGE: dict[Stage, type[BaseModel]] = {
    Stage.GALAXY: GalaxyParams,
    Stage.MERGE: MergeParams,
    Stage.INTERACT: InteractParams,
    Stage.PLOT: PlotParams,
}


@dataclass(frozen=True)
class Problem:
    """One reason a job cannot run, naming the folder, the file and the field."""

    job: str
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        """One line, whatever the names hold (every output path prints this)."""
        where = f"{self.job}/{self.file}" if self.file else self.job
        field = f"{self.field}: " if self.field else ""
        return printable(f"{where}: {field}{self.message}")


class JobInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


@dataclass(frozen=True)
class Job:
    """A validated job folder: each step's lineage, and what to POST for it.

    Built for sweeps of 100,000 jobs: the payloads of a job read from the discovery
    cache stay one JSON text until first used, and the typed parameters (`params`) are
    built only when asked for; most jobs of a run never need more than their lineage
    until they are submitted.
    """

    name: str
    path: Path
    lineage: dict[Step, str]  # in chain order: the order of submission
    source: dict[Step, dict[str, Any]] | str = field(compare=False, repr=False)

    @property
    def steps(self) -> list[Step]:
        return list(self.lineage)

    @property
    def output(self) -> Path:
        return self.path / OUTPUT_DIR

    @functools.cached_property
    def payloads(self) -> dict[Step, dict[str, Any]]:
        """Validated and normalised parameters per step (never mutated)."""
        return self.payloads_once()

    def payloads_once(self) -> dict[Step, dict[str, Any]]:
        """`payloads`, not kept (a report reads each of 100,000 jobs' once)."""
        if not isinstance(self.source, str):
            return self.source
        return dict(zip(self.lineage, json.loads(self.source), strict=True))

    @functools.cached_property
    def params(self) -> dict[Step, StepParams]:
        return {step: _MODEL_OF_STAGE[step.stage].model_validate(body)  # type: ignore[misc]
                for step, body in self.payloads.items()}

    def payload(self, step: Step) -> dict[str, Any]:
        """The JSON object to POST for `step`, without the model number."""
        return copy.deepcopy(self.payloads[step])


def payload_of(params: StepParams) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude_none=True)


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting `2` before `10` and digits before text."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def _may_be_job(entry: os.DirEntry[str]) -> bool:
    """A folder not starting with `.`; also an entry whose type cannot be read (a
    symlink loop, no permission) or a link whose target is gone (an unmounted drive, a
    moved folder), so that load_job reports it instead of a traceback here or a job
    silently left out. A link to a file is no job."""
    if entry.name.startswith("."):
        return False
    try:
        return entry.is_dir() or (entry.is_symlink() and not os.path.exists(entry.path))
    except OSError:
        return True


def job_names(root: Path) -> list[str]:
    """The names of the job folders of a sweep, in listing order (dot-folders are not
    jobs)."""
    with os.scandir(root) as it:
        return [e.name for e in it if _may_be_job(e)]


def discover(root: Path) -> list[Path]:
    """The job folders of a sweep, in natural order."""
    return [root / name for name in sorted(job_names(root), key=natural_key)]


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def compute_lineage(payloads: dict[Step, dict[str, Any]]) -> dict[Step, str]:
    """Hash each step with everything it depends on (see module docstring)."""
    out: dict[Step, str] = {}
    for step, body in payloads.items():
        if step.stage is Stage.GALAXY:
            out[step] = _digest("galaxy", body)
        elif step.stage is Stage.MERGE:
            out[step] = _digest("merge", body, out[steps.GALAXY1], out[steps.GALAXY2])
        elif step.stage is Stage.INTERACT:
            out[step] = _digest("interact", body, out[steps.MERGE])
        else:  # a plot's number is where it is shown, not what it shows
            out[step] = _digest("plot", body, out[steps.INTERACT])
    return out


class NotRegularFile(OSError):
    """A path that is a folder, FIFO, socket or device where a file's content is wanted."""


def _require_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device")
    raise NotRegularFile(f"is {kind}, not a regular file")


def _open_regular(path: Path) -> int:
    """A descriptor open for reading on `path` (symlinks followed) if it is a regular
    file, else OSError (NotRegularFile saying what it is).

    The type is checked before opening, so a device is never opened, and again on the
    descriptor in case the path was swapped; O_NONBLOCK means even a FIFO put there in
    between cannot hang the open.
    """
    _require_regular(os.stat(path).st_mode)
    fd = os.open(path, _OPEN_FLAGS)
    try:
        _require_regular(os.fstat(fd).st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular(path: Path) -> BinaryIO:
    """`path` open for reading, if it is a regular file (see _open_regular)."""
    return os.fdopen(_open_regular(path), "rb")


def read_regular(path: Path, limit: int) -> bytes:
    """Up to `limit` bytes of the regular file `path` (see _open_regular).

    The limit counts bytes actually read, not what stat says (/proc files, a file still
    growing); small reads, as one read(limit) would allocate all of it for every file.
    """
    fd = _open_regular(path)
    try:
        chunks: list[bytes] = []
        size = 0
        while size < limit and (chunk := os.read(fd, min(1 << 16, limit - size))):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class _NotJson(ValueError):
    """Bytes that are not strict JSON (RFC 8259), though Python's json might take them;
    `field` names where, when the reason lies inside the object."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field


class _RepeatedKey(dict[str, Any]):
    """A JSON object in which `key` appears more than once (the parser keeps the last)."""

    made = 0  # how many ever: a parse that leaves it unchanged needs no search for one

    def __init__(self, pairs: list[tuple[str, Any]], key: str) -> None:
        super().__init__(pairs)
        self.key = key
        _RepeatedKey.made += 1


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Mark a repeated key instead of silently keeping its last value."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return _RepeatedKey(pairs, key)
        seen.add(key)
    raise AssertionError("unreachable: fewer keys than pairs means a repeat")


def _constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number (numbers must be finite)")


def _int(text: str) -> int:
    if len(text) > _MAX_INT_DIGITS:
        raise _NotJson(f"a number of {len(text)} digits is too long")
    return int(text)


# Built once: json.loads with hooks would build a decoder per file.
_DECODER = json.JSONDecoder(object_pairs_hook=_object, parse_constant=_constant,
                            parse_int=_int)


def _check_shape(data: Any) -> None:
    """Raise _NotJson for a repeated key or a nesting deeper than MAX_JSON_DEPTH.

    Iterative, so that no depth the parser let through can exhaust the stack here; a
    node's path is kept as a (parent, key) link and spelt out only for the message.
    """
    stack: list[tuple[Any, Any, int]] = [(data, None, 1)]
    while stack:
        node, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _NotJson(f"nested more than {MAX_JSON_DEPTH} levels deep")
        if isinstance(node, _RepeatedKey):
            keys = [node.key]
            while where is not None:
                where, key = where
                keys.append(str(key))
            raise _NotJson("key appears more than once in its object",
                           ".".join(reversed(keys)))
        items = node.items() if isinstance(node, dict) else enumerate(node)
        stack.extend((v, (where, k), depth + 1) for k, v in items if isinstance(v, dict | list))


def _parse(data: bytes) -> Any:
    """Strict JSON from bytes: UTF-8 without BOM, no NaN/Infinity, no endless integers,
    no repeated keys, at most MAX_JSON_DEPTH levels. Raises _NotJson saying why not.

    A number too large for a float (1e999) parses as inf; the models refuse it, naming
    the field.
    """
    for bom, why in _BOMS.items():
        if data.startswith(bom):
            raise _NotJson(why)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _NotJson(f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
                       f"{exc.start})") from None
    if not text.strip():
        raise _NotJson("file is empty (a job file holds a JSON object {...})")
    repeats = _RepeatedKey.made
    try:
        parsed = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise _NotJson(f"malformed JSON at line {exc.lineno} column {exc.colno}: "
                       f"{exc.msg}") from None
    except RecursionError:  # the C parser gives up cleanly long before the stack does
        raise _NotJson(f"nested more than {MAX_JSON_DEPTH} levels deep") from None
    # The walk only when it can find something (it costs as much as the parse).
    if _RepeatedKey.made != repeats or text.count("{") + text.count("[") > MAX_JSON_DEPTH:
        _check_shape(parsed)
    return parsed


def _read_json(job: str, path: Path, problems: list[Problem]) -> Any:
    """The JSON object in `path`, or None with the reason appended to `problems`."""
    try:
        data = read_regular(path, _MAX_JOB_FILE_BYTES + 1)
        if len(data) > _MAX_JOB_FILE_BYTES:
            raise _NotJson("file is larger than 1 MiB")
        parsed = _parse(data)
        if not isinstance(parsed, dict):
            raise _NotJson("must hold a JSON object {...}")
        return parsed
    except FileNotFoundError:
        problems.append(Problem(job, path.name, "", "file is missing"))
    except NotRegularFile as exc:
        problems.append(Problem(job, path.name, "", str(exc)))
    except OSError as exc:
        problems.append(Problem(job, path.name, "", f"cannot read: {exc.strerror or exc}"))
    except _NotJson as exc:
        problems.append(Problem(job, path.name, exc.field, str(exc)))
    except ValueError as exc:  # anything else the parser may raise
        problems.append(Problem(job, path.name, "", f"not valid JSON: {exc}"))
    return None


def _plot_numbers(job: str, folder: Path, problems: list[Problem]) -> int:
    numbers = sorted(
        int(m.group(1)) for f in os.listdir(folder) if (m := _PLOT_FILE.match(f))
    )
    if not numbers:
        problems.append(Problem(job, "plot1.json", "", "file is missing (a job needs a plot)"))
        return 0
    for expected, got in enumerate(numbers, start=1):
        if got != expected:
            problems.append(Problem(
                job, f"plot{got}.json", "",
                f"plots must be numbered 1, 2, 3 ... without gaps: plot{expected}.json is missing",
            ))
            return 0
    return len(numbers)


def job_files(job: Job) -> dict[str, Any]:
    """The job's own files as written (stem -> JSON object), read as `load_job` reads
    them: regular files only, size-limited. Other files in the folder are not opened."""
    out: dict[str, Any] = {}
    for step in job.steps:
        problems: list[Problem] = []
        data = _read_json(job.name, job.path / step.filename, problems)
        if data is None:  # changed since it was validated
            raise JobInvalid(problems)
        out[step.filename.removesuffix(".json")] = data
    return out


def load_job(folder: Path) -> Job:
    """Parse and validate one job folder; raise JobInvalid listing every problem found."""
    name = folder.name
    problems: list[Problem] = []
    try:
        plot_count = _plot_numbers(name, folder, problems)
    except OSError as exc:  # a symlink loop, no permission, not a folder after all
        raise JobInvalid([Problem(name, "", "", f"cannot read the folder: "
                                                f"{exc.strerror or exc}")]) from None
    params: dict[Step, StepParams] = {}
    for step in steps.chain(max(plot_count, 0)):
        data = _read_json(name, folder / step.filename, problems)
        if data is None:
            continue
        try:
            parsed = _MODEL_OF_STAGE[step.stage].model_validate(data)
        except ValidationError as exc:
            problems.extend(Problem(name, step.filename, f, m) for f, m in describe_errors(exc))
            continue
        if isinstance(parsed, GalaxyParams) and parsed.galaxy_number != step.number:
            problems.append(Problem(
                name, step.filename, "galaxy_number",
                f"is {parsed.galaxy_number} but this is {step.filename}",
            ))
            continue
        params[step] = parsed  # type: ignore[assignment]
    if problems:
        raise JobInvalid(problems)
    payloads = {step: payload_of(p) for step, p in params.items()}
    return Job(name=name, path=folder, lineage=compute_lineage(payloads), source=payloads)


@dataclass
class Sweep:
    """A folder of job folders, split into valid jobs and the problems of the others."""

    root: Path
    jobs: list[Job]
    problems: list[Problem]

    @property
    def invalid_jobs(self) -> list[str]:
        return sorted({p.job for p in self.problems}, key=natural_key)

    def reasons(self) -> dict[str, str]:
        """Each invalid job's problems as one line, in natural order of the jobs."""
        grouped: dict[str, list[str]] = {}
        for p in self.problems:
            grouped.setdefault(p.job, []).append(str(p))
        return {job: "; ".join(grouped[job]) for job in sorted(grouped, key=natural_key)}


def iter_jobs(root: Path) -> Iterator[Job | JobInvalid]:
    for folder in discover(root):
        try:
            yield load_job(folder)
        except JobInvalid as exc:
            yield exc


def load_sweep(root: Path, items: Iterable[Job | JobInvalid] | None = None) -> Sweep:
    """Validate every job of the sweep at `root` (or take `items`, the same jobs from
    elsewhere: `discovery` remembers them); never raises for a bad job."""
    jobs: list[Job] = []
    problems: list[Problem] = []
    for item in iter_jobs(root) if items is None else items:
        if isinstance(item, Job):
            jobs.append(item)
        else:
            problems.extend(item.problems)
    return Sweep(root, jobs, problems)
