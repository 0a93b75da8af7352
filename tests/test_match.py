"""`gibatch match`: a target rendered from a known job, then rotated, rescaled and noised
as an observation would be, is found again among its neighbours; mirror and rotation
are recovered; scores come from the cache the second time; bad inputs get one line."""

from __future__ import annotations

import gzip
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from gibatch import match, match_settings
from gibatch.cli import app
from gibatch.jobs import load_sweep
from gibatch.run import Outcome
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from tests.conftest import run_sweep, tiny_job_files, write_job

THETAS = (0, 30, 60, 90)
HIDDEN = "theta-30"
GRID = (100, 120)  # rows, columns of the rendered target
CENTRES = ((40.0, 55.0), (80.0, 45.0))


def small_job(theta: float, mass_2: float = 1.5, disk: int = 300, duration: float = 0.6,
              frames: int = 5) -> dict[str, Any]:
    """Galaxy 2 (tilted by `theta`) passes galaxy 1 prograde: from (100, 0, 0) kpc at
    (-300, 150, 0) km/s, pericentre ~30 kpc at 0.25 Gyr, tails out after, centres 30 kpc
    or more apart in both plot views at every frame. The encounter is pinned here, not
    taken from the example base job, whose orbit changes with the examples. `disk` stars
    (and a fifth as many bulge stars) per galaxy: enough to show a disk's tilt, few
    enough to run in seconds."""
    files = tiny_job_files(**{
        "merge.json": {"theta_galaxy_2": theta,
                       "length_scale": {"galaxy_1": 1, "galaxy_2": 0.8},
                       "position_galaxy_2": {"x": 100, "y": 0, "z": 0},
                       "velocity_galaxy_2": {"vx": -300, "vy": 150, "vz": 0}},
        "interact.json": {"duration": duration, "nFrames": frames, "softening": 1,
                          "mass_1": 15, "mass_2": mass_2}})
    for g in ("galaxy1.json", "galaxy2.json"):
        files[g] = {**files[g], "disk": {**files[g]["disk"], "number_of_particles": disk},
                    "bulge": {"number_of_particles": disk // 5}}
    return files


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Four jobs that differ only in galaxy 2's tilt, run once on a local site."""
    root = tmp_path_factory.mktemp("match")
    jobs = root / "jobs"
    for theta in THETAS:
        write_job(jobs, f"theta-{theta}", small_job(theta))
    site = ThreadedSite(SiteConfig(data_dir=root / "site", accounts={"alice": "pw"}, workers=2))
    try:
        summary = run_sweep(site, jobs, [1, 2])
    finally:
        site.stop()
    assert set(summary.outcomes.values()) == {Outcome.COMPLETE}, summary.reasons
    yield jobs


def render_target(jobs: Path, frame: int, view: str, mirror: bool) -> tuple[np.ndarray, float]:
    """The matcher's own render of the hidden job, and the rotation its transform used."""
    job = next(j for j in load_sweep(jobs).jobs if j.name == HIDDEN)
    snaps = match.load_snapshots(match.snapshot_path(job))
    grid = match.Target(np.zeros(GRID), CENTRES, "none", Path("none"))
    done = match.render_one(snaps, frame, match.axes_view(*view.split("-")), mirror, grid)
    assert done is not None
    image, where = done
    return image, where.rotation_deg


def observe(image: np.ndarray, angle_deg: float, zoom: float, noise: float, path: Path
            ) -> str:
    """Rotate (counter-clockwise as shown) about the image centre, rescale, add noise;
    save as PNG and return the centres where they moved, as --centres text."""
    height, width = image.shape
    pil = Image.fromarray((image * 255).astype(np.uint8))
    cx, cy = width / 2, height / 2
    pil = pil.rotate(angle_deg, resample=Image.Resampling.BILINEAR, center=(cx, cy))
    pil = pil.resize((round(width * zoom), round(height * zoom)), Image.Resampling.BILINEAR)
    noisy = np.asarray(pil, dtype=np.float64) + np.random.default_rng(5).normal(
        0, noise * 255, (pil.size[1], pil.size[0]))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path)
    a = math.radians(angle_deg)
    moved = []
    for x, y in CENTRES:  # pixel centres: the rotation acts on x + 0.5, y + 0.5
        dx, dy = x + 0.5 - cx, y + 0.5 - cy
        rx, ry = cx + dx * math.cos(a) + dy * math.sin(a), cy - dx * math.sin(a) + dy * math.cos(a)
        moved += [rx * zoom - 0.5, ry * zoom - 0.5]
    return ",".join(f"{v:.2f}" for v in moved)


def ranked(jobs: Path, target: Path, centres: str, views: int = 0) -> list[match.Result]:
    goal = match.load_target(target, match_settings.parse_centres(centres))
    return match.match_jobs(jobs, load_sweep(jobs).jobs, goal, match.Settings(views=views),
                            workers=1)


@pytest.mark.slow
def test_observed_render_of_a_job_ranks_it_first(sweep: Path, tmp_path: Path) -> None:
    image, rotation = render_target(sweep, frame=3, view="x-z", mirror=False)
    centres = observe(image, angle_deg=25, zoom=1.3, noise=0.03, path=tmp_path / "t.png")
    results = ranked(sweep, tmp_path / "t.png", centres)
    assert results[0].job == HIDDEN, [(r.job, r.best) for r in results]
    best = results[0].best
    assert best is not None and best.view == "x-z" and not best.mirror and best.frame == 3
    assert abs((best.rotation_deg - (rotation + 25) + 180) % 360 - 180) < 3, best
    # every other job scores clearly lower: the ranking is not a coin toss
    assert all(r.best is not None and r.best.ssim is not None and best.ssim is not None
               and r.best.ssim < best.ssim - 0.02 for r in results[1:])


@pytest.mark.slow
def test_mirror_and_rotation_recovered_from_any_direction(sweep: Path, tmp_path: Path) -> None:
    image, rotation = render_target(sweep, frame=4, view="x-y", mirror=True)
    centres = observe(image, angle_deg=-70, zoom=0.8, noise=0.02, path=tmp_path / "m.png")
    results = ranked(sweep, tmp_path / "m.png", centres)
    best = results[0].best
    assert results[0].job == HIDDEN and best is not None
    assert best.mirror and best.view == "x-y" and best.frame == 4
    assert abs((best.rotation_deg - (rotation - 70) + 180) % 360 - 180) < 3, best
    # the same frame seen unmirrored scores worse
    cache = match.ScoreCache(sweep)
    try:
        job = next(j for j in load_sweep(sweep).jobs if j.name == HIDDEN)
        digest = match.snapshot_digest(job)
        assert digest is not None
        goal = match.load_target(tmp_path / "m.png", match_settings.parse_centres(centres))
        plain = [s for s in cache.get(goal.key, HIDDEN, digest)
                 if s.frame == 4 and s.view == "x-y" and not s.mirror]
    finally:
        cache.close()
    assert plain and plain[0].ssim is not None and best.ssim is not None
    assert plain[0].ssim < best.ssim - 0.05


@pytest.mark.slow
def test_scores_come_from_the_cache_the_second_time(
    sweep: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, _ = render_target(sweep, frame=2, view="x-z", mirror=False)
    centres = observe(image, 0, 1.0, 0.0, tmp_path / "c.png")
    first = ranked(sweep, tmp_path / "c.png", centres, views=2)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("scored again")

    monkeypatch.setattr(match, "score_keys", refuse)
    again = ranked(sweep, tmp_path / "c.png", centres, views=2)
    assert [(r.job, r.best) for r in again] == [(r.job, r.best) for r in first]
    assert all(r.scored == 5 * 2 * 2 for r in again)  # frames x views x mirror


@pytest.mark.slow
@pytest.mark.parametrize(("frame", "view", "mirror"), [(2, "x-z", False), (1, "x-y", True)])
def test_coarse_to_fine_ranks_as_every_frame(sweep: Path, tmp_path: Path, frame: int,
                                             view: str, mirror: bool) -> None:
    """Two coarse frames of five (0, 3 and the last, 4), refined around the best renders,
    give the ranking, best frames and scores that scoring every frame gives, from
    fewer renders; the targets' frames are not in the coarse pass."""
    copy = tmp_path / "jobs"
    shutil.copytree(sweep, copy)  # a cache of its own
    image, _ = render_target(copy, frame=frame, view=view, mirror=mirror)
    centres = observe(image, 40, 1.2, 0.03, tmp_path / "f.png")
    goal = match.load_target(tmp_path / "f.png", match_settings.parse_centres(centres))
    jobs = load_sweep(copy).jobs
    assert match.coarse_frames(5, 2) == [0, 3, 4]
    coarse = match.match_jobs(copy, jobs, goal, match.Settings(coarse_frames=2), workers=1)
    every = match.match_jobs(copy, jobs, goal, match.Settings(coarse_frames=0), workers=1)
    assert every[0].job == HIDDEN and every[0].best is not None
    assert (every[0].best.frame, every[0].best.view, every[0].best.mirror) == (
        frame, view, mirror)
    assert [(r.job, r.best) for r in coarse] == [(r.job, r.best) for r in every]
    assert all(r.scored == 5 * 2 * 2 for r in every)
    # (on 5 frames it saves little: the savings are the benchmark's, on 40)
    assert sum(r.scored for r in coarse) < len(coarse) * 5 * 2 * 2, [r.scored for r in coarse]


@pytest.mark.slow
def test_match_command_writes_the_ranking(sweep: Path, tmp_path: Path) -> None:
    image, _ = render_target(sweep, frame=3, view="x-z", mirror=False)
    centres = observe(image, 10, 1.1, 0.02, tmp_path / "cli.png")
    result = CliRunner().invoke(app, ["match", "--jobs", str(sweep), "--target",
                                      str(tmp_path / "cli.png"), "--centres", centres,
                                      "--workers", "2", "--coarse-frames", "0"])
    assert result.exit_code == 0, result.output
    rows = (sweep / ".gibatch" / "match" / "ranking.csv").read_text().splitlines()
    assert rows[0].startswith("rank,job,score,ssim,iou,nmi")
    assert len(rows) == 1 + len(THETAS)
    first = rows[1].split(",")
    assert first[1] == HIDDEN and first[2] == first[3]  # ranked by SSIM, the default
    assert "4 jobs scored" in result.output
    # the report shows the target beside the best renders, and score against theta
    page = tmp_path / "r.html"
    shown = CliRunner().invoke(app, ["report", "--jobs", str(sweep), "--out", str(page)])
    assert shown.exit_code == 0, shown.output
    html = page.read_text()
    assert "Match against cli.png" in html and f"1. {HIDDEN}: score" in html
    media = tmp_path / "r_files"
    assert (media / "match-0.png").exists() and list(media.glob("match-score-*.png"))


@pytest.mark.slow
def test_a_known_scale_skips_frames_that_would_need_another(sweep: Path, tmp_path: Path
                                                             ) -> None:
    job = next(j for j in load_sweep(sweep).jobs if j.name == HIDDEN)
    snaps = match.load_snapshots(match.snapshot_path(job))
    grid = match.Target(np.zeros(GRID), CENTRES, "none", Path("none"))
    done = match.render_one(snaps, 3, match.axes_view("x", "z"), False, grid)
    assert done is not None
    zoom = 1.5  # 180 px wide: shrunk to the comparison grid, so the range is converted
    centres = observe(done[0], 0, zoom, 0.0, tmp_path / "k.png")
    goal = match.load_target(tmp_path / "k.png", match_settings.parse_centres(centres))
    true = done[1].kpc_per_px / zoom  # per pixel of the image as given
    settings = match.Settings(kpc_per_px=(0.9 * true, 1.1 * true))
    results = match.match_jobs(sweep, load_sweep(sweep).jobs, goal, settings, workers=1)
    best = results[0].best
    assert results[0].job == HIDDEN and best is not None and best.frame == 3, results[0]
    assert best.kpc_per_px == pytest.approx(true, rel=0.02)  # reported as given, too
    cache = match.ScoreCache(sweep)
    try:
        digest = match.snapshot_digest(job)
        assert digest is not None
        scores = cache.get(match.cache_key(goal, settings), HIDDEN, digest)
    finally:
        cache.close()
    low, high = goal.on_grid((0.9 * true, 1.1 * true))
    rendered = [s for s in scores if s.ssim is not None]
    assert all(s.kpc_per_px is not None and low <= s.kpc_per_px <= high for s in rendered)
    assert 0 < len(rendered) <= len(scores) // 2, len(rendered)
    assert match.cache_key(goal, settings) != goal.key  # another range, other scores


@pytest.mark.slow
def test_own_ssim_is_skimages(sweep: Path, tmp_path: Path) -> None:
    """The scorer's SSIM (filtered once for the target, float32) is skimage's to 1e-5."""
    image, _ = render_target(sweep, frame=3, view="x-z", mirror=False)
    centres = observe(image, 25, 1.3, 0.03, tmp_path / "s.png")
    goal = match.load_target(tmp_path / "s.png", match_settings.parse_centres(centres))
    job = next(j for j in load_sweep(sweep).jobs if j.name == "theta-60")
    snaps = match.load_snapshots(match.snapshot_path(job))
    views = [match.axes_view("x", "z"), *match.sphere_views(2)]
    ours = match.score_snapshots(snaps, views, goal)
    theirs = match.score_snapshots(snaps, views, goal, ssim=match.skimage_ssim)
    pairs = [(a.ssim, b.ssim) for a, b in zip(ours, theirs, strict=True) if a.ssim is not None]
    assert len(pairs) > 20
    assert max(abs(a - (b or 0.0)) for a, b in pairs) < 1e-5, pairs


def fits_bytes(image: np.ndarray, bitpix: int = -32, extension: bool = False,
               bscale: float = 1.0, bzero: float = 0.0, planes: int = 1) -> bytes:
    """A FITS file written by the standard's rules (top row of `image` shown on top)."""
    def header(cards: list[tuple[str, str]]) -> bytes:
        text = "".join(f"{key:<8}= {value:>20}".ljust(80) for key, value in cards)
        text += "END".ljust(80)
        return text.ljust(-(-len(text) // 2880) * 2880).encode()

    dtype = {16: ">i2", -32: ">f4"}[bitpix]
    data = ((image[::-1] - bzero) / bscale).astype(dtype).tobytes() * planes  # bottom first
    data += b"\0" * (-len(data) % 2880)
    axes = [("NAXIS", "3" if planes > 1 else "2"), ("NAXIS1", str(image.shape[1])),
            ("NAXIS2", str(image.shape[0])), *([("NAXIS3", str(planes))] if planes > 1 else [])]
    scaling = [("BSCALE", f"{bscale:g}"), ("BZERO", f"{bzero:g}")]
    if not extension:
        return header([("SIMPLE", "T"), ("BITPIX", str(bitpix)), *axes, *scaling]) + data
    return (header([("SIMPLE", "T"), ("BITPIX", "8"), ("NAXIS", "0"), ("EXTEND", "T")])
            + header([("XTENSION", "'IMAGE   '"), ("BITPIX", str(bitpix)), *axes,
                      ("PCOUNT", "0"), ("GCOUNT", "1"), *scaling]) + data)


@pytest.mark.slow
def test_fits_targets_rank_as_the_same_png(sweep: Path, tmp_path: Path) -> None:
    image, _ = render_target(sweep, frame=3, view="x-z", mirror=False)
    centres = observe(image, 25, 1.3, 0.03, tmp_path / "t.png")
    pixels = np.asarray(Image.open(tmp_path / "t.png"), dtype=np.float64)
    height = pixels.shape[0]
    xy = [float(v) for v in centres.split(",")]
    # FITS pixels as ds9 shows them: 1-based centres, y up
    fits_centres = ",".join(f"{v:.3f}" for x, y in zip(xy[::2], xy[1::2], strict=True)
                            for v in (x + 0.5, height + 0.5 - y))
    (tmp_path / "t.fits.gz").write_bytes(gzip.compress(fits_bytes(pixels)))
    (tmp_path / "t-ext.fits").write_bytes(fits_bytes(pixels, 16, True, 0.5, 10.0))
    png = ranked(sweep, tmp_path / "t.png", centres)[0]
    for name in ("t.fits.gz", "t-ext.fits"):
        first = ranked(sweep, tmp_path / name, fits_centres)[0]
        assert first.job == png.job == HIDDEN and first.best and png.best
        assert (first.best.frame, first.best.view, first.best.mirror) == (3, "x-z", False)
        assert first.best.ssim == pytest.approx(png.best.ssim, abs=1e-6), name
        # the same scale; the offset in FITS pixels (1-based, y up)
        assert first.best.kpc_per_px == pytest.approx(png.best.kpc_per_px, rel=1e-9)
        assert png.best.offset_x_px is not None and png.best.offset_y_px is not None
        assert (first.best.offset_x_px, first.best.offset_y_px) == pytest.approx(
            (png.best.offset_x_px + 0.5, height + 0.5 - png.best.offset_y_px))
    (tmp_path / "cube.fits").write_bytes(fits_bytes(pixels, planes=3))
    (tmp_path / "cut.fits").write_bytes(fits_bytes(pixels)[:4000])
    (tmp_path / "cut.fits.gz").write_bytes(gzip.compress(fits_bytes(pixels))[:-100])
    for name, message in (("cube.fits", "cube"), ("cut.fits", "truncated"),
                          ("cut.fits.gz", "broken gzip stream")):
        with pytest.raises(match_settings.MatchError, match=message):
            match.load_target(tmp_path / name, match_settings.parse_centres(fits_centres))
    with pytest.raises(match_settings.MatchError, match=r"FITS pixels: 1-based, y up"):
        match.load_target(tmp_path / "t.fits.gz", ((0.2, 5.0), (30.0, 40.0)))


def bad(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return result.output


@pytest.fixture
def one_job(tmp_path: Path) -> Path:
    write_job(tmp_path / "jobs", "a", tiny_job_files())
    return tmp_path / "jobs"


def test_bad_targets_and_centres_are_named(one_job: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    image = tmp_path / "ok.png"
    Image.new("L", (64, 48), 20).save(image)
    args = ["match", "--jobs", str(one_job), "--target"]
    assert "not an image" in bad([*args, str(text), "--centres", "1,1,5,5"])
    assert "no such file" in bad([*args, str(tmp_path / "gone.png"), "--centres",
                                  "1,1,5,5"]).lower()
    assert "lies outside the target, which is 64x48" in bad([*args, str(image), "--centres",
                                                            "10,10,70,20"])
    assert "galaxy 2's centre (10, 48)" in bad([*args, str(image), "--centres", "1,1,10,48"])
    assert "the two centres are the same point" in bad([*args, str(image), "--centres",
                                                       "10,10,10,10"])
    assert "expected four numbers" in bad([*args, str(image), "--centres", "10,10,20"])
    assert "every pixel the same" in bad([*args, str(image), "--centres", "10,10,20,20"])
    for text in ("1", "2,1", "0,1", "1,inf"):
        with pytest.raises(match_settings.MatchError, match="--kpc-per-px"):
            match_settings.parse_scale(text)
    pixels = np.zeros((48, 64), np.uint8)
    pixels[10:20, 10:20] = 200
    Image.fromarray(pixels).save(image)
    assert "need 0 < LOW <= HIGH" in bad([*args, str(image), "--centres", "12,12,40,30",
                                          "--kpc-per-px", "3,1"])


def test_bad_search_inputs_are_named(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write_job(tmp_path, "base", tiny_job_files())
    image = tmp_path / "t.png"
    pixels = np.zeros((48, 64), np.uint8)
    pixels[10:20, 10:20] = 200
    Image.fromarray(pixels).save(image)
    space = tmp_path / "space.toml"
    common = ["search", "--jobs", str(tmp_path / "found"), "--base", str(base), "--space",
              str(space), "--target", str(image), "--centres", "12,12,40,30"]
    space.write_text('"merge.theta_galaxy_3" = {low = 0, high = 90}\n')
    assert "merge.json has no key 'theta_galaxy_3'" in bad([*common, "--budget", "4"])
    space.write_text('"interact.mass_2" = {low = 3, high = 1}\n')
    assert "low (3) must be below high (1)" in bad([*common, "--budget", "4"])
    space.write_text('"interact.mass_2" = {low = 0.5, high = 3, log = true}\n')
    assert "--budget 0: must be at least 1" in bad([*common, "--budget", "0"])
    space.write_text("interact.mass_2 = [1, 2\n")
    assert "not valid TOML" in bad([*common, "--budget", "4"])


def test_a_report_without_a_ranking_loads_no_scorer(tmp_path: Path) -> None:
    """The report looks for a ranking before it imports the scorer (scipy, h5py: a
    second and 30 MB for every report of a sweep nobody matched)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from gibatch import report; "
            f"assert report.load_ranking(Path({str(tmp_path)!r})) is None; "
            "assert 'gibatch.match' not in sys.modules, 'scorer loaded'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
