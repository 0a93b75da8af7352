"""Hostile and malformed input (issue 10): every bad job folder is one clear problem
line naming its folder, file and field; never a traceback, never a hang; the valid jobs
beside it still count. Also the password file, --server URLs, an empty sweep and
corrupt images in the report."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import unicodedata
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from gibatch.cli import _password, app
from gibatch.jobs import MAX_JSON_DEPTH, Job, JobInvalid, load_job, load_sweep
from gibatch.report import THUMB_PX, build_report
from gibatch.status import JobState, JobStatus, SweepStatus
from gibatch.text import EscapeArgs, first_line, printable
from tests.conftest import read_base, write_job

pytestmark = pytest.mark.timeout(30)  # a FIFO or /dev/zero read that blocks fails fast

runner = CliRunner()
MERGE = read_base()["merge.json"]


def write_base(folder: Path) -> Path:
    """A valid job folder (the example base job) at `folder`."""
    write_job(folder.parent, folder.name, read_base())
    return folder


def replace(name: str, data: bytes | str) -> Callable[[Path], None]:
    """A corpus builder: the base job with `name` holding `data` instead."""
    def build(folder: Path) -> None:
        target = folder / name
        target.unlink()
        if isinstance(data, str):
            target.write_text(data, encoding="utf-8")
        else:
            target.write_bytes(data)
    return build


def swap(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    """A corpus builder: the base job with `name` replaced by what `make` puts there."""
    def build(folder: Path) -> None:
        (folder / name).unlink()
        make(folder / name)
    return build


def bind_socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def plot_with_leading_zero(folder: Path) -> None:
    (folder / "plot2.json").unlink()
    (folder / "plot1.json").rename(folder / "plot01.json")


def merge_with(text: str) -> str:
    """merge.json's text with `text` spliced in as the value of theta_galaxy_2."""
    return json.dumps({**MERGE, "theta_galaxy_2": 0}).replace(
        '"theta_galaxy_2": 0', f'"theta_galaxy_2": {text}')


# folder name -> (how to spoil the base job, the problem line expected in `check`)
CORPUS: dict[str, tuple[Callable[[Path], None], str]] = {
    "deep-list": (replace("merge.json", "[" * 100_000 + "]" * 100_000),
                  f"deep-list/merge.json: nested more than {MAX_JSON_DEPTH} levels deep"),
    "deep-object": (replace("merge.json", '{"a":' * 500 + "1" + "}" * 500),
                    f"deep-object/merge.json: nested more than {MAX_JSON_DEPTH} levels deep"),
    "dev-zero": (swap("merge.json", lambda p: p.symlink_to("/dev/zero")),
                 "dev-zero/merge.json: is a device, not a regular file"),
    "fifo": (swap("merge.json", lambda p: os.mkfifo(p)),
             "fifo/merge.json: is a FIFO, not a regular file"),
    "socket": (swap("merge.json", bind_socket),
               "socket/merge.json: is a socket, not a regular file"),
    "file-loop": (swap("merge.json", lambda p: p.symlink_to(p.name)),
                  "file-loop/merge.json: cannot read: Too many levels of symbolic links"),
    "folder-json": (swap("galaxy1.json", lambda p: p.mkdir()),
                    "folder-json/galaxy1.json: is a folder, not a regular file"),
    "huge": (replace("merge.json", " " * (1 << 20) + "{}"),
             "huge/merge.json: file is larger than 1 MiB"),
    "empty": (replace("merge.json", ""), "empty/merge.json: file is empty"),
    "blank": (replace("merge.json", " \n\t\n"), "blank/merge.json: file is empty"),
    "not-utf8": (replace("merge.json", b'{"a": "\xff"}'),
                 "not-utf8/merge.json: is not UTF-8 text (byte 0xff at offset 7)"),
    "bom": (replace("merge.json", b"\xef\xbb\xbf" + json.dumps(MERGE).encode()),
            "bom/merge.json: starts with a UTF-8 byte-order mark (BOM)"),
    "utf16": (replace("merge.json", json.dumps(MERGE).encode("utf-16")),
              "utf16/merge.json: is UTF-16 text; save it as UTF-8"),
    "nan": (replace("merge.json", merge_with("NaN")),
            "nan/merge.json: NaN is not a JSON number"),
    "infinity": (replace("merge.json", merge_with("-Infinity")),
                 "infinity/merge.json: -Infinity is not a JSON number"),
    "overflow": (replace("merge.json", merge_with("1e999")),
                 "overflow/merge.json: theta_galaxy_2: Input should be a finite number"),
    "long-int": (replace("merge.json", merge_with("9" * 5000)),
                 "long-int/merge.json: a number of 5000 digits is too long"),
    "truncated": (replace("merge.json", json.dumps(MERGE)[:40]),
                  "truncated/merge.json: malformed JSON at line 1 column"),
    "list": (replace("merge.json", "[1, 2]"), "list/merge.json: must hold a JSON object"),
    "string": (replace("merge.json", '"merge"'), "string/merge.json: must hold a JSON object"),
    "duplicate-nested": (
        replace("merge.json", merge_with("0").replace('"galaxy_1": 1,',
                                                      '"galaxy_1": 1, "galaxy_1": 2,')),
        "duplicate-nested/merge.json: length_scale.galaxy_1: key appears more than once"),
    "duplicate-top": (replace("merge.json", merge_with('0, "theta_galaxy_2": 10')),
                      "duplicate-top/merge.json: theta_galaxy_2: key appears more than once"),
    "key-newline": (replace("merge.json", merge_with('0, "a\\nb": 1')),
                    "key-newline/merge.json: a\\nb: unknown key"),
    "plot-leading-zero": (plot_with_leading_zero,
                          "plot-leading-zero/plot1.json: file is missing (a job needs a plot)"),
    "evil\nforged: 0 invalid": (
        replace("merge.json", "{"), "evil\\nforged: 0 invalid/merge.json: malformed JSON"),
    "\u202eevil": (replace("merge.json", "{"), "\\u202eevil/merge.json: malformed JSON"),
}
VALID = ["0-good", "0-good-linked", "0-unicode-Größe-日本"]


@pytest.fixture(scope="module")
def hostile_check(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str]:
    """`gibatch check` as a real process on the whole corpus beside valid jobs."""
    root = tmp_path_factory.mktemp("hostile") / "jobs"
    good = write_base(root / VALID[0])
    (root / VALID[1]).symlink_to(good.name)  # a linked job folder is a job
    write_base(root / VALID[2])
    (root / VALID[2] / "galaxy1.json").unlink()
    (root / VALID[2] / "galaxy1.json").symlink_to(good / "galaxy1.json")  # so is a file
    for name, (spoil, _) in CORPUS.items():
        spoil(write_base(root / name))
    (root / "folder-loop").symlink_to("folder-loop")
    os.mkdir(bytes(root) + b"/undecodable-\xff")  # a name that is not UTF-8
    done = subprocess.run([sys.executable, "-m", "gibatch", "check", "--jobs", str(root)],
                          capture_output=True, text=True, timeout=25)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize("name", list(CORPUS))
def test_check_names_each_hostile_job_in_one_line(
        hostile_check: tuple[int, str, str], name: str) -> None:
    code, out, err = hostile_check
    expected = CORPUS[name][1]
    assert any(line.startswith(expected) for line in out.splitlines()), out
    assert code == 1
    assert "Traceback" not in out + err


def test_check_counts_the_valid_jobs_and_forges_no_line(
        hostile_check: tuple[int, str, str]) -> None:
    code, out, err = hostile_check
    lines = out.splitlines()
    invalid = len(CORPUS) + 2  # and the folder loop and the undecodable name
    assert lines[-1] == f"{len(VALID)} valid, {invalid} invalid", out
    assert "folder-loop: cannot read the folder: Too many levels of symbolic links" in lines
    assert "undecodable-\\udcff/plot1.json: file is missing (a job needs a plot)" in lines
    assert not any(line.startswith("forged") for line in lines)  # the newline is escaped
    assert all(on_one_visible_line(line) for line in lines)
    assert code == 1 and "Traceback" not in out + err


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_folder_and_file_are_reported_per_folder(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    write_base(root / "good")
    write_base(root / "closed-folder").chmod(0)
    (write_base(root / "closed-file") / "merge.json").chmod(0)
    try:
        code, text = invoke("check", "--jobs", str(root))
    finally:
        (root / "closed-folder").chmod(0o755)
    assert "closed-folder: cannot read the folder: Permission denied" in text
    assert "closed-file/merge.json: cannot read: Permission denied" in text
    assert "1 valid, 2 invalid" in text and code == 1


def test_denied_folder_and_file_are_reported_per_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as above for any user (root reads everything): EACCES simulated."""
    root = tmp_path / "jobs"
    write_base(root / "good")
    closed_folder = write_base(root / "closed-folder")
    closed_file = write_base(root / "closed-file") / "merge.json"
    real_listdir, real_open = os.listdir, os.open

    def denied(path: object) -> OSError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def listdir(path: Any = ".") -> list[str]:
        if Path(path) == closed_folder:
            raise denied(path)
        return real_listdir(path)

    def open_(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if Path(path) == closed_file:
            raise denied(path)
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "open", open_)
    code, text = invoke("check", "--jobs", str(root))
    assert "closed-folder: cannot read the folder: Permission denied" in text
    assert "closed-file/merge.json: cannot read: Permission denied" in text
    assert "1 valid, 2 invalid" in text and code == 1


def invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = runner.invoke(app, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize("command", ["check", "run"])
def test_an_empty_sweep_is_an_error(tmp_path: Path, command: str) -> None:
    (tmp_path / "jobs" / ".gibatch").mkdir(parents=True)  # dot-folders are no jobs
    code, text = invoke(command, "--jobs", str(tmp_path / "jobs"))
    assert code == 1
    assert f"no job folders in {tmp_path / 'jobs'}" in text


# -- --password-file and --server: refused before any connection (no site here)

SERVER = ["--server", "http://127.0.0.1:9/ast80011", "--username", "me"]


@pytest.mark.parametrize(("content", "expected"), [
    (b"p\xe4ssword\n", "is not UTF-8 text"),
    (b"x" * 5000, "is larger than 4096 bytes"),
    (None, "cannot read --password-file"),
])
def test_bad_password_file_is_a_usage_error(
        tmp_path: Path, content: bytes | None, expected: str) -> None:
    jobs = tmp_path / "jobs"
    write_base(jobs / "1")
    secret = tmp_path / "secret"
    if content is not None:
        secret.write_bytes(content)
    for command in ("run", "plan"):
        code, text = invoke(command, "--jobs", str(jobs), *SERVER,
                            "--password-file", str(secret))
        assert code == 2, text
        assert f"--password-file {secret}" in text and expected in text
        assert "Traceback" not in text


@pytest.mark.parametrize(("content", "password"), [
    ("pw\n", "pw"), ("pw\r\n", "pw"), ("pw", "pw"), ("pw\n\n", "pw\n"), (" pw \n", " pw "),
    ("pässwörd\n", "pässwörd"),
])
def test_password_file_loses_one_trailing_newline(
        tmp_path: Path, content: str, password: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(content.encode())
    assert _password(secret) == password


@pytest.mark.parametrize(("url", "expected"), [
    ("http://me:hunter2@127.0.0.1:9/ast80011", "GIBATCH_PASSWORD"),
    ("https://hunter2@example.org/ast80011", "must not hold credentials"),
    ("ftp://example.org/ast80011", "http:// or https://"),
    ("file:///etc/passwd", "http:// or https://"),
    ("me:hunter2@example.org", "http:// or https://"),
    ("http:///ast80011", "has no host"),
    ("http://example.org:99999/", "is not a valid URL"),
    ("http://example.org/a\nb", "control characters"),
])
def test_bad_server_url_is_a_usage_error(tmp_path: Path, url: str, expected: str) -> None:
    jobs = tmp_path / "jobs"
    write_base(jobs / "1")
    for command in ("run", "plan"):
        code, text = invoke(command, "--jobs", str(jobs), "--server", url, "--username", "me",
                            env={"GIBATCH_PASSWORD": "hunter2"})
        assert code == 2, text
        assert expected in text
        assert "hunter2" not in text  # the URL is never echoed
    assert not (jobs / ".gibatch").exists()  # nothing stored, no journal opened


# -- report: a corrupt image costs its own thumbnail only

def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))


def bomb(path: Path) -> None:
    """A small PNG claiming to be 100,000 x 100,000 pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
                     + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


def valid_png(path: Path) -> None:
    Image.new("RGB", (50, 40), "red").save(path)


def truncated_png(path: Path) -> None:
    valid_png(path)
    path.write_bytes(path.read_bytes()[:60])


CORRUPT_IMAGES: dict[str, Callable[[Path], object]] = {
    "garbage": lambda p: p.write_bytes(b"not an image at all"),
    "empty": lambda p: p.write_bytes(b""),
    "truncated": truncated_png,
    "bomb": bomb,
    "fifo": lambda p: os.mkfifo(p),
    "dangling": lambda p: p.symlink_to("nowhere.png"),
}


@pytest.mark.parametrize("kind", list(CORRUPT_IMAGES))
def test_report_shows_a_placeholder_for_a_corrupt_image(
        tmp_path: Path, kind: str, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "jobs"
    folder = write_base(root / "1")
    for section in ("Plot 1", "Plot 2"):
        (folder / "output" / section).mkdir(parents=True)
    CORRUPT_IMAGES[kind](folder / "output" / "Plot 1" / "final.png")
    valid_png(folder / "output" / "Plot 2" / "final.png")
    sweep = load_sweep(root)
    status = SweepStatus([JobStatus("1", JobState.COMPLETE)], [], None, None, 0)

    result = build_report(sweep, status)

    assert result.rows == 1 and result.thumbnails == 2 and result.sheet is not None
    thumbs = sorted((root / ".gibatch" / "report").glob("*.png"))
    sizes = []
    for thumb in thumbs:
        with Image.open(thumb) as image:
            sizes.append(image.size)
    assert sizes[0] == (THUMB_PX, THUMB_PX)  # the placeholder
    assert sizes[1] == (50, 40)  # the good image beside it is untouched
    assert "cannot read the image" in caplog.text and "shown as a placeholder" in caplog.text


# -- properties: whatever bytes a job file holds, only Problems come out

def json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers() | st.floats()
               | st.text(max_size=20))
    return st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                        | st.dictionaries(st.text(max_size=8), children, max_size=4),
                        max_leaves=20)


def on_one_visible_line(text: str) -> bool:
    """Nothing in `text` breaks, hides or forges a line (spaces of any script are fine)."""
    return all(c.isprintable() or unicodedata.category(c) == "Zs" for c in text)


def assert_only_problems(folder: Path) -> None:
    try:
        job = load_job(folder)
    except JobInvalid as exc:
        assert exc.problems
        for problem in exc.problems:
            line = str(problem)
            assert line.startswith(f"{folder.name}/merge.json: ") and on_one_visible_line(line)
    else:
        assert isinstance(job, Job)


# Derandomized and without an example database: the same examples on every run.
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(data=st.binary(max_size=200) | json_values().map(lambda v: json.dumps(v).encode()))
def test_any_bytes_in_a_job_file_give_problems_not_exceptions(
        tmp_path: Path, data: bytes) -> None:
    folder = tmp_path / "job"
    if not folder.exists():
        write_base(folder)
    (folder / "merge.json").write_bytes(data)
    assert_only_problems(folder)


@PROPERTY
@given(key=st.sampled_from(["length_scale", "position_galaxy_2", "theta_galaxy_2", "new"]),
       inner=st.sampled_from([None, "galaxy_1", "x", "vx"]), value=json_values())
def test_any_value_in_a_valid_job_gives_problems_not_exceptions(
        tmp_path: Path, key: str, inner: str | None, value: Any) -> None:
    folder = tmp_path / "job"
    if not folder.exists():
        write_base(folder)
    merge: dict[str, Any] = json.loads(json.dumps(MERGE))
    if inner is not None and isinstance(merge.get(key), dict):
        merge[key][inner] = value
    else:
        merge[key] = value
    (folder / "merge.json").write_text(json.dumps(merge))
    assert_only_problems(folder)


def test_printable_escapes_only_what_could_forge_or_hide_output() -> None:
    assert printable("Größe 日本 ok") == "Größe 日本 ok"
    assert printable("a\nb\r\x1b[31m\u202e\u2028\udcff") == \
        "a\\nb\\r\\x1b[31m\\u202e\\u2028\\udcff"


@PROPERTY
@given(text=st.text(max_size=30))
def test_printable_leaves_nothing_that_breaks_a_line(text: str) -> None:
    shown = printable(text)
    assert on_one_visible_line(shown)
    assert shown == text or "\\" in shown


def test_log_lines_and_reasons_show_names_escaped(caplog: pytest.LogCaptureFixture) -> None:
    """A job name or a site's words in a log argument never forge a line; a traceback,
    given as exc_info, keeps its own lines."""
    logger = logging.getLogger("gibatch.test-escape")
    logger.addFilter(EscapeArgs())
    with caplog.at_level(logging.INFO, logger="gibatch.test-escape"):
        logger.info("job-start job %s", "a\nERROR forged\x1b[2J")
        try:
            raise ValueError("boom")
        except ValueError as exc:
            logger.error("internal error in job %s", "b\r", exc_info=exc)
    first, second = caplog.records
    assert first.getMessage() == "job-start job a\\nERROR forged\\x1b[2J"
    assert second.getMessage() == "internal error in job b\\r"
    assert "Traceback" in caplog.text and "\nValueError: boom" in caplog.text
    assert first_line("internal error: X\nTraceback...") == \
        "internal error: X (details in the journal)"
    assert first_line("one\x07line") == "one\\x07line"


@pytest.mark.parametrize("command", ["check", "plan", "status", "report", "run"])
def test_a_jobs_folder_that_cannot_be_listed_is_one_clear_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    root = tmp_path / "jobs"
    write_base(root / "good")
    real_listdir, real_scandir = os.listdir, os.scandir

    def denied(path: object) -> OSError:
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def listdir(path: Any = ".") -> list[str]:
        if Path(path) == root:
            raise denied(path)
        return real_listdir(path)

    def scandir(path: Any = ".") -> Any:
        if Path(path) == root:
            raise denied(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "scandir", scandir)
    code, text = invoke(command, "--jobs", str(root))
    assert code == 1
    assert f"cannot list {root}: Permission denied" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("command", ["check", "plan", "status", "report", "run"])
def test_a_jobs_path_that_is_a_file_says_so(tmp_path: Path, command: str) -> None:
    (tmp_path / "jobs").write_text("not a folder")
    code, text = invoke(command, "--jobs", str(tmp_path / "jobs"))
    assert code != 0 and "is not a folder" in text


@pytest.mark.timeout(30)
def test_sweep_reads_only_the_base_jobs_own_regular_files(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base")
    os.mkfifo(base / "notes.json")  # not a job file: never opened (a FIFO would hang)
    code, text = invoke("sweep", str(base), "--out", str(tmp_path / "out"),
                        "--vary", "interact.mass_2=1,2")
    assert code == 0, text
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == [
        "001-mass_2_1", "002-mass_2_2"]
    bad = write_base(tmp_path / "bad")
    (bad / "merge.json").unlink()
    os.mkfifo(bad / "merge.json")
    code, text = invoke("sweep", str(bad), "--out", str(tmp_path / "out2"),
                        "--vary", "interact.mass_2=1,2")
    assert code != 0 and "merge.json" in text and "not a regular file" in text
    assert "Traceback" not in text


def test_status_names_twenty_invalid_jobs_and_counts_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    for k in range(25):
        (write_base(root / f"bad{k:02d}") / "merge.json").unlink()
    write_base(root / "good")
    code, text = invoke("status", "--jobs", str(root))
    assert code == 0, text
    assert "1 pending" in text and "25 invalid" in text
    lines = [line for line in text.splitlines() if line.startswith("invalid: ")]
    assert len(lines) == 21
    assert lines[0] == "invalid: bad00: bad00/merge.json: file is missing"
    assert lines[-1] == ("invalid: ... and 5 more (all of them in `gibatch report` and "
                         "`gibatch check`)")
