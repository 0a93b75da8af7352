"""Job folders: discovery in natural order, validation into typed parameters, lineage.

A job's *lineage* gives every step a hash of its own parameters and of everything
upstream of it (jobs.md): two steps with equal lineage produce the same result, so a
model number already holding that lineage need not run the step again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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

OUTPUT_DIR = "output"
STATE_DIR = ".gibatch"
_PLOT_FILE = re.compile(r"^plot(\d+)\.json$")
_MAX_JOB_FILE_BYTES = 1 << 20

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
        where = f"{self.job}/{self.file}" if self.file else self.job
        field = f"{self.field}: " if self.field else ""
        return f"{where}: {field}{self.message}"


class JobInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


@dataclass(frozen=True)
class Job:
    """A validated job folder: the parameters of every step and their lineage."""

    name: str
    path: Path
    params: dict[Step, StepParams]
    lineage: dict[Step, str] = field(compare=False)

    @property
    def steps(self) -> list[Step]:
        return list(self.params)  # insertion order is submission order

    @property
    def output(self) -> Path:
        return self.path / OUTPUT_DIR

    def payload(self, step: Step) -> dict[str, Any]:
        """The JSON object to POST for `step`, without the model number."""
        return payload_of(self.params[step])


def payload_of(params: StepParams) -> dict[str, Any]:
    return params.model_dump(mode="json", exclude_none=True)


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key putting `2` before `10` and digits before text."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def discover(root: Path) -> list[Path]:
    """The job folders of a sweep, in natural order (dot-folders are not jobs)."""
    with os.scandir(root) as it:
        dirs = [e.name for e in it if e.is_dir() and not e.name.startswith(".")]
    return [root / name for name in sorted(dirs, key=natural_key)]


def _digest(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def compute_lineage(params: dict[Step, StepParams]) -> dict[Step, str]:
    """Hash each step with everything it depends on (see module docstring)."""
    out: dict[Step, str] = {}
    for step, p in params.items():
        body = payload_of(p)
        if step.stage is Stage.GALAXY:
            out[step] = _digest("galaxy", body)
        elif step.stage is Stage.MERGE:
            out[step] = _digest("merge", body, out[steps.GALAXY1], out[steps.GALAXY2])
        elif step.stage is Stage.INTERACT:
            out[step] = _digest("interact", body, out[steps.MERGE])
        else:  # a plot's number is where it is shown, not what it shows
            out[step] = _digest("plot", body, out[steps.INTERACT])
    return out


def _read_json(job: str, path: Path, problems: list[Problem]) -> Any:
    try:
        if path.stat().st_size > _MAX_JOB_FILE_BYTES:
            problems.append(Problem(job, path.name, "", "file is larger than 1 MiB"))
            return None
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        problems.append(Problem(job, path.name, "", "file is missing"))
        return None
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(job, path.name, "", f"cannot read: {exc}"))
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        msg = f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        problems.append(Problem(job, path.name, "", msg))
        return None
    if not isinstance(data, dict):
        problems.append(Problem(job, path.name, "", "must hold a JSON object {...}"))
        return None
    return data


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


def load_job(folder: Path) -> Job:
    """Parse and validate one job folder; raise JobInvalid listing every problem found."""
    name = folder.name
    problems: list[Problem] = []
    plot_count = _plot_numbers(name, folder, problems)
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
    return Job(name=name, path=folder, params=params, lineage=compute_lineage(params))


@dataclass
class Sweep:
    """A folder of job folders, split into valid jobs and the problems of the others."""

    root: Path
    jobs: list[Job]
    problems: list[Problem]

    @property
    def invalid_jobs(self) -> list[str]:
        return sorted({p.job for p in self.problems}, key=natural_key)


def iter_jobs(root: Path) -> Iterator[Job | JobInvalid]:
    for folder in discover(root):
        try:
            yield load_job(folder)
        except JobInvalid as exc:
            yield exc


def load_sweep(root: Path) -> Sweep:
    """Validate every job of the sweep at `root`; never raises for a bad job."""
    jobs: list[Job] = []
    problems: list[Problem] = []
    for item in iter_jobs(root):
        if isinstance(item, Job):
            jobs.append(item)
        else:
            problems.extend(item.problems)
    return Sweep(root, jobs, problems)
