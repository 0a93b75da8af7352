"""Review 9: `sweep`, `match`, `search` and `report` against careless or hostile input.

Each test failed before its fix (see /work/notes/review9.md, probes in
/work/notes/probes9/)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import h5py
import numpy as np
import pytest
from optuna.trial import TrialState
from PIL import Image
from typer.testing import CliRunner, Result

from gibatch import match, match_settings, report, search
from gibatch import sweep as sweep_module
from gibatch.cli import app
from gibatch.jobs import Job, job_files, load_sweep
from tests.conftest import BASE_JOB, tiny_job_files, write_job
from tests.test_search import MASS, THETA, tiny_search

# -- search: one study's trials are its own


def _ask(finder: search.Search) -> tuple[dict[str, object], dict[str, object]]:
    """A new trial's parameters, and the values its job folder holds."""
    job, number = finder._ask()
    trial = finder.study.get_trials(deepcopy=False)[number]
    return dict(trial.params), dict(search.job_values(job_files(job), finder.dims) or {})


@pytest.fixture
def found(tmp_path: Path) -> Path:
    jobs = tmp_path / "found"
    (jobs / ".gibatch").mkdir(parents=True)
    return jobs


def test_a_second_target_in_one_folder_never_takes_the_first_ones_trials(
        tmp_path: Path, found: Path) -> None:
    """A new target (here the centres given again) is a new study, numbered from 0: its
    trial 0 was the old study's folder `search-0000`, and it told the score of that
    folder's parameters for the ones it asked."""
    base, dims, target = tiny_search(tmp_path, THETA + MASS)
    first = search.Search(found, base, dims, target, match_settings.Settings(), 4, seed=1)
    try:
        asked, held = _ask(first)
        assert asked == held
    finally:
        first.close()
    other = match.load_target(tmp_path / "t.png", match_settings.parse_centres("13,12,40,30"))
    second = search.Search(found, base, dims, other, match_settings.Settings(), 4, seed=2)
    try:
        asked, held = _ask(second)
        assert asked == held
        assert (found / "search-0001").is_dir()
    finally:
        second.close()
    again = search.Search(found, base, dims, other, match_settings.Settings(), 4, seed=2)
    try:  # resumed, the second study keeps its numbering
        assert again.first == 1 and again._job_of(
            again.study.get_trials(deepcopy=False)[0]).name == "search-0001"
    finally:
        again.close()


@pytest.mark.parametrize("settings", [
    match_settings.Settings(metric=match_settings.Metric.IOU),
    match_settings.Settings(views=6), match_settings.Settings(kpc_per_px=(0.5, 2.0))])
def test_another_scoring_is_another_study(tmp_path: Path, found: Path,
                                          settings: match_settings.Settings) -> None:
    """Resumed with --metric iou, the study of SSIM scores was told IoU values."""
    base, dims, target = tiny_search(tmp_path, THETA)
    names = []
    for how in (match_settings.Settings(), settings, match_settings.Settings()):
        finder = search.Search(found, base, dims, target, how, 4, seed=1)
        names.append(finder.study.study_name)
        finder.close()
    assert names[0] != names[1] and names[0] == names[2]
    assert names[0] == f"{target.key}-{search.space_key(dims)}"  # as before: resumable


def test_a_folder_that_holds_other_values_is_not_taken_for_the_trial(
        tmp_path: Path, found: Path) -> None:
    base, dims, target = tiny_search(tmp_path, THETA)
    write_job(found, "search-0000", tiny_job_files(**{"merge.json": {"theta_galaxy_2": 7}}))
    finder = search.Search(found, base, dims, target, match_settings.Settings(), 4, seed=1)
    try:
        assert finder.first == 1  # past the folder already there
        finder.first = 0  # as a study begun before the numbering was kept
        with pytest.raises(search.SearchError, match=r"search-0000: holds "
                           r"merge.theta_galaxy_2 = 7, but it is trial 0's folder"):
            finder._ask()
    finally:
        finder.close()


# -- match: one job's unusable snapshots are that job's problem


def _rewrite_snapshots(job: Path, mutate: Callable[[dict[str, np.ndarray]], None]) -> None:
    """JOB's snapshots.h5 with `mutate` applied, vouched for by its completion record (as
    when a site served such a file)."""
    path = job / "output" / match.SNAPSHOT_SECTION / match.SNAPSHOT_FILE
    with h5py.File(path, "r") as f:
        data = {k: np.asarray(f[k][()]) for k in f}
    mutate(data)
    path.unlink()
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            f[k] = v
    record = job / "output" / ".gibatch-complete.json"
    rec = json.loads(record.read_text())
    body = path.read_bytes()
    for entry in rec["sections"][match.SNAPSHOT_SECTION]:
        if entry["name"] == match.SNAPSHOT_FILE:
            entry["size"], entry["sha256"] = len(body), hashlib.sha256(body).hexdigest()
    record.write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def complete(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three complete jobs (run once), copied by `sweep`."""
    from gibatch.run import Outcome
    from gibatch.sim.app import SiteConfig
    from gibatch.sim.server import ThreadedSite
    from tests.conftest import run_sweep
    from tests.test_match import small_job

    root = tmp_path_factory.mktemp("companions")
    for theta in (0, 45, 90):
        write_job(root / "jobs", f"theta-{theta}", small_job(theta))
    site = ThreadedSite(SiteConfig(data_dir=root / "site", accounts={"alice": "pw"},
                                   workers=2))
    try:
        summary = run_sweep(site, root / "jobs", [1, 2])
    finally:
        site.stop()
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
    return root / "jobs"


@pytest.fixture
def sweep(complete: Path, tmp_path: Path) -> Path:
    shutil.copytree(complete, tmp_path / "jobs")
    shutil.rmtree(tmp_path / "jobs" / ".gibatch" / "match", ignore_errors=True)
    return tmp_path / "jobs"


@pytest.fixture
def target(tmp_path: Path) -> tuple[Path, str]:
    """A target of two blobs, and its --centres."""
    pixels = np.zeros((60, 80), np.uint8)
    pixels[15:25, 15:25] = 200
    pixels[30:40, 50:60] = 150
    Image.fromarray(pixels).save(tmp_path / "target.png")
    return tmp_path / "target.png", "20,20,55,35"


def _match(jobs: Path, target: Path, centres: str, *more: str) -> Result:
    return CliRunner().invoke(app, ["match", "--jobs", str(jobs), "--target", str(target),
                                    "--centres", centres, *more])


def _drop_component(d: dict[str, np.ndarray]) -> None:
    del d["component"]


def _two_frames_of_positions(d: dict[str, np.ndarray]) -> None:
    d["position"] = d["position"][:2]


def _stars_gone_to_nan(d: dict[str, np.ndarray]) -> None:
    d["position"] = np.full_like(d["position"], np.nan)
    del d["centres"]


@pytest.mark.slow
@pytest.mark.parametrize("mutate", [_drop_component, _two_frames_of_positions,
                                    _stars_gone_to_nan])
@pytest.mark.parametrize("workers", ["1", "2"])
def test_one_unusable_snapshot_file_costs_its_job_only(
        sweep: Path, target: tuple[Path, str], mutate: Callable[[dict[str, np.ndarray]], None],
        workers: str) -> None:
    """A missing dataset or frames that disagree ended the whole match (and search) in a
    traceback; stars gone to NaN were scored as a blank render (SSIM 0.79, scale nan)."""
    _rewrite_snapshots(sweep / "theta-45", mutate)
    result = _match(sweep, *target, "--workers", workers)
    assert result.exit_code == 0, (result.output, repr(result.exception))
    assert "2 jobs scored, 1 not" in result.output
    ranking = (sweep / ".gibatch" / "match" / "ranking.csv").read_text()
    line = next(r for r in ranking.splitlines() if ",theta-45," in r)
    assert line.startswith(",")  # unranked
    if mutate is _stars_gone_to_nan:
        assert ",no usable frame," in line
    else:
        assert "unusable snapshots: snapshots.h5: " in line, line


@pytest.mark.slow
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_float_target_with_undefined_pixels_ranks_by_the_others(
        sweep: Path, tmp_path: Path, bad: float) -> None:
    """A float TIFF with a blanked strip made every job's score NaN: the median, hence
    the whole normalised target, was NaN; "3 jobs scored", ranked in any order."""
    pixels = np.zeros((60, 80), np.float32)
    pixels[15:25, 15:25] = 200
    pixels[30:40, 50:60] = 150
    pixels[0:3] = bad
    Image.fromarray(pixels, mode="F").save(tmp_path / "blanked.tif")
    result = _match(sweep, tmp_path / "blanked.tif", "20,20,55,35", "--workers", "1")
    assert result.exit_code == 0, (result.output, repr(result.exception))
    rows = (sweep / ".gibatch" / "match" / "ranking.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and not any("nan" in row for row in rows), rows
    pixels[:] = np.nan
    Image.fromarray(pixels, mode="F").save(tmp_path / "blank.tif")
    with pytest.raises(match_settings.MatchError, match="no pixel of the image has a value"):
        match.load_target(tmp_path / "blank.tif", match_settings.parse_centres("20,20,55,35"))


def _score(frame: int, value: float, view: str = "x-y", mirror: bool = False) -> match.Score:
    return match.Score(frame, 0.1 * frame, view, mirror, value, 0.5, 1.5, 1.0, 0.0, 1.0, 1.0)


def test_the_ranking_is_a_function_of_the_scores() -> None:
    """Ties came in the order the pool finished the jobs; a NaN first in the list was a
    job's best (max() never replaces NaN) and sorted anywhere among the jobs."""
    a, b, c = (match.Result(name, _score(0, v)) for name, v in (("a", .5), ("b", .5), ("c", .9)))
    orders = {tuple(r.job for r in match.rank(list(p), match_settings.Metric.SSIM))
              for p in ([a, b, c], [b, c, a], [c, b, a])}
    assert orders == {("c", "a", "b")}
    nan = match.Result("n", _score(0, math.nan))
    assert [r.job for r in match.rank([nan, a, c], match_settings.Metric.SSIM)] == ["c", "a", "n"]
    best = match.best_of([_score(0, math.nan), _score(1, 0.4)], match_settings.Metric.SSIM)
    assert best is not None and best.frame == 1
    assert match.best_of([_score(0, math.nan)], match_settings.Metric.SSIM) is None
    ties = [_score(7, .5), _score(2, .5, "y-z", True), _score(2, .5, "x-z"), _score(2, .5, "y-z")]
    for order in (ties, ties[::-1]):
        best = match.best_of(order, match_settings.Metric.SSIM)
        assert best is not None and (best.frame, best.view, best.mirror) == (2, "x-z", False)


# -- what match leaves for report: whole, of one run, of this target and these results


def _other_target(tmp_path: Path) -> Path:
    pixels = np.zeros((50, 50), np.uint8)
    pixels[5:15, 5:15] = 255
    pixels[30:45, 30:45] = 120
    Image.fromarray(pixels).save(tmp_path / "other.png")
    return tmp_path / "other.png"


@pytest.mark.slow
def test_a_kill_between_ranking_and_settings_never_pairs_them(
        sweep: Path, target: tuple[Path, str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ranking.csv was renamed into place, then match.json written in place: a kill in
    between left the new ranking beside the old target, and the report rendered the
    new ranking's jobs against the old target under its name."""
    assert _match(sweep, *target).exit_code == 0
    assert report.load_ranking(sweep) is not None
    replace = os.replace

    def killed(src: str | Path, dest: str | Path) -> None:
        if Path(dest).name == match_settings.SETTINGS_FILE:
            raise KeyboardInterrupt  # the kill, as the settings are renamed into place
        replace(src, dest)

    goal = match.load_target(_other_target(tmp_path), match_settings.parse_centres("10,10,37,37"))
    results = match.match_jobs(sweep, load_sweep(sweep).jobs, goal, match_settings.Settings(),
                               workers=1)
    monkeypatch.setattr(match.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        match.write_results(sweep, results, goal, match_settings.Settings())
    monkeypatch.undo()
    assert report.load_ranking(sweep) is None
    assert sorted(p.name for p in match_settings.match_dir(sweep).iterdir()) == [
        match_settings.SETTINGS_FILE, match_settings.RANKING_FILE, "scores.db"]
    match.write_results(sweep, results, goal, match_settings.Settings())
    shown = report.load_ranking(sweep)
    assert shown is not None and shown.target.path.name == "other.png"


@pytest.mark.slow
def test_a_target_changed_since_the_ranking_is_not_shown_beside_it(
        sweep: Path, target: tuple[Path, str]) -> None:
    assert _match(sweep, *target).exit_code == 0
    pixels = np.asarray(Image.open(target[0])).copy()
    pixels[45:55, 5:15] = 255  # the image edited after matching
    Image.fromarray(pixels).save(target[0])
    assert report.load_ranking(sweep) is None


@pytest.mark.slow
def test_a_ranking_older_than_a_jobs_results_is_no_traceback(
        sweep: Path, target: tuple[Path, str]) -> None:
    """A ranking naming a frame the job's snapshots no longer have (the job rerun with
    fewer frames) ended the report in an IndexError traceback."""
    assert _match(sweep, *target).exit_code == 0
    folder = match_settings.match_dir(sweep)
    first = next(csv.DictReader(io.StringIO((folder / "ranking.csv").read_text())))
    _rewrite_snapshots(sweep / first["job"], lambda d: None)  # results of another run
    made = CliRunner().invoke(app, ["report", "--jobs", str(sweep)])
    assert made.exit_code == 0, (made.output, repr(made.exception))
    page = (sweep / "report.html").read_text()
    assert "Match against target.png" in page and f"1. {first['job']}: score" not in page
    # a ranking written before the rows named their snapshots: the frame is checked
    rows = list(csv.reader(io.StringIO((folder / "ranking.csv").read_text())))
    for row in rows[1:]:
        row[7], row[15] = "39", ""
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    (folder / "ranking.csv").write_text(out.getvalue())
    meta = json.loads((folder / "match.json").read_text())
    del meta[match.RANKING_DIGEST]
    (folder / "match.json").write_text(json.dumps(meta))
    made = CliRunner().invoke(app, ["report", "--jobs", str(sweep)])
    assert made.exit_code == 0, (made.output, repr(made.exception))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_match_within_a_job_per_worker(sweep: Path, target: tuple[Path, str]
                                                    ) -> None:
    """The pool's exit waited for every job still queued (the workers ignore SIGINT):
    Ctrl-C stopped `gibatch match` only when the whole sweep was scored. Judged by the
    jobs scored (the cache keeps each as it comes), not by times, which a busy machine
    stretches unevenly."""
    for k in range(24):  # copies of a complete job are complete jobs
        shutil.copytree(sweep / "theta-45", sweep / f"copy-{k}")
    args = [sys.executable, "-m", "gibatch", "match", "--jobs", str(sweep), "--target",
            str(target[0]), "--centres", target[1], "--workers", "2", "--views", "360",
            "--coarse-frames", "0"]
    scores = match_settings.match_dir(sweep) / "scores.db"

    def scored() -> int:
        if not scores.exists():
            return 0
        with contextlib.closing(sqlite3.connect(f"file:{scores}?mode=ro", uri=True,
                                                timeout=10)) as db:
            try:
                return int(db.execute("SELECT COUNT(DISTINCT job) FROM scores").fetchone()[0])
            except sqlite3.OperationalError:  # the table is not made yet
                return 0

    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 200
        seen: dict[int, float] = {}  # jobs scored -> when first seen
        while len(seen) < 2 or max(seen) < 3:  # the pool's pace, 24 jobs still to come
            assert proc.poll() is None and time.monotonic() < deadline
            seen.setdefault(scored(), time.monotonic())
            time.sleep(0.05)
        first = min(k for k in seen if k > 0)
        pace = (max(seen) - first) / (seen[max(seen)] - seen[first])  # jobs a second
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=200)
        stopped = time.monotonic() - sent
    finally:
        proc.kill()
    # Left to finish: the jobs running and the one queued to each worker, and the exit
    # (3-7 jobs' time at the pool's own pace, measured in this run); waiting for the
    # queue took 29.
    assert stopped * pace < 14, f"Ctrl-C took {stopped:.1f} s at {pace:.2f} jobs a second"


@pytest.mark.parametrize("blur", ["100000", "33", "nan", "-1"])
def test_a_blur_out_of_bounds_is_refused_at_once(tmp_path: Path, target: tuple[Path, str],
                                                 blur: str) -> None:
    """`--blur 1e5` (a slip for 1.5) filtered the target and every render with an
    800,001-tap kernel: match ran for hours before scoring anything."""
    write_job(tmp_path / "jobs", "a", tiny_job_files())
    start = time.monotonic()
    result = _match(tmp_path / "jobs", *target, "--blur", blur)
    assert result.exit_code == 2, (result.output, repr(result.exception))
    assert "--blur" in result.output and "from 0 to 32" in result.output
    assert time.monotonic() - start < 10


# -- search: the study's journal after an abrupt end


def _search(tmp_path: Path, found: Path) -> search.Search:
    if not (tmp_path / "base").exists():
        tiny_search(tmp_path, THETA)
    base = sweep_module.read_base(tmp_path / "base")
    dims = search.load_space(tmp_path / "space.toml", base)
    goal = match.load_target(tmp_path / "t.png", match_settings.parse_centres("12,12,40,30"))
    return search.Search(found, base, dims, goal, match_settings.Settings(), 8, seed=1)


def test_a_cut_last_line_of_the_study_is_dropped_not_built_upon(
        tmp_path: Path, found: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Optuna skips a cut last line, but appended the next line straight after it:
    one undecodable line in the middle, and every later read raised JSONDecodeError."""
    finder = _search(tmp_path, found)
    finder._ask()
    finder.close()
    journal = found / ".gibatch" / search.SEARCH_DIR / search.STUDY_FILE
    whole = journal.read_bytes()
    with journal.open("ab") as f:
        f.write(b'{"op_code":5,"worker_id":"x","trial_id":0,"par')  # the disk filled
    for _ in range(2):
        finder = _search(tmp_path, found)
        try:
            finder._ask()
        finally:
            finder.close()
    assert journal.read_bytes().startswith(whole)
    assert "its last line was cut short" in caplog.text
    finder = _search(tmp_path, found)
    try:
        assert [t.number for t in finder.study.get_trials()] == [0, 1, 2]
    finally:
        finder.close()


@pytest.mark.timeout(60)
def test_optunas_lock_left_by_a_kill_does_not_stall_the_next_search(
        tmp_path: Path, found: Path) -> None:
    """A kill -9 inside an append (it fsyncs) left Optuna's symlink lock: the next
    search waited its 30 s grace period before the first trial."""
    _search(tmp_path, found).close()
    journal = found / ".gibatch" / search.SEARCH_DIR / search.STUDY_FILE
    os.symlink(journal, f"{journal}.lock")
    start = time.monotonic()
    finder = _search(tmp_path, found)
    try:
        finder._ask()
    finally:
        finder.close()
    assert time.monotonic() - start < 10


# -- sweep


def test_random_over_an_integer_key_whose_range_holds_no_integer(tmp_path: Path) -> None:
    """random.randint(5, 4) raised a ValueError traceback."""
    result = CliRunner().invoke(app, ["sweep", str(BASE_JOB), "--out", str(tmp_path / "o"),
                                      "--vary", "interact.nFrames=4.2:4.8", "--random", "2"])
    assert result.exit_code == 2, (result.output, repr(result.exception))
    assert "--vary interact.nFrames=4.2:4.8: interact.nFrames is an integer in the base " \
           "job, and this range holds none" in result.output
    assert not (tmp_path / "o").exists()
    made = CliRunner().invoke(app, ["sweep", str(BASE_JOB), "--out", str(tmp_path / "o"),
                                    "--vary", "interact.nFrames=4.2:5.8", "--random", "2"])
    assert made.exit_code == 0, made.output


def test_a_target_of_too_many_pixels_is_refused_from_its_header(tmp_path: Path) -> None:
    """A 0.7 MB PNG of 13000x13000 pixels (under twice Pillow's bomb limit: only a
    warning) was decoded whole and copied: 1.4 GB and 10 s before any answer."""
    Image.new("1", (13000, 13000), 0).save(tmp_path / "big.png")
    start = time.monotonic()
    with pytest.raises(match_settings.MatchError, match=r"big.png: more pixels than a "
                       r"target needs \(at most 89478485\); crop or bin the image"):
        match.load_target(tmp_path / "big.png", ((100.0, 100.0), (5000.0, 5000.0)))
    assert time.monotonic() - start < 5


@pytest.mark.slow
def test_a_job_whose_name_is_not_utf8_is_ranked_and_shown(
        sweep: Path, target: tuple[Path, str]) -> None:
    """The score cache bound the name as SQLite text, which refuses its surrogates: a
    UnicodeEncodeError traceback ended the match (then: the job left unranked)."""
    odd = os.fsdecode(os.fsencode(sweep) + b"/odd\xff")
    os.rename(sweep / "theta-90", odd)
    for _ in range(2):  # scored, then from the cache
        result = _match(sweep, *target, "--workers", "1")
        assert result.exit_code == 0, (result.output, repr(result.exception))
        assert "3 jobs scored" in result.output
    shown = report.load_ranking(sweep)
    assert shown is not None and "odd\udcff" in shown.scores


class _Queue:
    """What `Search.resume` needs of a scheduler: somewhere to add jobs."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def add(self, job: Job) -> None:
        self.added.append(job.name)


def test_a_trial_whose_values_make_no_valid_job_fails_and_the_search_goes_on(
        tmp_path: Path, found: Path) -> None:
    """plot1.x_min up to 150 beside the base's x_max of 100: the first trial past it
    raised SearchError out of the search (exit 1), left RUNNING with no folder, and
    every rerun died resuming it."""
    base, dims, target = tiny_search(tmp_path, '"plot1.x_min" = {low = -150, high = 150}\n')
    finder = search.Search(found, base, dims, target, match_settings.Settings(), 12, seed=3)
    try:
        refused = 0
        for _ in range(8):
            try:
                finder._ask()
            except search.TrialRefused as exc:
                assert "plot1.json" in str(exc) and "search-job-" not in str(exc)
                refused += 1
        states = [t.state for t in finder.study.get_trials()]
        assert refused and states.count(TrialState.FAIL) == refused
        assert states.count(TrialState.RUNNING) == 8 - refused
        # a kill after asking such a trial, before its folder was written
        finder.study.enqueue_trial({"plot1.x_min": 120.0})
        killed = finder.study.ask({d.key: d.distribution for d in dims}).number
    finally:
        finder.close()
    again = search.Search(found, base, dims, target, match_settings.Settings(), 12, seed=3)
    try:
        queue = _Queue()
        anyio.run(again.resume, queue)
        assert again.study.get_trials()[killed].state is TrialState.FAIL
        assert len(queue.added) == 8 - refused
    finally:
        again.close()


@pytest.mark.parametrize("damage", ["line", "folder"])
def test_a_study_that_cannot_be_read_is_one_line(tmp_path: Path, damage: str) -> None:
    """A line damaged in the middle of study.log, or a folder in its place: a
    JSONDecodeError or IsADirectoryError traceback."""
    tiny_search(tmp_path, THETA)
    journal = tmp_path / "found" / ".gibatch" / search.SEARCH_DIR / search.STUDY_FILE
    journal.parent.mkdir(parents=True)
    if damage == "line":
        journal.write_text('{"op_code":0,"worker_id":"w","study_name":"x","directions":[1]}\n'
                           '{"op_code": garbage\n'
                           '{"op_code":0,"worker_id":"w","study_name":"y","directions":[1]}\n')
    else:
        journal.mkdir()
    result = CliRunner().invoke(app, [
        "search", "--jobs", str(tmp_path / "found"), "--base", str(tmp_path / "base"),
        "--space", str(tmp_path / "space.toml"), "--target", str(tmp_path / "t.png"),
        "--centres", "12,12,40,30", "--budget", "2", "--models", "1"])
    assert result.exit_code == 2, (result.output, repr(result.exception))
    assert f"{journal}: the study cannot be read (" in result.output
    assert "move it away to start the search anew" in result.output


@pytest.mark.parametrize("space", [
    '"orbit.distance" = {low = 0.3, high = 3}\n"orbit.elevation" = {low = -89.9, high = 89.9}\n',
    '"orbit.speed" = {low = 0.01, high = 3}\n"orbit.approach" = {low = 0, high = 90}\n'
    '"orbit.azimuth" = {low = -180, high = 180}\n"orbit.distance" = {low = 0.01, high = 5}\n'])
def test_a_trials_own_folder_holds_its_orbit_whatever_the_rounding(
        tmp_path: Path, found: Path, space: str) -> None:
    """Orbit keys are written as a position and velocity rounded to 1e-4, and read back
    an angle may move far (at a small distance or speed): the folder is still the
    trial's, as on resuming."""
    base, dims, target = tiny_search(tmp_path, space)
    finder = search.Search(found, base, dims, target, match_settings.Settings(), 30, seed=4)
    try:
        for _ in range(30):
            job, number = finder._ask()
            assert finder._job_of(finder.study.get_trials(deepcopy=False)[number]) == job
    finally:
        finder.close()


def test_a_folder_of_another_orbit_is_not_taken_for_the_trial(tmp_path: Path,
                                                              found: Path) -> None:
    base, dims, target = tiny_search(tmp_path, '"orbit.distance" = {low = 200, high = 300}\n')
    write_job(found, "search-0000", tiny_job_files())  # galaxy 2 at 104 kpc
    finder = search.Search(found, base, dims, target, match_settings.Settings(), 4, seed=1)
    try:
        finder.first = 0  # as a study begun before the numbering was kept
        with pytest.raises(search.SearchError, match=r"search-0000: holds orbit.distance = "
                           r"104.40\d*, but it is trial 0.s folder"):
            finder._ask()
    finally:
        finder.close()


@pytest.mark.parametrize("varies", [
    ["merge.theta_galaxy_2=0,30", "merge.theta_galaxy_2=60,90"],
    ["orbit.distance=100,200", "merge.position_galaxy_2.x=50,80"],
    ["merge.velocity_galaxy_2.vx=1,2", "orbit.speed=100,200"]])
@pytest.mark.parametrize("mode", [[], ["--zip"], ["--random", "3"]])
def test_keys_that_overwrite_each_other_are_a_usage_error(
        tmp_path: Path, varies: list[str], mode: list[str]) -> None:
    """A key varied twice kept only its second list (4 jobs, 2 pairs of duplicates);
    orbit.* overwrote merge.position_galaxy_2.x's values (duplicates again)."""
    args = ["sweep", str(BASE_JOB), "--out", str(tmp_path / "o"), *mode]
    for v in varies:
        args += ["--vary", v]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert ("given twice" in result.output) != ("orbit.* keys set galaxy 2's position and "
                                                "velocity whole" in result.output)
    assert not (tmp_path / "o").exists()


def test_a_space_of_keys_that_overwrite_each_other_is_refused(tmp_path: Path) -> None:
    """The pair passed, and the position's dimension changed no trial: the study
    searched a parameter that did nothing."""
    (tmp_path / "space.toml").write_text('"orbit.distance" = {low = 100, high = 200}\n'
                                         '"merge.position_galaxy_2.x" = {low = 50, high = 80}\n')
    with pytest.raises(search.SearchError, match=r"--space: merge.position_galaxy_2.x: "
                       r"orbit.\* keys set galaxy 2's position and velocity whole"):
        search.load_space(tmp_path / "space.toml", sweep_module.read_base(BASE_JOB))


def test_a_typo_in_a_key_leaves_no_folder_behind(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sweep", str(BASE_JOB), "--out", str(tmp_path / "o"),
                                      "--vary", "merge.theta_galaxy_3=1,2"])
    assert result.exit_code == 2 and "theta_galaxy_3" in result.output
    assert not (tmp_path / "o").exists()


def _fits(cards: list[tuple[str, str]], image: np.ndarray) -> bytes:
    text = "".join(f"{k:<8}= {v:>20}".ljust(80) for k, v in cards) + "END".ljust(80)
    data = image[::-1].astype(">i2").tobytes()
    return (text.ljust(-(-len(text) // 2880) * 2880).encode() + data
            + b"\0" * (-len(data) % 2880))


@pytest.mark.parametrize(("cards", "error"), [
    ([("BSCALE", "2.0D0"), ("BZERO", "1.0d+01")], None),
    ([("BLANK", "'none'")], "BLANK = 'none' is not a number"),
    ([("BSCALE", "'x'")], "BSCALE = 'x' is not a number"),
    ([("BZERO", "1.0D999")], "BZERO = '1.0D999' is not a finite number")])
def test_a_fits_targets_scaling_cards_are_read_or_named(
        tmp_path: Path, cards: list[tuple[str, str]], error: str | None) -> None:
    """A Fortran exponent (the standard's for doubles), or text where BSCALE, BZERO or
    BLANK belong, ended match in a ValueError traceback."""
    image = np.zeros((40, 50))
    image[5:15, 5:15] = 300
    image[20:30, 30:40] = 200
    (tmp_path / "t.fits").write_bytes(_fits(
        [("SIMPLE", "T"), ("BITPIX", "16"), ("NAXIS", "2"), ("NAXIS1", "50"), ("NAXIS2", "40"),
         *cards], image))
    if error is None:
        assert match.read_fits((tmp_path / "t.fits").read_bytes()).max() == 610
        return
    with pytest.raises(match_settings.MatchError, match=rf"t.fits: not a FITS image gibatch "
                       rf"can read: HDU 0: {re.escape(error)}"):
        match.load_target(tmp_path / "t.fits", ((10.0, 30.0), (35.0, 15.0)))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("card", [("NAXIS1", "-2880"), ("PCOUNT", "-5760"), ("GCOUNT", "-1")])
def test_a_negative_fits_size_is_refused_not_walked_back_for_ever(
        tmp_path: Path, card: tuple[str, str]) -> None:
    """NAXIS1 = -2880 made the HDU's data -2880 bytes long: the next HDU was read where
    the first began, and match looped for ever on a 5 KB file."""
    cards = [("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "2"), ("NAXIS1", "1"),
             ("NAXIS2", "1"), ("PCOUNT", "0"), ("GCOUNT", "1")]
    cards = [card if key == card[0] else (key, value) for key, value in cards]
    text = "".join(f"{k:<8}= {v:>20}".ljust(80) for k, v in cards) + "END".ljust(80)
    (tmp_path / "t.fits").write_bytes(text.ljust(2880).encode() + b"\0" * 2880)
    with pytest.raises(match_settings.MatchError, match="HDU 0: a negative NAXISn, PCOUNT "
                       "or GCOUNT"):
        match.load_target(tmp_path / "t.fits", ((10.0, 30.0), (35.0, 15.0)))


_PEAK = """
import resource, sys
from pathlib import Path
from gibatch import match
match.load_target(Path(sys.argv[1]), ((150.0, 9850.0), (5050.0, 4950.0)))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_small_fits_file_of_many_pixels_costs_one_copy_of_them(tmp_path: Path) -> None:
    """A 98 KB .fits.gz of 10,000 x 10,000 pixels (the most a FITS target may have) was
    converted to float64 three times over: 2.5 GB and 8 s; now float32 in place."""
    cards = [("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "2"), ("NAXIS1", "10000"),
             ("NAXIS2", "10000"), ("BSCALE", "2.0"), ("BZERO", "1.0")]
    text = "".join(f"{k:<8}= {v:>20}".ljust(80) for k, v in cards) + "END".ljust(80)
    pixels = np.zeros((10000, 10000), np.uint8)
    pixels[100:200, 100:200] = 200
    pixels[5000:5100, 5000:5100] = 150
    with gzip.open(tmp_path / "big.fits.gz", "wb", compresslevel=1) as f:
        f.write(text.ljust(2880).encode())
        f.write(pixels.tobytes())
        f.write(b"\0" * (-pixels.size % 2880))
    del pixels
    done = subprocess.run([sys.executable, "-c", _PEAK, str(tmp_path / "big.fits.gz")],
                          capture_output=True, text=True, timeout=100, cwd=Path.cwd())
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 1300, f"{done.stdout.strip()} MB at the peak"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_search_leaves_its_ranking_for_the_report(tmp_path: Path) -> None:
    """match_settings and report said a search leaves a ranking the report shows; none
    was ever written, so a search's report had no match section."""
    from tests.test_match import small_job

    write_job(tmp_path, "base", small_job(0))
    (tmp_path / "space.toml").write_text(THETA)
    pixels = np.zeros((60, 80), np.uint8)
    pixels[15:25, 15:25] = 200
    pixels[30:40, 50:60] = 150
    Image.fromarray(pixels).save(tmp_path / "target.png")
    found = tmp_path / "found"
    result = CliRunner().invoke(app, [
        "search", "--jobs", str(found), "--base", str(tmp_path / "base"), "--space",
        str(tmp_path / "space.toml"), "--target", str(tmp_path / "target.png"), "--centres",
        "20,20,55,35", "--budget", "2", "--models", "1", "--seed", "1"])
    assert result.exit_code == 0, (result.output, repr(result.exception))
    shown = report.load_ranking(found)
    assert shown is not None and set(shown.scores) == {"search-0000", "search-0001"}


def test_a_search_with_no_score_yet_keeps_the_ranking_there(tmp_path: Path, found: Path) -> None:
    base, dims, target = tiny_search(tmp_path, THETA)
    folder = match_settings.match_dir(found)
    folder.mkdir(parents=True)
    (folder / match_settings.RANKING_FILE).write_text("a ranking of gibatch match\n")
    finder = search.Search(found, base, dims, target, match_settings.Settings(), 4, seed=1)
    try:
        assert finder.write_ranking() is None
        finder._ask()  # a trial whose job never completed (failed, say): no score either
        assert finder.write_ranking() is None
    finally:
        finder.close()
    assert (folder / match_settings.RANKING_FILE).read_text() == "a ranking of gibatch match\n"


def test_a_target_in_a_mode_with_no_brightness_is_one_line(tmp_path: Path) -> None:
    """A LAB TIFF: Pillow cannot convert LAB to L, and the ValueError was a traceback."""
    pixels = np.zeros((60, 80), np.uint8)
    pixels[15:25, 15:25] = 200
    Image.fromarray(pixels).convert("LAB").save(tmp_path / "lab.tif")
    with pytest.raises(match_settings.MatchError, match=r"lab.tif: an image in mode LAB, "
                       r"which has no brightness gibatch can read; save it as greyscale"):
        match.load_target(tmp_path / "lab.tif", match_settings.parse_centres("20,20,55,35"))
    Image.fromarray(pixels).convert("RGBA").save(tmp_path / "rgba.png")  # read as it is
    match.load_target(tmp_path / "rgba.png", match_settings.parse_centres("20,20,55,35"))


def test_a_search_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """A file named JOBS/.gibatch/search: a FileExistsError traceback."""
    tiny_search(tmp_path, THETA)
    (tmp_path / "found" / ".gibatch").mkdir(parents=True)
    (tmp_path / "found" / ".gibatch" / search.SEARCH_DIR).write_text("")
    result = CliRunner().invoke(app, [
        "search", "--jobs", str(tmp_path / "found"), "--base", str(tmp_path / "base"),
        "--space", str(tmp_path / "space.toml"), "--target", str(tmp_path / "t.png"),
        "--centres", "12,12,40,30", "--budget", "2", "--models", "1"])
    assert result.exit_code == 2, (result.output, repr(result.exception))
    assert ".gibatch/search: cannot keep the study there: File exists" in result.output


def test_a_space_key_given_twice_is_refused(tmp_path: Path) -> None:
    """"merge.theta_galaxy_2" quoted and theta_galaxy_2 under [merge] are one key: the
    last range silently won (0-90 searched where 0-9 was written first)."""
    (tmp_path / "space.toml").write_text('"merge.theta_galaxy_2" = {low = 0, high = 9}\n'
                                         '[merge]\ntheta_galaxy_2 = {low = 0, high = 90}\n')
    with pytest.raises(search.SearchError, match=r"merge.theta_galaxy_2: given twice"):
        search.load_space(tmp_path / "space.toml", sweep_module.read_base(BASE_JOB))


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_a_seed_numpy_refuses_is_a_usage_error(tmp_path: Path, seed: str) -> None:
    """A new study's sampler takes --seed as it is: numpy's 'Seed must be between 0 and
    2**32 - 1' was a ValueError traceback."""
    tiny_search(tmp_path, THETA)
    result = CliRunner().invoke(app, [
        "search", "--jobs", str(tmp_path / "found"), "--base", str(tmp_path / "base"),
        "--space", str(tmp_path / "space.toml"), "--target", str(tmp_path / "t.png"),
        "--centres", "12,12,40,30", "--budget", "2", "--models", "1", "--seed", seed])
    assert result.exit_code == 2, (result.output, repr(result.exception))
    assert f"--seed {seed}: must be from 0 to 4294967295" in result.output


@pytest.mark.slow
def test_a_report_of_undecodable_names_is_written(complete: Path, tmp_path: Path,
                                                  target: tuple[Path, str]) -> None:
    """The sweep folder's own name (the page's title) or a ranked job's (the match
    section's captions) of undecodable bytes: the UTF-8 page could not hold their
    surrogates, and a UnicodeEncodeError ended the report."""
    root = Path(os.fsdecode(os.fsencode(tmp_path) + b"/sweep\xff"))
    shutil.copytree(complete, root)
    shutil.rmtree(root / ".gibatch" / "match", ignore_errors=True)
    os.rename(root / "theta-90", os.fsdecode(os.fsencode(root) + b"/odd\xfe"))
    # In process: the CLI's last lines print the paths (cli.py, see review9.md).
    goal = match.load_target(target[0], match_settings.parse_centres(target[1]))
    jobs = load_sweep(root).jobs
    match.write_results(root, match.match_jobs(root, jobs, goal, match_settings.Settings(),
                                               workers=1), goal, match_settings.Settings())
    from gibatch.journal import Journal
    from gibatch.status import sweep_status

    journal = Journal(root)
    try:
        report.build_report(load_sweep(root), sweep_status(load_sweep(root), journal))
    finally:
        journal.close()
    page = (root / "report.html").read_text(encoding="utf-8")
    assert "<h1>sweep\ufffd</h1>" in page and ". odd\ufffd: score" in page


# -- review 9's three leftovers in the command line (cli.py) -----------------------------------

def test_a_huge_views_count_is_a_usage_error(tmp_path: Path, target: tuple[Path, str]
                                             ) -> None:
    """`--views 100000000` (a slip) built 10^8 directions before any job was scored:
    minutes and gigabytes. Now refused at once, naming the bound."""
    write_job(tmp_path / "jobs", "a", tiny_job_files())
    result = _match(tmp_path / "jobs", *target, "--views", "100000000")
    assert result.exit_code == 2, result.output
    assert "--views 100000000: must be 0 (the plots' axes) to 1000" in result.output


def test_a_match_folder_that_cannot_be_made_is_one_line(
        tmp_path: Path, target: tuple[Path, str]) -> None:
    """JOBS/.gibatch/match a file (or a sweep shared read-only): one line naming it, not
    a FileExistsError traceback before any job is scored."""
    write_job(tmp_path / "jobs", "a", tiny_job_files())
    (tmp_path / "jobs" / ".gibatch").mkdir()
    (tmp_path / "jobs" / ".gibatch" / "match").write_text("")
    result = _match(tmp_path / "jobs", *target)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "cannot keep the match in" in result.output and ".gibatch/match" in result.output


def test_match_and_report_name_a_folder_that_is_not_utf8(
        sweep: Path, tmp_path: Path, target: tuple[Path, str]) -> None:
    """The commands' last lines print the paths of what they wrote: a sweep folder whose
    name is not UTF-8 made them raise UnicodeEncodeError after the work was done."""
    odd = tmp_path / os.fsdecode(b"sweep-\xe9")
    sweep.rename(odd)
    result = _match(odd, *target)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    assert "ranking in" in result.output and "\\udce9" in result.output
    result = CliRunner().invoke(app, ["report", "--jobs", str(odd)])
    assert result.exit_code == 0, repr(result.exception)
    assert "report.html" in result.output and "\\udce9" in result.output
