"""Careless or odd input at the command line: names that look like markup or hold escape
sequences, impossible option values, files and folders where the other was expected.
Each is one clear line (or shown as it is), never a traceback, never minutes of work."""

from __future__ import annotations

import os
import resource
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from gibatch.cli import app
from gibatch.journal import Event, Journal
from tests.conftest import BASE_JOB, ThreadedSite, tiny_job_files, write_job

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # rich tables wrap cells to the terminal's width


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env={**WIDE, **(env or {})})
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    return result.exit_code, result.output


# -- names in rich tables: shown as they are, escaped, never read as markup

MARKUP = "sweep[theta=45]"
ESCAPE = "j\x1b]0;pwned\x07\x1b[2J"


def test_plan_shows_job_names_and_the_path_as_they_are(tmp_path: Path) -> None:
    jobs = tmp_path / "[red]jobs"
    for name in (MARKUP, ESCAPE, "[blink]x"):
        write_job(jobs, name, tiny_job_files())
    code, text = invoke("plan", "--jobs", str(jobs), "--models", "1")
    assert code == 0, text
    assert MARKUP in text and "[blink]x" in text and f"plan for {jobs}" in text
    assert "\x1b" not in text and "j\\x1b]0;pwned\\x07\\x1b[2J" in text


def test_status_shows_running_job_names_as_they_are(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    for name in (MARKUP, ESCAPE):
        write_job(jobs, name, tiny_job_files())
    journal = Journal(jobs)  # a run of this (live) process with both jobs started
    try:
        journal.record(Event.RUN_START)
        journal.record(Event.JOB_START, MARKUP, 1)
        journal.record(Event.JOB_START, ESCAPE, 2)
    finally:
        journal.close()
    code, text = invoke("status", "--jobs", str(jobs))
    assert code == 0, text
    assert "2 running" in text
    assert f"{MARKUP} (starting)" in text
    assert "\x1b" not in text and "j\\x1b]0;pwned\\x07\\x1b[2J (starting)" in text


def test_match_ranking_shows_job_names_as_they_are(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranking table only: scoring is replaced (test_match.py scores for real)."""
    from gibatch import cli, match

    jobs = tmp_path / "jobs"
    for name in (MARKUP, ESCAPE):
        write_job(jobs, name, tiny_job_files())
    best = match.Score(frame=3, time_gyr=1.0, view="xy", mirror=False, ssim=0.5, iou=0.5,
                       nmi=0.5, kpc_per_px=1.0, rotation_deg=0.0)
    monkeypatch.setattr(cli, "_match_target", lambda *a: None)
    monkeypatch.setattr(match, "match_jobs", lambda *a: [
        match.Result(MARKUP, best), match.Result(ESCAPE, best)])
    monkeypatch.setattr(match, "write_results", lambda *a: jobs / "ranking.csv")
    code, text = invoke("match", "--jobs", str(jobs), "--target", "t.png",
                        "--centres", "1,1,9,9")
    assert code == 0, text
    assert MARKUP in text
    assert "\x1b" not in text and "j\\x1b]0;pwned\\x07\\x1b[2J" in text


# -- $GIBATCH_PASSWORD of bytes that are not UTF-8: a usage error, never echoed

SERVER = ["--server", "http://127.0.0.1:9/ast80011", "--username", "me"]
UNDECODABLE = "Hunter2-\udce9t\udce9"  # b"Hunter2-\xe9t\xe9" as os.environ gives it


@pytest.mark.parametrize("command", ["run", "plan", "serve"])
def test_an_undecodable_password_in_the_environment_is_a_usage_error(
        tmp_path: Path, command: str) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    args = (["--port", "0", "--data-dir", str(tmp_path / "site")] if command == "serve"
            else ["--jobs", str(jobs), *SERVER])
    code, text = invoke(command, *args, env={"GIBATCH_PASSWORD": UNDECODABLE})
    assert code == 2, text
    assert "$GIBATCH_PASSWORD is not UTF-8 text" in text
    assert "Hunter2" not in text and "Traceback" not in text


# -- report: where its page and temporaries go

@pytest.mark.parametrize("name", ["report.html", "report.tmp", "report.html.rows.tmp",
                                  "contact-sheet.png"])
def test_report_beside_a_job_folder_named_like_its_files(tmp_path: Path, name: str) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    write_job(jobs, name, tiny_job_files())
    code, text = invoke("report", "--jobs", str(jobs))
    assert (jobs / name / "galaxy1.json").exists()  # the job is never replaced
    if name in ("report.html", "contact-sheet.png"):  # the page's own names: refused
        assert code == 1, text
        assert f"error: {jobs / name} is a folder; the report needs the name for a " \
               "file (pass --out to write it elsewhere)" in text
        code, text = invoke("report", "--jobs", str(jobs), "--out",
                            str(tmp_path / "page.html"))
    assert code == 0, text
    assert "2 jobs" in text


def test_report_keeps_its_contact_sheet_temporary_among_its_media(tmp_path: Path) -> None:
    from gibatch.jobs import load_sweep
    from gibatch.report import build_report
    from gibatch.status import JobState, JobStatus, SweepStatus

    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    folder = jobs / "1"
    (folder / "output" / "Plot 1").mkdir(parents=True)
    Image.new("RGB", (50, 40), "red").save(folder / "output" / "Plot 1" / "final.png")
    write_job(jobs, "contact-sheet.tmp.png", tiny_job_files())  # a job folder's name
    status = SweepStatus([JobStatus("1", JobState.COMPLETE)], [], None, None, 0)
    result = build_report(load_sweep(jobs), status)
    assert result.sheet == jobs / "contact-sheet.png" and result.sheet.is_file()
    assert (jobs / "contact-sheet.tmp.png" / "galaxy1.json").is_file()


def test_report_out_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    (tmp_path / "file").write_text("x")
    code, text = invoke("report", "--jobs", str(jobs), "--out",
                        str(tmp_path / "file" / "r.html"))
    assert code == 1, text
    assert text == (f"error: cannot write the report: {tmp_path / 'file' / 'r_files'}: "
                    "Not a directory\n")


# -- report: an animation whose last frame costs too much to reach

def _gif(path: Path, frames: int, side: int) -> Path:
    images = [Image.new("P", (side, side), i % 2) for i in range(frames)]
    for image in images:
        image.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    images[0].save(path, save_all=True, append_images=images[1:], optimize=False)
    return path


def test_an_animation_of_huge_frames_is_a_placeholder_not_decoded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Frames far larger than any plot: 40 of 4000x4000 (0.55 MB) took 8 s to reach the
    last; a GIF of 100 MB held the report for 25 minutes."""
    from gibatch import report

    huge = _gif(tmp_path / "huge.gif", 3, 2100)  # each frame under Pillow's bomb limit
    assert report.last_frame(huge).size == (report.THUMB_PX, report.THUMB_PX)
    assert "3 frames of 2100x2100" in caplog.text
    normal = _gif(tmp_path / "normal.gif", 3, 768)
    assert report.last_frame(normal).size == (768, 768)


def test_an_animation_of_too_many_frames_is_a_placeholder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gibatch import report

    monkeypatch.setattr(report, "MAX_ANIMATION_PX", 10 * 64 * 64)  # 2,000 768 px frames
    assert report.last_frame(_gif(tmp_path / "ten.gif", 10, 64)).size == (64, 64)
    assert report.last_frame(_gif(tmp_path / "eleven.gif", 11, 64)).size == (
        report.THUMB_PX, report.THUMB_PX)


# -- careless command lines (review 7 #10)

@pytest.fixture
def memory_cap() -> Iterator[None]:
    """At most 2 GiB more address space while the test runs: a regression that reads
    /dev/zero whole or expands 10**8 model numbers fails with MemoryError, not the CI
    machine."""
    with open("/proc/self/status") as f:
        size_kib = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (size_kib * 1024 + (2 << 30), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.mark.usefixtures("memory_cap")
def test_a_huge_model_range_is_refused_before_it_is_expanded(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    for models in ("1-100000000", "101", "1,3,1000000000000000000000"):
        code, text = invoke("plan", "--jobs", str(jobs), "--models", models)
        assert code == 2, text
        assert "model numbers go up to 100 at most" in text
    code, text = invoke("plan", "--jobs", str(jobs), "--models", "1-100")
    assert code == 0, text


def test_a_log_file_that_cannot_be_opened_is_a_usage_error(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    log = tmp_path / "no" / "such" / "log.jsonl"
    code, text = invoke("run", "--jobs", str(jobs), "--models", "1", "--log-file", str(log))
    assert code == 2, text
    assert f"error: --log-file: cannot open {log}: No such file or directory" in text


def test_serve_on_a_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, text = invoke("serve", "--port", str(port), "--data-dir", str(tmp_path / "d"))
    assert code == 1, text
    assert text.startswith(f"error: cannot start the site on 127.0.0.1:{port}: ")
    assert "address already in use" in text and len(text.splitlines()) == 1


@pytest.mark.usefixtures("memory_cap")
@pytest.mark.parametrize(("args", "expected"), [
    (["--vary", "merge.theta_galaxy_2=0:NaN:1"], "NaN and Infinity are no bounds"),
    (["--vary", "merge.theta_galaxy_2=0:Infinity:1"], "NaN and Infinity are no bounds"),
    (["--vary", "merge.theta_galaxy_2=0:1e999"], "NaN and Infinity are no bounds"),
    (["--vary", "interact.mass_2=1,NaN"], "NaN and Infinity are no values"),
    (["--vary", "interact.nFrames=1:Infinity", "--random", "2"],
     "NaN and Infinity are no bounds"),
    (["--vary", "merge.theta_galaxy_2=0:1e308:1e-300"], "more than 100000 values"),
    (["--vary", "interact.mass_2=1:2", "--random", "100000000"],
     "--random 100000000: more than 100000 jobs"),
])
def test_a_sweep_that_cannot_be_made_is_a_usage_error(
        tmp_path: Path, args: list[str], expected: str) -> None:
    code, text = invoke("sweep", str(BASE_JOB), "--out", str(tmp_path / "o"), *args)
    assert code == 2, text
    assert expected in text and "Traceback" not in text
    assert not (tmp_path / "o").exists()


def test_sweep_out_that_is_a_file_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    code, text = invoke("sweep", str(BASE_JOB), "--out", str(tmp_path / "file"),
                        "--vary", "interact.mass_2=1,2")
    assert code == 2, text
    assert f"error: --out {tmp_path / 'file'}: is not a folder" in text
    assert (tmp_path / "file").read_text() == "x"


def test_sweep_force_replaces_a_linked_job_folder_not_its_target(tmp_path: Path) -> None:
    out = tmp_path / "o"
    args = ["sweep", str(BASE_JOB), "--out", str(out), "--vary", "interact.mass_2=1,2,3"]
    code, text = invoke(*args)
    assert code == 0, text
    first, second, third = sorted(p for p in out.iterdir() if p.is_dir())
    elsewhere = tmp_path / "elsewhere"
    first.rename(elsewhere)
    first.symlink_to(elsewhere)  # a link to a folder outside the sweep
    second.rename(tmp_path / "moved")
    second.symlink_to(tmp_path / "gone")  # a link whose target is gone
    shutil.rmtree(third)
    third.write_text("a file")
    code, text = invoke(*args)
    assert code == 2 and "would overwrite 4 existing entries" in text  # the links count
    code, text = invoke(*args, "--force")
    assert code == 0, text
    for job in (first, second, third):
        assert job.is_dir() and not job.is_symlink() and (job / "merge.json").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == sorted(
        p.name for p in first.iterdir())  # the link's target is left as it was
    # sweep.json, a link to someone's file: replaced, never written through
    victim = tmp_path / "precious.json"
    victim.write_text('{"mine": true}\n')
    (out / "sweep.json").unlink()
    (out / "sweep.json").symlink_to(victim)
    code, text = invoke(*args, "--force")
    assert code == 0, text
    assert victim.read_text() == '{"mine": true}\n'
    assert not (out / "sweep.json").is_symlink() and "jobs" in (out / "sweep.json").read_text()


def _fifo(tmp_path: Path) -> Path:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    return fifo


@pytest.mark.timeout(60)
@pytest.mark.usefixtures("memory_cap")
@pytest.mark.parametrize("kind", ["device", "fifo", "folder"])
def test_match_and_search_read_only_regular_files(tmp_path: Path, kind: str) -> None:
    """/dev/zero was read whole (memory exhausted), a FIFO hung for ever."""
    path = {"device": Path("/dev/zero"), "fifo": _fifo(tmp_path), "folder": tmp_path}[kind]
    what = {"device": "a device", "fifo": "a FIFO", "folder": "a folder"}[kind]
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    code, text = invoke("match", "--jobs", str(jobs), "--target", str(path),
                        "--centres", "10,10,20,20")
    assert code == 2, text
    assert f"--target {path}: cannot read: is {what}, not a regular file" in text
    code, text = invoke("search", "--jobs", str(tmp_path / "found"), "--base", str(BASE_JOB),
                        "--space", str(path), "--target", str(path),
                        "--centres", "10,10,20,20", "--budget", "1")
    assert code == 2, text
    assert f"--space {path}: cannot read: is {what}, not a regular file" in text


def test_a_search_space_nested_too_deeply_is_a_usage_error(tmp_path: Path) -> None:
    space = tmp_path / "space.toml"
    space.write_text("a = " + "[" * 100_000 + "\n")
    code, text = invoke("search", "--jobs", str(tmp_path / "found"), "--base", str(BASE_JOB),
                        "--space", str(space), "--target", "t.png",
                        "--centres", "10,10,20,20", "--budget", "1")
    assert code == 2, text
    assert f"--space {space}: nested too deeply" in text


@pytest.mark.parametrize("command", ["status", "report", "run", "check", "plan"])
def test_a_file_named_dot_gibatch_in_the_sweep_is_a_clear_error(
        tmp_path: Path, command: str) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    (jobs / ".gibatch").write_text("my settings\n")
    code, text = invoke(command, "--jobs", str(jobs))
    assert code == 1, text
    assert text == (f"error: {jobs / '.gibatch'} is not a folder: gibatch keeps its journal "
                    "and caches in a folder of that name; move the file away\n")
    assert (jobs / ".gibatch").read_text() == "my settings\n"


# -- --server: no query or fragment; plain http to another machine is warned about

@pytest.mark.parametrize("url", ["https://example.org/ast80011?x=1",
                                 "https://example.org/ast80011#top",
                                 "https://example.org/ast80011?"])
def test_a_server_url_with_a_query_or_fragment_is_refused(tmp_path: Path, url: str) -> None:
    """urljoin(base, "accounts/login/") drops the path after a query: the login would go
    to https://example.org/accounts/login/, outside the site."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    for command in ("run", "plan"):
        code, text = invoke(command, "--jobs", str(jobs), "--server", url, "--username", "me",
                            env={"GIBATCH_PASSWORD": "hunter2"})
        assert code == 2, text
        assert "--server must not hold a query (?...) or a fragment (#...)" in text
        assert url not in text


@pytest.mark.parametrize(("url", "warned"), [
    ("http://example.org/ast80011", True), ("http://10.0.0.7:8000/ast80011", True),
    ("http://127.0.0.1:8000/ast80011", False), ("http://localhost:8000/", False),
    ("http://[::1]:8000/", False), ("https://example.org/ast80011", False),
])
def test_plain_http_to_another_machine_is_warned_about(
        tmp_path: Path, url: str, warned: bool) -> None:
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    code, text = invoke("plan", "--jobs", str(jobs), "--server", url)  # stops: no --username
    assert code == 2 and "--server needs --username" in text
    assert ("password crosses the network unencrypted" in text) is warned


def test_plain_lines_of_plan_status_and_search_are_escaped() -> None:
    """plan's notes carry the site's words (a foreign task's type); search's line the
    space file's keys and values."""
    import io

    from rich.console import Console

    from gibatch import commands, match_settings, search
    from gibatch.cli import _search_line

    buf = io.StringIO()
    commands._say(Console(file=buf, force_terminal=True), f"note: model 1: {ESCAPE} [b]x")
    assert buf.getvalue() == "note: model 1: j\\x1b]0;pwned\\x07\\x1b[2J [b]x\n"
    line = _search_line(search.Progress(told=1, budget=2, best_value=0.5, best_job=ESCAPE,
                                        best_params={"k\x1b[2J": "v\x07"}),
                        match_settings.Metric.SSIM)
    assert "\x1b" not in line and "\x07" not in line
    assert "(j\\x1b]0;pwned\\x07\\x1b[2J: k\\x1b[2J=v\\x07)" in line


# -- --server without the site's path: the login page is not found

def test_a_server_address_missing_the_sites_path_names_the_login_page(
        tmp_path: Path, make_site: Callable[..., ThreadedSite]) -> None:
    """`--server http://HOST` for a site under `/ast80011`: the login page answers 404,
    which says the address is wrong (not that the page lacks a form field)."""
    jobs = tmp_path / "jobs"
    write_job(jobs, "1", tiny_job_files())
    site = make_site()
    root = site.running.url.split("/ast80011")[0]
    code, text = invoke("run", "--jobs", str(jobs), "--models", "1", "--server", root,
                        "--username", "alice",
                        env={"GIBATCH_PASSWORD": "pw",
                             "GIBATCH_LOCK_DIR": str(tmp_path / "locks")})
    assert code != 0 and "Traceback" not in text, text
    assert f"the login page {root}/accounts/login/ answered 404" in text, text
    assert "is --server the site's base address" in text
