# ruff: noqa: F811  (`serve` is a fixture imported from test_hostile_server)
"""The site client against answers that are odd rather than broken, found by review 7:
a page charset that is no text encoding, POST answers of the wrong kind of JSON (or
JSON nested past the recursion limit), numbers that look like digits but are not ASCII
or do not fit 64 bits, a 206 to a request that asked for no range, and file answers
with a Content-Encoding. Tiny aiohttp servers on 127.0.0.1, as in
test_hostile_server.py (whose fixtures are reused); each test failed before its fix."""

from __future__ import annotations

import gzip
import os
import random
import secrets
import threading
import traceback
import unicodedata
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import anyio
import pytest
from aiohttp import web

from gibatch import site, steps
from gibatch.errors import LoginFailed, ProtocolError, RequestRejected, TransferError
from gibatch.sim import pages as sim_pages
from gibatch.site import RemoteFile, SiteClient, TaskRow, parse_sections, parse_task_rows
from gibatch.transfer import PART_SUFFIX, FileRecord, fetch, local_files
from tests.conftest import FAST_RETRY
from tests.test_hostile_server import (  # noqa: F401  (serve is a fixture)
    JOBS_TABLE,
    PREFIX,
    Handler,
    Serve,
    logged_in,
    login_routes,
    serve,
)

pytestmark = pytest.mark.anyio
TASK_PAGE = '<script>window.CSRF_TOKEN = "tok";</script>'
FILE = secrets.token_bytes(2000)


async def _client(serve: Serve, routes: dict[str, Handler]) -> SiteClient:
    return await logged_in(await serve({**login_routes(), **routes}))


# 5. A charset is the site's word: `base64`, `rot13` pass codecs.lookup but bytes.decode
#    raises LookupError; `idna`, `undefined` raise UnicodeError even with "replace".

@pytest.mark.parametrize("charset", ["base64", "rot13", "zlib", "idna", "undefined"])
async def test_a_page_in_a_charset_that_is_no_text_encoding_is_read_as_utf8(
        serve: Serve, charset: str) -> None:
    async def jobs(request: web.Request) -> web.StreamResponse:
        return web.Response(body=JOBS_TABLE.encode(),
                            headers={"Content-Type": f"text/html; charset={charset}"})

    client = await _client(serve, {f"{PREFIX}/gi/view_jobs/": jobs})
    try:
        (row,) = await client.tasks()
    finally:
        await client.__aexit__(None, None, None)
    assert (row.job_id, row.model, row.status) == (1, 1, "Completed")


def _post_site(answer: Callable[[web.Request], Awaitable[web.StreamResponse]]
               ) -> dict[str, Handler]:
    async def page(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            return await answer(request)
        return web.Response(text=TASK_PAGE, content_type="text/html")
    return {f"{PREFIX}/gi/galactic": page}


async def _submit(serve: Serve,
                  answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> int | None:
    client = await _client(serve, _post_site(answer))
    try:
        return await client.submit(steps.GALAXY1, 1, {"galaxy_number": 1})
    finally:
        await client.__aexit__(None, None, None)


async def test_an_accepted_post_in_a_charset_that_is_no_text_encoding_is_accepted(
        serve: Serve) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b'{"job_id": 7}',
                            headers={"Content-Type": "application/json; charset=rot13"})
    assert await _submit(serve, answer) == 7


async def test_an_accepted_post_with_json_nested_past_the_recursion_limit_is_accepted(
        serve: Serve) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text="[" * 100_000)
    assert await _submit(serve, answer) is None


async def test_an_accepted_post_whose_answer_breaks_off_is_accepted(serve: Serve) -> None:
    """200 is acceptance: a body cut short after it is no reason to doubt the task."""
    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        await resp.write(b'{"job_id": ')
        assert request.transport is not None
        request.transport.close()
        return resp
    assert await _submit(serve, answer) is None


async def test_a_refused_post_with_json_nested_past_the_recursion_limit_is_a_refusal(
        serve: Serve) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(status=400, text='{"error":' + "[" * 100_000)
    with pytest.raises(RequestRejected) as caught:
        await _submit(serve, answer)
    assert caught.value.status == 400


@pytest.mark.parametrize("job_id", ["true", "false", "1.0", "0", "-3", str(2**63), '"7"'])
async def test_a_post_answer_job_id_that_is_no_task_id_is_ignored(
        serve: Serve, job_id: str) -> None:
    """`true` was taken as task 1 (bool is an int, True == 1)."""
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text=f'{{"job_id": {job_id}}}', content_type="application/json")
    got = await _submit(serve, answer)
    assert got is None, f"{job_id} taken for task {got!r}"


async def test_the_answers_json_is_parsed_only_when_small(serve: Serve) -> None:
    """A big answer is not parsed on the event loop at all (a job id fits in a line)."""
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.Response(text='{"job_id": 7, "pad": "' + "x" * 100_000 + '"}')
    assert await _submit(serve, answer) is None


# 8. A 206 declares itself a part: taken as the whole file only if no Range was sent
#    and no size listed (the real site's listing), it was saved and recorded as whole.

async def _fetch(serve: Serve, handler: Handler, tmp_path: Path, size: int | None = None,
                 name: str = "x.gif") -> FileRecord:
    client = await _client(serve, {f"{PREFIX}/media/{name}": handler})
    url = client.base.rstrip("/") + f"/media/{name}"
    try:
        return await fetch(client, RemoteFile(name, url, size), tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)


@pytest.mark.parametrize("status", [206, 204, 203])
async def test_an_answer_other_than_200_to_a_request_for_the_whole_file_is_refused(
        serve: Serve, tmp_path: Path, status: int) -> None:
    async def part(request: web.Request) -> web.StreamResponse:
        assert "Range" not in request.headers
        return web.Response(status=status, body=FILE[1000:2000] if status != 204 else None,
                            headers={"Content-Range": "bytes 1000-1999/5000"})

    with pytest.raises(TransferError, match=f"answered {status}"):
        await _fetch(serve, part, tmp_path)
    assert not (tmp_path / "x.gif").exists()


async def test_a_resumed_answer_of_less_than_asked_is_completed_from_its_total(
        serve: Serve, tmp_path: Path) -> None:
    """No listed size: a 206 carrying `bytes 500-999/2000` is 500 bytes of 2000, not the
    rest of the file (`offset + Content-Length` said 1000, and 1000 bytes were kept)."""
    async def pieces(request: web.Request) -> web.StreamResponse:
        ranged = request.headers.get("Range", "")
        if not ranged:  # the whole file announced, 500 bytes sent, then the line drops
            resp = web.StreamResponse(headers={"Content-Length": str(len(FILE))})
            await resp.prepare(request)
            await resp.write(FILE[:500])
            assert request.transport is not None
            request.transport.close()
            return resp
        start = int(ranged.removeprefix("bytes=").rstrip("-"))
        end = min(start + 500, len(FILE))  # at most 500 bytes an answer
        return web.Response(status=206, body=FILE[start:end], headers={
            "Content-Range": f"bytes {start}-{end - 1}/{len(FILE)}"})

    record = await _fetch(serve, pieces, tmp_path)
    assert (tmp_path / "x.gif").read_bytes() == FILE and record.size == len(FILE)


async def test_a_resumed_answer_of_another_total_than_listed_starts_over(
        serve: Serve, tmp_path: Path) -> None:
    """The file changed on the site between the attempts: its prefix is not kept."""
    asked: list[str] = []

    async def changed(request: web.Request) -> web.StreamResponse:
        ranged = request.headers.get("Range", "")
        asked.append(ranged)
        if ranged:
            start = int(ranged.removeprefix("bytes=").rstrip("-"))
            return web.Response(status=206, body=FILE[start:], headers={
                "Content-Range": f"bytes {start}-{len(FILE) - 1}/{len(FILE) + 1}"})
        return web.Response(body=FILE)

    (tmp_path / ("x.gif" + PART_SUFFIX)).write_bytes(b"\0" * 500)
    record = await _fetch(serve, changed, tmp_path, size=len(FILE))
    assert asked == ["bytes=500-", ""]
    assert (tmp_path / "x.gif").read_bytes() == FILE and record.size == len(FILE)


# 9. Numbers in the site's pages: `'²'.isdigit()` is True but int('²') raises ValueError
#    (one such size cell, even in a foreign section, broke the model's listing), and a
#    task id past 2**63-1 crashed the journal (SQLite INTEGER) at every poll.

def test_a_size_cell_that_is_no_ascii_number_is_no_size() -> None:
    page = ("<h3>Plot 3 - Status: Completed</h3><table>"
            "<tr><td><a href='/b/x.gif'>x.gif</a></td><td>\u00b2</td></tr>"
            "<tr><td><a href='/b/y.gif'>y.gif</a></td><td>\u0661\u0662</td></tr>"
            f"<tr><td><a href='/b/z.gif'>z.gif</a></td><td>{2**64}</td></tr></table>"
            "<h3>Galaxy 1 - Status: Completed</h3><table><tr><td><a href='/b/g.csv'>g.csv"
            "</a></td><td>12</td></tr></table>")
    plot, galaxy = parse_sections(page, "http://127.0.0.1:9/b/gi/view_data/1/")
    assert [(f.name, f.size) for f in plot.files] == [
        ("x.gif", None), ("y.gif", None), ("z.gif", None)]
    assert [(f.name, f.size) for f in galaxy.files] == [("g.csv", 12)]


def test_a_task_row_whose_id_or_model_is_no_ascii_number_below_2_63_is_left_out() -> None:
    rows = "".join(f"<tr><td>{job_id}</td><td>Galaxy 1</td><td>{model}</td>"
                   "<td>Completed</td></tr>"
                   for job_id, model in [(2**64, 1), ("\u00b2", 1), (3, "\u0661"),
                                         (2**63 - 1, 2), (10**18 - 1, 1), (5, 1)])
    got = parse_task_rows("<table><tr><th>ID</th><th>Job Type</th><th>Model</th>"
                          f"<th>Status</th></tr>{rows}</table>")
    assert [(r.job_id, r.model) for r in got] == [(5, 1), (10**18 - 1, 1)]
    assert all(r.job_id < 2**63 for r in got)


# 7. Downloads asked for gzip (aiohttp's default Accept-Encoding) and inflated what came:
#    a proxy compressing on the fly answers chunked with no length (and the real site
#    lists no size: every CSV refused for ever), and a `.gz` labelled
#    `Content-Encoding: gzip` was inflated to other bytes than the listed file's.

CSV = b"particles type, x, y, z\n" * 5000


async def _chunked(request: web.Request, body: bytes, *, status: int = 200,
                   headers: dict[str, str] | None = None, cut: bool = False
                   ) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers=headers)
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    await resp.write(body)
    if cut:  # the connection drops before the terminating chunk
        assert request.transport is not None
        request.transport.close()
    else:
        await resp.write_eof()
    return resp


async def test_a_file_is_asked_for_and_kept_as_stored(serve: Serve, tmp_path: Path) -> None:
    """Compressed only if asked for (as a proxy does): the file as it is, chunked."""
    asked: list[str] = []

    async def proxy(request: web.Request) -> web.StreamResponse:
        asked.append(request.headers.get("Accept-Encoding", ""))
        if "gzip" in asked[-1]:
            return await _chunked(request, gzip.compress(CSV),
                                  headers={"Content-Encoding": "gzip"})
        return await _chunked(request, CSV)

    record = await _fetch(serve, proxy, tmp_path, name="a.csv")
    assert asked == ["identity"]
    assert (tmp_path / "a.csv").read_bytes() == CSV and record.size == len(CSV)


@pytest.mark.parametrize("listed", [True, False])
async def test_a_gz_file_served_with_content_encoding_gzip_is_kept_as_listed(
        serve: Serve, tmp_path: Path, listed: bool) -> None:
    stored = gzip.compress(CSV)

    async def labelled(request: web.Request) -> web.StreamResponse:
        return web.Response(body=stored, headers={"Content-Encoding": "gzip"})

    record = await _fetch(serve, labelled, tmp_path, size=len(stored) if listed else None,
                          name="_output_ascii.csv.gz")
    assert (tmp_path / "_output_ascii.csv.gz").read_bytes() == stored
    assert record.size == len(stored)


async def test_a_chunked_answer_cut_before_its_end_is_resumed_not_taken_whole(
        serve: Serve, tmp_path: Path) -> None:
    big = secrets.token_bytes(3 << 20)  # more than one write batch: the writer thread
    asked: list[str] = []

    async def cut_once(request: web.Request) -> web.StreamResponse:
        ranged = request.headers.get("Range", "")
        asked.append(ranged)
        if not ranged:
            return await _chunked(request, big[:(1 << 20) + 5], cut=True)
        start = int(ranged.removeprefix("bytes=").rstrip("-"))
        return await _chunked(request, big[start:], status=206,
                              headers={"Content-Range": f"bytes {start}-{len(big) - 1}/*"})

    record = await _fetch(serve, cut_once, tmp_path)
    assert asked[0] == "" and len(asked) == 2 and asked[1].startswith("bytes=")
    assert (tmp_path / "x.gif").read_bytes() == big and record.size == len(big)


# 14. A file listed twice in one section (two links of the same text) got one local name,
#     so one of them was never saved while the job was recorded complete; names equal
#     once Unicode-normalised (`café` NFC and NFD) were "distinct", yet one file on macOS.

def test_every_listed_file_gets_its_own_local_name() -> None:
    nfc, nfd = (unicodedata.normalize(form, "café.gif") for form in ("NFC", "NFD"))
    listed = [RemoteFile("a.gif", "u1", None), RemoteFile("a.gif", "u2", None),
              RemoteFile("A.GIF", "u3", None), RemoteFile(nfc, "u4", None),
              RemoteFile(nfd, "u5", None), RemoteFile("CAFE\u0301.gif", "u6", None)]
    got = local_files(listed)
    assert [remote for remote, _ in got] == listed
    assert [local for _, local in got] == [
        "a.gif", "a~2.gif", "A~3.GIF", nfc, f"{nfd[:-4]}~2.gif", "CAFE\u0301~3.gif"]


async def test_a_file_listed_twice_is_saved_twice(serve: Serve, tmp_path: Path) -> None:
    first, second = secrets.token_bytes(100), secrets.token_bytes(200)

    async def one(request: web.Request) -> web.StreamResponse:
        return web.Response(body=first)

    async def two(request: web.Request) -> web.StreamResponse:
        return web.Response(body=second)

    client = await _client(serve, {f"{PREFIX}/media/1/a.gif": one,
                                   f"{PREFIX}/media/2/a.gif": two})
    base = client.base.rstrip("/")
    listed = [RemoteFile("a.gif", f"{base}/media/{n}/a.gif", None) for n in (1, 2)]
    try:
        records = [await fetch(client, remote, tmp_path, anyio.Semaphore(1), local)
                   for remote, local in local_files(listed)]
    finally:
        await client.__aexit__(None, None, None)
    assert [(r.name, r.size) for r in records] == [("a.gif", 100), ("a~2.gif", 200)]
    assert (tmp_path / "a.gif").read_bytes() == first
    assert (tmp_path / "a~2.gif").read_bytes() == second


# 6. view_jobs grows with the account's whole history (100,000 tasks are 11 MB): parsed
#    on the event loop, each poll stalled every download, timer and poll for seconds.

def _jobs_page(n: int, first: int = 1) -> str:
    rows = "".join(f"<tr><td>{i}</td><td>Galaxy Interaction</td><td>{i % 4 + 1}</td>"
                   f"<td>Completed</td><td>2026-12-02T00:00:00+00:00</td></tr>"
                   for i in range(first, first + n))
    return ("<html><body><table><thead><tr><th>Job ID</th><th>Job Type</th>"
            "<th>Model Number</th><th>Status</th><th>Submitted</th></tr></thead>"
            f"<tbody>{rows}</tbody></table></body></html>")


@pytest.mark.parametrize("rows", [10, 2000])
async def test_a_long_task_list_is_parsed_off_the_event_loop(
        serve: Serve, monkeypatch: pytest.MonkeyPatch, rows: int) -> None:
    page = _jobs_page(rows)
    threads: list[int] = []

    def parse(html: str) -> list[TaskRow]:
        threads.append(threading.get_ident())
        return parse_task_rows(html)

    async def jobs(request: web.Request) -> web.StreamResponse:
        return web.Response(text=page, content_type="text/html")

    monkeypatch.setattr(site, "parse_task_rows", parse)
    client = await _client(serve, {f"{PREFIX}/gi/view_jobs/": jobs})
    try:
        got = await client.tasks()
    finally:
        await client.__aexit__(None, None, None)
    assert [r.job_id for r in got] == list(range(1, rows + 1))
    on_loop = threads == [threading.get_ident()]
    assert on_loop == (len(page) <= site.PARSE_ON_LOOP_CHARS), (len(page), on_loop)


# ... and read at C speed when the table is plain (the site's own): the same rows as
# html.parser gives, or html.parser itself for anything else in the table.

HEADER = ("<tr><th>Job ID</th><th>Job Type</th><th>Model Number</th><th>Status</th>"
          "<th>Submitted</th></tr>")
ROW = "<tr><td>{}</td><td>Galaxy 1</td><td>2</td><td>Completed</td><td>t</td></tr>"
PLAIN_TABLES = {
    "the local site's": sim_pages.page("Jobs", f"<table><thead>{HEADER}</thead><tbody>"
                                       + ROW.format(3) + ROW.format(1) + "</tbody></table>"),
    "a Django template's": (
        "<!DOCTYPE html>\n<html><head><script>var t = '<table><tr><td>9</td>';</script>"
        "<!-- <table> --></head><body>\n  <table class=\"table table-striped\" id='jobs'>\n"
        "    <thead>\n      <tr class=\"head\">\n        <th scope=\"col\">Job ID</th>\n"
        "        <th>Job Type</th><th>Model</th>\n <th>Status</th>\n      </tr>\n    </thead>\n"
        "    <tbody>\n" + "".join(
            f"      <tr>\n        <td>{i}</td>\n        <td>Galaxy &amp; Merge</td>\n"
            f"        <td>{i % 3 + 1}</td>\n        <td> Running </td>\n      </TR>\n"
            for i in range(5, 0, -1)) + "    </tbody>\n  </table>\n</body></html>"),
    "cells with inline tags": (
        f"<table>{HEADER}<tr><td><a href='/gi/view_data/1/'>1</a></td><td>G<br>&amp;<b>&a"
        "</b>mp;</td><td><span>2</span></td><td><span class=\"badge ok\">Completed</span>"
        "</td></tr></table>"),
    "no thead, upper case, extra and missing cells": (
        "<TABLE><TR><TH>ID</TH><TH>Job Type</TH><TH>Model</TH><TH>Status</TH></TR>"
        "<TR><TD>1</TD><TD>Galaxy 1</TD><TD>1</TD><TD>Failed</TD><TD>x</TD><TD>y</TD></TR>"
        "<TR><TD>2</TD><TD>Galaxy 1</TD><TD>1</TD></TR><TR></TR>"
        "<TR><TD>&#51;</TD><TD>Plot</TD><TD>\u00b2</TD><TD>Queued</TD></TR>"
        "<TR><TH>4</TH><TD>Plot</TD><TD>1</TD><TD>Queued</TD></TR></TABLE>"),
    "a layout table first": f"<table><tr><td>menu</td></tr></table><table>{HEADER}"
                            + ROW.format(1) + "</table>",
    "the table in a comment first": f"<!-- <table>{HEADER}{ROW.format(8)}</table> -->"
                                    f"<table>{HEADER}{ROW.format(1)}</table>",
    "the table in an attribute": f"<div title='<table>'></div><table>{HEADER}"
                                 + ROW.format(1) + "</table>",
}
OTHER_TABLES = {
    "a cell with a div": f"<table>{HEADER}<tr><td><div>1</div></td><td>G</td><td>1</td>"
                         "<td>Completed</td></tr></table>",
    "a comment in the table": f"<table>{HEADER}<!-- <tr><td>7</td> -->"
                              + ROW.format(1) + "</table>",
    "a cell left open": f"<table>{HEADER}<tr><td>1<td>G<td>1<td>Completed</tr></table>",
    "a self-closed cell": f"<table>{HEADER}<tr><td/><td>1</td><td>G</td><td>1</td>"
                          "<td>Completed</td></tr></table>",
    "a quoted >": f"<table>{HEADER}<tr><td title='a>b'>1</td><td>G</td><td>1</td>"
                  "<td>Done</td></tr></table>",
    "a table nested in a cell": f"<table>{HEADER}<tr><td><table><tr><td>5</td></tr></table>"
                                "</td></tr>" + ROW.format(1) + "</table>",
    "a header of td cells": "<table><tr><td>Job Type</td></tr>" + ROW.format(1) + "</table>",
    "no end of the table": f"<table>{HEADER}{ROW.format(1)}",
    "no task table": "<table><tr><td>1</td></tr></table>",
    # not tags for html.parser (a name starts with an ASCII letter), though a Unicode
    # case-insensitive match folds them to <i> and <span>
    "a dotless-i 'tag'": f"<table>{HEADER}<tr><td><\u0131>7</\u0131></td><td>G</td><td>1</td>"
                         "<td>Running</td></tr></table>",
    "a long-s 'span'": f"<table>{HEADER}<tr><td>7<\u017fpan></td><td>G</td><td>1</td>"
                       "<td>Running</td></tr></table>",
}


def _slowly(page: str) -> list[TaskRow] | str:
    """parse_task_rows by html.parser alone (a ProtocolError as its message)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(site, "_plain_task_table", lambda html: None)
        try:
            return parse_task_rows(page)
        except ProtocolError as exc:
            return str(exc)


def _quickly(page: str) -> list[TaskRow] | str:
    try:
        return parse_task_rows(page)
    except ProtocolError as exc:
        return str(exc)


@pytest.mark.parametrize("name", PLAIN_TABLES)
def test_a_plain_task_table_is_read_without_html_parser(name: str) -> None:
    page = PLAIN_TABLES[name]
    assert site._plain_task_table(page) is not None
    assert _quickly(page) == _slowly(page) and _slowly(page)


@pytest.mark.parametrize("name", OTHER_TABLES)
def test_any_other_table_is_read_by_html_parser(name: str) -> None:
    page = OTHER_TABLES[name]
    assert site._plain_task_table(page) is None
    assert _quickly(page) == _slowly(page)


def test_a_long_plain_table_is_read_in_pieces_as_html_parser_reads_it() -> None:
    page = _jobs_page(2500).replace("<td>Completed</td>", "<td>Completed &amp; <b>kept</b></td>")
    assert len(page) > 2 * site._PIECE_CHARS
    assert site._plain_task_table(page) is not None
    assert _quickly(page) == _slowly(page) and len(_slowly(page)) == 2500


@pytest.mark.parametrize("piece_chars", [1 << 17, 30])
def test_any_mix_of_table_pieces_reads_as_html_parser_reads_it(
        monkeypatch: pytest.MonkeyPatch, piece_chars: int) -> None:
    """Pages made of random pieces: whichever way a page is read, the same rows (read
    in pieces of a row or so each, too)."""
    monkeypatch.setattr(site, "_PIECE_CHARS", piece_chars)
    pieces = ["<table>", "</table>", "<thead>", "</thead>", "<tbody>", "</tbody>", "<tr>",
              "</tr>", "<td>", "</td>", "<th>", "</th>", "<TD class='a b'>", "<td/>", "1",
              " 2 ", "Job Type", "&amp;", "&#50;", "\u00b2", "<!--", "-->", "<b>", "</b>",
              "<script>", "</script>", "\n", "<td x=\"y>z\">", "<tr/>", "</table >",
              "<span class='s'>", "</span>", "<br>", "<br/>", "<a href=\"/x\">", "</a>",
              "<div>", "<TR class=r>", "&am", "p;",
              HEADER, ROW.format(7)]
    rng = random.Random(7)
    quick = 0
    for _ in range(1000):
        page = "".join(rng.choices(pieces, k=rng.randint(1, 40)))
        if rng.random() < 0.7:
            page = "<table>" + HEADER + page
        quick += site._plain_task_table(page) is not None
        assert _quickly(page) == _slowly(page), page
    assert quick > 20  # the fast path was put to the test


# 3. A password of bytes that are not UTF-8 ($GIBATCH_PASSWORD from a latin-1 file):
#    aiohttp's FormData raised a TypeError holding the password, and that traceback
#    reached the terminal. Nothing but a GibatchError leaves login(), with only the
#    type of anything else.

SECRET = os.fsdecode(b"Hunter2-\xe9t\xe9")


def _shown(exc: BaseException) -> str:
    """All a traceback of `exc` would show, chained exceptions included."""
    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_a_password_that_is_not_utf8_is_a_clear_error_naming_it_not(
        serve: Serve) -> None:
    site_ = await serve(login_routes())
    client = SiteClient(site_.url + PREFIX, "alice", SECRET, retry=FAST_RETRY)
    async with client:
        with pytest.raises(LoginFailed, match="password is not UTF-8") as caught:
            await client.login()
    shown = _shown(caught.value)
    assert SECRET not in shown and "Hunter2" not in shown and "\\udce9" not in shown
    assert site_.seen.paths() == []  # nothing sent


async def test_an_unexpected_error_in_the_login_shows_only_its_type(
        serve: Serve, monkeypatch: pytest.MonkeyPatch) -> None:
    def add_field(self: aiohttp.FormData, name: str, value: object, **kw: object) -> None:
        raise ValueError(f"Can not serialize value {value!r}")

    monkeypatch.setattr(aiohttp.FormData, "add_field", add_field)
    site_ = await serve(login_routes())
    client = SiteClient(site_.url + PREFIX, "alice", "Hunter2-secret", retry=FAST_RETRY)
    async with client:
        with pytest.raises(LoginFailed, match="ValueError") as caught:
            await client.login()
    assert "Hunter2" not in _shown(caught.value)
