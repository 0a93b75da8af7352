"""Adaptive search: Optuna asks for parameters, the scheduler runs them, matching scores.

A search space (TOML) names job keys in `gibatch sweep`'s syntax, each with a range:

    "interact.mass_2"       = {low = 0.5, high = 4, log = true}
    "merge.theta_galaxy_2"  = {low = 0, high = 90}
    "orbit.approach"        = {low = 0, high = 90, step = 15}
    "galaxy2.disk.number_of_particles" = {low = 100, high = 400, int = true}
    "plot1.colour_scheme"   = {choices = ["whiteonblack", "blackonwhite"]}

(`[merge]` tables with `theta_galaxy_2 = {...}` inside say the same.) Every key must
exist in the base job, as for `gibatch sweep`.

Each trial is an ordinary job folder, `search-NNNN` (the trial's number), so check,
status, report and match work on it; it runs through the same scheduler as `gibatch
run` (`Scheduler.add` while the run is open), and when it completes its best match
score is told to the study; a failed job is told as failed. The study lives in
`DIR/.gibatch/search/study.log` (Optuna's journal storage: appends under a file lock,
so a `kill -9` leaves it readable), named by the target, the space and how trials are
scored (`--metric`, `--views`, `--kpc-per-px`: one study never mixes two metrics), so
the same command resumes the same study. Another study in the same folder (a new
target image, the centres given again, an edited space) numbers its folders on from
the highest `search-NNNN` already there: its trial 0 is never another study's folder.
Resuming loses no trial and runs none twice: a trial asked but not yet told is
RUNNING in the study, and its folder is written from the trial's own parameters if the
kill came before it was; a folder already complete is scored and told; any other goes
back to the scheduler, which finishes what it started. Complete jobs of the folder that
are no trial yet (a first grid) are told to the study before anything is asked, when
their values lie in the space.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import optuna
from filelock import FileLock, Timeout
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from gibatch import match, match_settings, record
from gibatch.errors import leaves
from gibatch.jobs import (
    STATE_DIR,
    Job,
    JobInvalid,
    job_files,
    load_job,
    load_sweep,
    read_regular,
)
from gibatch.run import Outcome, Scheduler
from gibatch.sweep import SweepError, apply_point, lookup, orbit_of
from gibatch.text import printable

log = logging.getLogger("gibatch")

SEARCH_DIR = "search"
STUDY_FILE = "study.log"
JOB_PREFIX = "search-"
RESCAN_S = 1.0  # outcomes that come without an event (claimed elsewhere) are seen by then
_RANGE_KEYS = {"low", "high", "log", "int", "step", "choices"}

Value = int | float | str


class SearchError(Exception):
    """A search that cannot start as asked; the message names the key or the file."""


class TrialRefused(SearchError):
    """A trial's values make no valid job (the job checks refuse them together, as a
    plot's minimum past its maximum): the trial fails, the search goes on."""


# -- the space


@dataclass(frozen=True)
class Dimension:
    """One searched key and its Optuna distribution."""

    key: str
    distribution: BaseDistribution


def _dimension(key: str, spec: Mapping[str, Any]) -> Dimension:
    unknown = set(spec) - _RANGE_KEYS
    if unknown:
        raise SearchError(f"{key}: unknown setting {sorted(unknown)[0]!r} (a range has low, "
                          "high and optionally log, int, step; or choices = [...])")
    if "choices" in spec:
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices or not all(
                isinstance(c, int | float | str) and not isinstance(c, bool) for c in choices):
            raise SearchError(f"{key}: choices must be a non-empty list of numbers or strings")
        return Dimension(key, CategoricalDistribution(choices))
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in (low, high)):
        raise SearchError(f"{key}: needs numbers low and high (or choices = [...])")
    assert isinstance(low, int | float) and isinstance(high, int | float)
    if high <= low:
        raise SearchError(f"{key}: low ({low}) must be below high ({high})")
    log_scale, step = bool(spec.get("log", False)), spec.get("step")
    if log_scale and low <= 0:
        raise SearchError(f"{key}: a log range needs low > 0")
    if step is not None and (not isinstance(step, int | float) or step <= 0 or log_scale):
        raise SearchError(f"{key}: step must be a positive number, and not with log")
    try:
        if spec.get("int", False):
            return Dimension(key, IntDistribution(math.ceil(low), math.floor(high), log=log_scale,
                                                  step=int(step or 1)))
        return Dimension(key, FloatDistribution(float(low), float(high), log=log_scale,
                                                step=None if step is None else float(step)))
    except ValueError as exc:  # Optuna's own checks (an int range with no integer in it)
        raise SearchError(f"{key}: {exc}") from None


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Mapping[str, Any]]:
    """Key -> range; a nested table is a range when it holds range settings."""
    out: dict[str, Mapping[str, Any]] = {}
    for name, value in table.items():
        key = f"{prefix}{name}"
        if not isinstance(value, dict):
            raise SearchError(f"{key}: expected a table like {{low = 0, high = 90}}")
        found = {key: value} if set(value) & _RANGE_KEYS else _flatten(value, f"{key}.")
        twice = sorted(found.keys() & out.keys())
        if twice:  # "merge.k" quoted and k under [merge] are one key: the last range won
            raise SearchError(f"{twice[0]}: given twice (quoted, and in its table)")
        out.update(found)
    return out


SPACE_BYTES_MAX = 1 << 20


def load_space(path: Path, base: Mapping[str, Any]) -> list[Dimension]:
    """The dimensions of the TOML space at `path`, each key checked against `base`."""
    try:  # bounded, regular files only: /dev/zero would fill the memory, a FIFO hang
        data = read_regular(path, SPACE_BYTES_MAX + 1)
        if len(data) > SPACE_BYTES_MAX:
            raise SearchError(f"--space {path}: larger than {SPACE_BYTES_MAX >> 10} KiB; "
                              "it holds a few keys and their ranges")
        ranges = _flatten(tomllib.loads(data.decode("utf-8")))
    except OSError as exc:
        raise SearchError(f"--space {path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SearchError(f"--space {path}: not valid TOML: {exc}") from None
    except RecursionError:  # arrays or tables nested thousands deep
        raise SearchError(f"--space {path}: nested too deeply") from None
    if not ranges:
        raise SearchError(f"--space {path}: names no key to search")
    dims = []
    for key, spec in ranges.items():
        dim = _dimension(key, spec)
        probe = dim.distribution.to_external_repr(dim.distribution.to_internal_repr(
            _some_value(dim.distribution)))
        try:
            apply_point(base, {key: probe})
        except SweepError as exc:
            raise SearchError(f"--space: {exc}") from None
        dims.append(dim)
    try:  # keys that overwrite each other (orbit.* and merge.position_galaxy_2.x)
        apply_point(base, {d.key: _some_value(d.distribution) for d in dims})
    except SweepError as exc:
        raise SearchError(f"--space: {exc}") from None
    return dims


def _some_value(dist: BaseDistribution) -> Value:
    if isinstance(dist, CategoricalDistribution):
        first: Value = dist.choices[0]  # type: ignore[assignment]
        return first
    assert isinstance(dist, FloatDistribution | IntDistribution)
    return dist.low


def space_key(dims: list[Dimension]) -> str:
    blob = json.dumps([[d.key, optuna.distributions.distribution_to_json(d.distribution)]
                       for d in dims])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _inside(dist: BaseDistribution, value: Value) -> bool:
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    assert isinstance(dist, FloatDistribution | IntDistribution)
    return isinstance(value, int | float) and dist.low <= value <= dist.high


def job_values(files: Mapping[str, Any], dims: list[Dimension]) -> dict[str, Value] | None:
    """A job's values of the searched keys, if all lie in the space (None otherwise)."""
    out: dict[str, Value] = {}
    for dim in dims:
        stem, _, sub = dim.key.partition(".")
        value = (orbit_of(files["merge"])[sub] if stem == "orbit" and "merge" in files
                 else lookup(files, dim.key))
        if (not isinstance(value, int | float | str) or isinstance(value, bool)
                or not _inside(dim.distribution, value)):
            return None
        out[dim.key] = value
    return out


# -- the study and its job folders


FIRST_JOB_ATTR = "first_job"  # a study's user attribute: its trial 0's folder number
_TRIAL_FOLDER = re.compile(re.escape(JOB_PREFIX) + r"([0-9]{1,9})")


def trial_job(trial: FrozenTrial, first: int = 0) -> str:
    """The job folder of a trial: its own name if told from an existing job, else
    `search-NNNN` numbered from the study's `first`."""
    name = trial.user_attrs.get("job")
    return str(name) if name else f"{JOB_PREFIX}{first + trial.number:04d}"


def next_free_number(root: Path) -> int:
    """One past the highest `search-NNNN` folder in `root` (0 if none)."""
    found = [int(m[1]) for name in os.listdir(root) if (m := _TRIAL_FOLDER.fullmatch(name))]
    return max(found, default=-1) + 1


def scoring_key(settings: match_settings.Settings) -> str:
    """What decides a trial's score besides the target, as a study name's suffix (none
    for the defaults, so studies begun before it resume): scores by another metric, from
    other views or within another scale are not to be compared."""
    how = [settings.metric.value, settings.views, settings.kpc_per_px]
    if how == [match_settings.Metric.SSIM.value, 0, None]:
        return ""
    return "-" + hashlib.sha256(json.dumps(how).encode()).hexdigest()[:8]


def write_job(root: Path, name: str, base: Mapping[str, Any], point: Mapping[str, Value]
              ) -> Job:
    """Write job folder `name` from the base job with `point` set, whole or not at all."""
    staging = Path(tempfile.mkdtemp(dir=root / STATE_DIR, prefix="search-job-"))
    try:
        for stem, obj in apply_point(base, point).items():
            (staging / f"{stem}.json").write_text(json.dumps(obj, indent=2) + "\n")
        load_job(staging)  # a value the base job's own checks refuse fails here
        staging.rename(root / name)
    except JobInvalid as exc:  # named as the folder it would have been, not the staging's
        raise TrialRefused(str(exc).replace(staging.name, name)) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_job(root / name)


@dataclass
class Progress:
    """What the live display shows."""

    asked: int = 0
    told: int = 0
    failed: int = 0
    budget: int = 0
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_job: str = ""


def startup_trials(budget: int) -> int:
    """Random trials before TPE models the scores: Optuna's 10, but at most a third of a
    small budget, which would otherwise be mostly random search."""
    return max(3, min(10, budget // 3))


def sampler_seed(seed: int | None, trials: int) -> int | None:
    """The sampler's seed for a study that already holds `trials` trials.

    A seeded sampler starts its random numbers afresh in every process: resumed with the
    seed it began with, it would ask again the random startup points it asked before the
    kill (CI's kill -9 test ran 4 of its first trials twice over, each a job for
    nothing). Seeded by the seed and the trials so far, a resumed search draws new
    points, and the same history still gives the same ones; a new study keeps `seed`.
    """
    if seed is None or trials == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{trials}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _mend_journal(path: Path) -> None:
    """What an abrupt end leaves in Optuna's journal, put right; only under search.lock,
    which every writer of the journal holds (readers take no lock).

    - A last line cut short (the disk full, the power gone mid-append): Optuna skips
      it, but appends the next line straight after it, making one undecodable line in
      the middle that every later read raises on; it is cut off (never read, so no
      trial loses what the study knew).
    - Optuna's own lock (`study.log.lock`, a symlink held only inside an append) left
      by a kill -9 mid-append: the next append waited 30 s (its grace period) for it.
    """
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{path}.lock")
    try:
        with path.open("r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            keep = 0  # past the last whole line
            for start in range(size, 0, -(1 << 16)):
                f.seek(max(0, start - (1 << 16)))
                chunk = f.read(start - max(0, start - (1 << 16)))
                if (newline := chunk.rfind(b"\n")) >= 0:
                    keep = max(0, start - (1 << 16)) + newline + 1
                    break
            log.warning("%s: its last line was cut short (the disk full, or the power "
                        "lost mid-write); dropped", printable(str(path)))
            f.truncate(keep)
            os.fsync(f.fileno())
    except FileNotFoundError:
        return


def _difference(key: str, a: float, b: float) -> float:
    """a - b, angles the short way round."""
    return (a - b + 180.0) % 360.0 - 180.0 if key in ("azimuth", "approach") else a - b


def _orbit_slack(key: str, orbit: Mapping[str, float]) -> float:
    """How far an orbit key read back (`orbit_of`) may lie from the value written: the
    position and velocity are rounded to 1e-4 (kpc, km/s), which moves an angle by up to
    about 1e-4 over the length it is measured on (tenfold here, for safety); an angle
    measured on a length of 0 is not held at all."""
    def turned(*lengths: float) -> float:
        return sum(math.degrees(1e-3 / n) if n > 1e-9 else math.inf for n in lengths)

    distance, speed = orbit["distance"], orbit["speed"]
    across = distance * math.cos(math.radians(orbit["elevation"]))
    slack = {"distance": 1e-3, "speed": 1e-3, "azimuth": turned(across),
             "elevation": turned(distance), "approach": turned(across, speed)}
    return slack[key] + 1e-9


class Search:
    """One study over one folder; `drive` feeds a scheduler until the budget is told."""

    def __init__(self, root: Path, base: Mapping[str, Any], dims: list[Dimension],
                 target: match.Target, settings: match_settings.Settings, budget: int,
                 seed: int | None = None,
                 on_progress: Callable[[Progress], None] | None = None) -> None:
        if budget < 1:
            raise SearchError(f"--budget {budget}: must be at least 1")
        if seed is not None and not 0 <= seed < 2**32:  # a new study's: numpy's ValueError
            raise SearchError(f"--seed {seed}: must be from 0 to {2**32 - 1}")
        self.root, self.base, self.dims = root, base, dims
        self.target, self.settings, self.budget = target, settings, budget
        folder = root / STATE_DIR / SEARCH_DIR
        self._lock = FileLock(folder / "search.lock")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire(timeout=0)
        except Timeout:
            raise SearchError(f"another gibatch search is running on {root}") from None
        except OSError as exc:  # a file of the folder's name, a folder not ours to write
            raise SearchError(f"{printable(str(folder))}: cannot keep the study there: "
                              f"{printable(exc.strerror or str(exc))}") from None
        journal = folder / STUDY_FILE
        try:
            _mend_journal(journal)
            storage = JournalStorage(JournalFileBackend(str(journal)))
            self.study = optuna.create_study(
                study_name=f"{target.key}-{space_key(dims)}{scoring_key(settings)}",
                storage=storage, direction="maximize", load_if_exists=True)
            self.first = self._first_number()
            trials = len(self.study.get_trials(deepcopy=False))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            self._lock.release()  # a line damaged in the middle, a folder in its place
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SearchError(f"{printable(str(journal))}: the study cannot be read "
                              f"({printable(str(why))}); move it away to start the search "
                              "anew") from None
        self.study.sampler = optuna.samplers.TPESampler(
            seed=sampler_seed(seed, trials), n_startup_trials=startup_trials(budget))
        self.progress = Progress(budget=budget)
        self._on_progress = on_progress
        self._in_flight: dict[str, int] = {}  # job name -> trial number
        self._changed = anyio.Event()
        self._stopped = False

    def close(self) -> None:
        self._lock.release()

    def _first_number(self) -> int:
        """The folder number of this study's trial 0, kept in the study. A new study
        starts past every `search-NNNN` folder (another study's trials); a study begun
        before this was kept, with trials already, starts at 0 as it did. A kill before
        it is stored leaves a study with no trial, hence no folder: the same number is
        found again."""
        first = self.study.user_attrs.get(FIRST_JOB_ATTR)
        if isinstance(first, int) and not isinstance(first, bool) and first >= 0:
            return first
        first = 0 if self.study.get_trials(deepcopy=False) else next_free_number(self.root)
        self.study.set_user_attr(FIRST_JOB_ATTR, first)
        return first

    def _name(self, trial: FrozenTrial) -> str:
        return trial_job(trial, self.first)

    # -- what the study holds

    def _asked(self) -> list[FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get("job")]

    def _refresh(self) -> None:
        trials = self.study.get_trials(deepcopy=False)
        done = [t for t in trials if t.state is TrialState.COMPLETE]
        p = self.progress
        p.asked = len(self._asked())
        p.told = sum(1 for t in trials if t.state.is_finished() and not t.user_attrs.get("job"))
        p.failed = sum(1 for t in trials if t.state is TrialState.FAIL)
        if done:
            best = max(done, key=lambda t: t.value or 0.0)
            p.best_value, p.best_params, p.best_job = best.value, best.params, self._name(best)
        if self._on_progress:
            self._on_progress(p)

    def tell_existing(self) -> int:
        """Tell the study every complete job of the folder that is no trial yet."""
        known = {self._name(t) for t in self.study.get_trials(deepcopy=False)}
        told = 0
        for job in load_sweep(self.root).jobs:
            if job.name in known or job.name.startswith(JOB_PREFIX) or not record.is_complete(
                    job):
                continue
            values = job_values(job_files(job), self.dims)
            score = self._score(job) if values is not None else None
            if values is None or score is None:
                log.info("job %s: not told to the study (outside the space or unscorable)",
                         job.name)
                continue
            self.study.add_trial(optuna.trial.create_trial(
                params=values, distributions={d.key: d.distribution for d in self.dims},
                value=score, user_attrs={"job": job.name}))
            told += 1
        self._refresh()
        return told

    def write_ranking(self) -> Path | None:
        """The study's jobs ranked where `match` leaves its ranking, so that `report`
        shows the target beside the best of them (it never did after a search, though
        both said it would). Their scores come from the cache: each was scored when
        told. None (and an earlier ranking kept) if no job of the study has a score yet
        (none asked, or every one failed)."""
        names = {self._name(t) for t in self.study.get_trials(deepcopy=False)}
        jobs = [job for job in load_sweep(self.root).jobs if job.name in names]
        results = match.match_jobs(self.root, jobs, self.target, self.settings, workers=1)
        if not any(r.best is not None for r in results):
            return None
        return match.write_results(self.root, results, self.target, self.settings)

    def _score(self, job: Job) -> float | None:
        """The job's best score by the ranking metric (cached, so `match` reuses it)."""
        results = match.match_jobs(self.root, [job], self.target, self.settings, workers=1)
        best = results[0].best if results else None
        return None if best is None else best.value(self.settings.metric)

    # -- the loop

    def _ask(self) -> tuple[Job, int]:
        """A new trial and its job folder; TrialRefused (the trial told failed) if its
        values make no valid job."""
        trial = self.study.ask({d.key: d.distribution for d in self.dims})
        return self._folder_of(self.study.get_trials(deepcopy=False)[trial.number]), \
            trial.number

    def _folder_of(self, trial: FrozenTrial) -> Job:
        """`_job_of`, a trial whose values make no valid job told as failed (it stopped
        the search, and every rerun on resuming it: the region fails, the search goes
        on)."""
        try:
            return self._job_of(trial)
        except TrialRefused as exc:
            self.study.tell(trial.number, state=TrialState.FAIL)
            log.warning("trial %d failed: its values make no valid job: %s", trial.number,
                        exc)
            self._refresh()
            raise

    def _job_of(self, trial: FrozenTrial) -> Job:
        """The trial's job folder, written from its parameters if a kill came first; one
        already there must hold them (not another study's trial, nor a user's job)."""
        name = self._name(trial)
        folder = self.root / name
        if folder.exists():
            try:
                job = load_job(folder)
            except JobInvalid as exc:
                raise SearchError(f"trial {trial.number}: its folder {name} is not a valid "
                                  f"job: {exc}") from None
            self._check_holds(job, trial)
            return job
        return write_job(self.root, name, self.base, self._all_params(trial))

    def _check_holds(self, job: Job, trial: FrozenTrial) -> None:
        """Raise SearchError unless `job` holds `trial`'s values of every searched key
        (orbit keys as far as the rounding of the position and velocity they are written
        as lets them be read back: `_orbit_slack`)."""
        files = job_files(job)
        try:
            orbit = orbit_of(files["merge"]) if any(
                d.key.startswith("orbit.") for d in self.dims) else {}
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            orbit = {}
        for dim in self.dims:
            asked = trial.params.get(dim.key)
            stem, _, sub = dim.key.partition(".")
            if asked is None:
                continue
            if stem != "orbit":
                held = lookup(files, dim.key)
                same = asked == held
            else:
                held = orbit.get(sub)
                same = isinstance(held, float) and isinstance(asked, int | float) and abs(
                    _difference(sub, asked, held)) <= _orbit_slack(sub, orbit)
            if not same:
                raise self._not_the_trials(job, trial, f"{dim.key} = {held!r}", f"{asked!r}")

    def _not_the_trials(self, job: Job, trial: FrozenTrial, held: str, asked: str
                        ) -> SearchError:
        return SearchError(f"{self.root / job.name}: holds {held}, but it is trial "
                           f"{trial.number}'s folder, which asked {asked} (a folder of "
                           "another search?); move it away or search in another --jobs "
                           "folder")

    def _all_params(self, trial: FrozenTrial) -> dict[str, Any]:
        """The trial's parameters, every dimension's. `ask` stores them one by one, so a
        kill inside it leaves a running trial with some missing: those are asked of the
        sampler now, for that trial (its folder was never written, nothing ran)."""
        missing = [d for d in self.dims if d.key not in trial.params]
        if not missing:
            return dict(trial.params)
        live = optuna.trial.Trial(self.study, trial._trial_id)
        for dim in missing:
            live._suggest(dim.key, dim.distribution)  # optuna's one generic suggest
        return dict(self.study.get_trials(deepcopy=False)[trial.number].params)

    async def _tell(self, name: str, outcome: Outcome, reason: str) -> None:
        number = self._in_flight.pop(name)
        if outcome in (Outcome.COMPLETE, Outcome.ALREADY_COMPLETE):
            score = await anyio.to_thread.run_sync(self._score, load_job(self.root / name))
            if score is not None:
                self.study.tell(number, score)
                log.info("trial %d (%s): %s %.4f", number, name, self.settings.metric.value,
                         score)
            else:
                self.study.tell(number, state=TrialState.FAIL)
                log.warning("trial %d (%s): no frame could be matched", number, name)
        else:
            self.study.tell(number, state=TrialState.FAIL)
            log.warning("trial %d (%s) failed: %s", number, name, reason)
        self._refresh()

    def notify(self, event: str, fields: dict[str, object]) -> None:
        """A scheduler listener: wake the loop when a job's outcome may have changed."""
        if event.startswith("job-"):
            self._changed.set()

    def stop(self) -> None:
        """The run ended (a signal, no model number free): ask nothing more."""
        self._stopped = True
        self._changed.set()

    async def drive(self, scheduler: Scheduler, slots: int) -> None:
        """Ask, queue and tell until the budget is spent and told; then close the run.

        At most `slots` trials are queued or running at once (one per model number),
        each asked when one ends, so every answer informs the next question.
        """
        try:
            while not (scheduler.stopping or self._stopped):
                await self._settle(scheduler)
                while (len(self._asked()) < self.budget and len(self._in_flight) < slots
                       and not (scheduler.stopping or self._stopped)):
                    try:
                        job, number = self._ask()
                    except TrialRefused:
                        continue  # told failed: the budget counts it
                    self._in_flight[job.name] = number
                    scheduler.add(job)
                    self._refresh()
                if not self._in_flight:
                    break
                with anyio.move_on_after(RESCAN_S):
                    await self._changed.wait()
                self._changed = anyio.Event()
        finally:
            scheduler.close()

    async def resume(self, scheduler: Scheduler) -> None:
        """Before the scheduler starts: queue every trial a kill left running (its job
        folder written if the kill came first), tell those whose job is complete.

        Queued before `execute`, so its start-of-run reservation sees them: a trial whose
        task the kill left on a model number stays with that model, instead of going to
        whichever model is free first and running its tasks again."""
        for trial in self._asked():
            if trial.state is TrialState.RUNNING:
                await self._resume(scheduler, trial)

    async def _resume(self, scheduler: Scheduler, trial: FrozenTrial) -> None:
        try:
            job = self._folder_of(trial)
        except TrialRefused:
            return
        self._in_flight[job.name] = trial.number
        if record.is_complete(job):
            await self._tell(job.name, Outcome.COMPLETE, "")
        else:
            scheduler.add(job)

    async def _settle(self, scheduler: Scheduler) -> None:
        """Tell the study what became of jobs that ended; interrupted ones stay RUNNING."""
        outcomes = scheduler.summary.outcomes
        for name in list(self._in_flight):
            outcome = outcomes.get(name)
            if outcome in (Outcome.COMPLETE, Outcome.ALREADY_COMPLETE, Outcome.FAILED,
                           Outcome.INVALID):
                await self._tell(name, outcome, scheduler.summary.reasons.get(name, ""))
            elif outcome in (Outcome.NOT_RUN, Outcome.ELSEWHERE):
                self._in_flight.pop(name)  # the next search (or the other process) ends it


async def run_search(finder: Search, scheduler: Scheduler, slots: int) -> None:
    """Run the scheduler, held open, beside the search that feeds it.

    A lone error of either (no model number free, a trial folder that cannot be
    written) comes out as itself, not wrapped in the task group's ExceptionGroup.
    """
    async def run() -> None:
        try:
            await scheduler.execute()
        finally:
            finder.stop()

    scheduler.hold_open()
    try:
        await finder.resume(scheduler)
        async with anyio.create_task_group() as tg:
            tg.start_soon(run)
            await finder.drive(scheduler, slots)
    except BaseExceptionGroup as group:
        found = leaves(group)
        if len(found) == 1 and isinstance(found[0], Exception):
            raise found[0] from None
        raise
    try:
        path = await anyio.to_thread.run_sync(finder.write_ranking)
        if path is not None:
            log.info("ranking of the trials in %s", printable(str(path)))
    except OSError as exc:  # the search's work is in the study: only the ranking is lost
        log.warning("the ranking could not be written: %s", exc)
