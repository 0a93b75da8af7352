# ruff: noqa: F811  (`serve` is a fixture imported from test_hostile_server)
"""A hostile site or file host, found by an adversarial review: the session never
follows a redirect to another origin, no local name is taken for a partial download,
pages are bounded and read whatever their bytes, malformed and unrequestable links fail
one file (not the listing, not after 30 minutes of retries), a resumed download checks
where the site resumed, a trickle counts as a stall, and the site's text reaches the
terminal escaped. Tiny aiohttp servers on 127.0.0.1, as in test_hostile_server.py (whose
fixtures are reused); each test failed before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from gibatch.errors import GibatchError, PermanentError, TransferError, TransientError
from gibatch.site import RemoteFile, RetryPolicy, SiteClient, Timeouts, parse_sections
from gibatch.transfer import PART_SUFFIX, fetch, local_files, safe_name
from tests.test_hostile_server import (  # noqa: F401  (serve is a fixture)
    BODY,
    JOBS_TABLE,
    PREFIX,
    Serve,
    logged_in,
    login_routes,
    serve,
)

pytestmark = pytest.mark.anyio


# 1. The login page's GET follows redirects on its own (aiohttp's default), with the
#    site's cookie jar: cookies are scoped by host, not port or scheme, so the session
#    goes to another origin on the same host (another port, or plain http from https).

async def test_relogin_redirect_never_carries_the_session_to_another_origin(
        serve: Serve) -> None:
    async def hello(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<p>hello</p>", content_type="text/html")

    elsewhere = await serve({"/": hello})
    moved = {"on": False}
    plain = login_routes()
    form = plain[f"{PREFIX}/accounts/login/"]

    async def login(request: web.Request) -> web.StreamResponse:
        if request.method == "GET" and moved["on"]:
            raise web.HTTPFound(f"{elsewhere.url}/")  # same host, another port
        return await form(request)

    site = await serve({**plain, f"{PREFIX}/accounts/login/": login})
    client = await logged_in(site)  # the jar now holds sessionid=s3cret-session
    try:
        moved["on"] = True
        with contextlib.suppress(GibatchError):
            await client.login()  # the session expired: log in again
    finally:
        await client.__aexit__(None, None, None)
    assert elsewhere.seen.credentials() == []


# 2. safe_name truncates *after* its `.part` check: a long name can end in `.part`,
#    which prune() deletes right before the completion record is written (the job is
#    reported complete with a file missing), and which is another file's `.part`.

def test_a_truncated_name_never_ends_in_part() -> None:
    stem = "A" * 195
    remote = stem + ".part" + "-of-the-movie.gif"
    local = safe_name(remote)
    assert not local.endswith(PART_SUFFIX), local


def test_no_local_name_is_another_files_partial_download() -> None:
    stem = "A" * 195
    names = local_files(RemoteFile(n, "", None) for n in [stem, stem + ".part" + "-2.gif"])
    finals = {local for _, local in names}
    parts = {n + PART_SUFFIX for n in finals}
    assert not finals & parts, names


# 3. A malformed link in view_data (any section, even one another task made) raises a
#    bare ValueError from urljoin: not a GibatchError, so the job fails as an "internal
#    error" with a traceback, or the model number is dropped at reconcile.

def test_a_malformed_link_is_a_protocol_error_not_a_crash() -> None:
    page = ("<h3>Plot 3 - Status: Completed</h3><table><tr><td>"
            "<a href='http://[::1/x'>x.gif</a></td></tr></table>"
            "<h3>Galaxy 1 - Status: Completed</h3><table><tr><td>"
            "<a href='/b/media/g.csv'>g.csv</a></td></tr></table>")
    try:
        sections = parse_sections(page, "http://127.0.0.1:9/b/gi/view_data/1/")
    except GibatchError:
        return  # a clear protocol error is fine
    except ValueError as exc:
        pytest.fail(f"bare {exc!r} escapes parse_sections")
    assert any(s.name == "Galaxy 1" for s in sections)


# 4. A page that is not valid in its charset raised UnicodeDecodeError (a ValueError)
#    out of the client: not a GibatchError, so every waiting job failed as a bug. The
#    protocol reads ASCII markers and digits: the bad byte is replaced, the page read.

async def test_an_undecodable_page_is_read_with_the_byte_replaced(serve: Serve) -> None:
    async def jobs(request: web.Request) -> web.StreamResponse:
        body = JOBS_TABLE.replace("Galaxy 1", "Galaxy \xff").encode("latin-1")
        return web.Response(body=body, content_type="text/html", charset="utf-8")

    site = await serve({**login_routes(), f"{PREFIX}/gi/view_jobs/": jobs})
    client = await logged_in(site)
    try:
        (row,) = await client.tasks()
    finally:
        await client.__aexit__(None, None, None)
    assert row.job_type == "Galaxy \ufffd" and row.job_id == 1


# 5. Pages are read whole into memory with no size limit (resp.text()), for as long as
#    the page timeout (90 s) allows: an endless listing exhausts memory. Here 96 MiB
#    of padding after a valid table is read and parsed without complaint.

async def test_an_oversized_page_is_refused(serve: Serve) -> None:
    sent = {"bytes": 0}
    pad = b" " * (1 << 20)

    async def jobs(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/html; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(JOBS_TABLE.encode())
        try:
            for _ in range(96):
                await resp.write(pad)
                sent["bytes"] += len(pad)
        except (ConnectionError, asyncio.CancelledError):
            raise
        await resp.write_eof()
        return resp

    site = await serve({**login_routes(), f"{PREFIX}/gi/view_jobs/": jobs})
    client = await logged_in(site)
    try:
        with pytest.raises(GibatchError):
            await client.tasks()
    finally:
        await client.__aexit__(None, None, None)
    assert sent["bytes"] < 96 << 20


# 6. A file URL aiohttp cannot request (port out of range, backslash in the authority)
#    is translated to NetworkError, a TransientError: retried with backoff for up to
#    give_up_after_s (30 min by default) while the section stays held, instead of
#    failing at once.

async def test_an_invalid_file_url_fails_at_once_not_as_a_network_error(
        serve: Serve, tmp_path: Path) -> None:
    site = await serve(login_routes())
    client = await logged_in(site)
    client.retry = RetryPolicy(base_s=0.05, cap_s=0.2, give_up_after_s=3)
    try:
        with pytest.raises(GibatchError) as caught:
            await fetch(client, RemoteFile("x.gif", "http://127.0.0.1:99999/x.gif", 10),
                        tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    assert isinstance(caught.value, PermanentError), repr(caught.value)
    assert not isinstance(caught.value, TransientError)
    assert client.requests["download"] == 1  # one look, no backoff


# 7. A 206 answer is appended at the local offset without reading its Content-Range:
#    a server (or cache) that answers from another offset leaves a file with a hole
#    of the right size, hashed and recorded as whole.

async def test_a_206_from_another_offset_is_not_taken_as_whole(
        serve: Serve, tmp_path: Path) -> None:
    size = len(BODY)
    kept = 1000

    async def ranged(request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range", "")
        if not rng:
            return web.Response(body=BODY, content_type="application/octet-stream")
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        begin = start + 500 if start == kept else start  # from 500 bytes on, saying so
        return web.Response(status=206, body=BODY[begin:],
                            headers={"Content-Range": f"bytes {begin}-{size - 1}/{size}"},
                            content_type="application/octet-stream")

    site = await serve({**login_routes(), f"{PREFIX}/media/r.bin": ranged})
    (tmp_path / ("r.bin" + PART_SUFFIX)).write_bytes(BODY[:kept])  # an earlier attempt
    client = await logged_in(site)
    try:
        with contextlib.suppress(GibatchError):  # refusing is fine
            await fetch(client, RemoteFile("r.bin", f"{site.url}{PREFIX}/media/r.bin", size),
                        tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    final = tmp_path / "r.bin"
    assert not final.exists() or final.read_bytes() == BODY


# 8. Downloads had only a silence limit (read_s): a file host that trickled a byte just
#    inside it held the download, and the section's reader count that blocks the
#    model's next task, for as long as it liked. Now a stall, retried within the policy.

async def test_a_trickling_file_host_cannot_hold_a_download_forever(
        serve: Serve, tmp_path: Path) -> None:
    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": "1000000"})
        await resp.prepare(request)
        for _ in range(1000):
            await resp.write(b"x")
            await asyncio.sleep(0.2)  # inside read_s below: never "silent"
        return resp

    host = await serve({"/t.bin": trickle})
    site = await serve(login_routes())
    client = SiteClient(site.url + PREFIX, "alice", "pw",
                        retry=RetryPolicy(base_s=0.05, cap_s=0.2, give_up_after_s=3),
                        timeouts=Timeouts(read_s=0.5))  # page/download defaults kept
    await client.__aenter__()
    started = time.monotonic()
    try:
        await client.login()
        with anyio.move_on_after(8), pytest.raises(TransientError, match="stalled"):
            await fetch(client, RemoteFile("t.bin", f"{host.url}/t.bin", 1_000_000),
                        tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    assert time.monotonic() - started < 7.5, "still downloading a byte every 0.2 s"



# 9. Text the server chose reaches the terminal unescaped: the login's redirect target
#    (a Location header may hold ESC) goes into ProtocolError, which `gibatch run`
#    prints as `error: {exc}` (cli.py) without printable(): the server repaints the
#    user's terminal.

_FORM = b'<form><input type="hidden" name="csrfmiddlewaretoken" value="tok"></form>'


async def _raw_site(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)  # answered unread, the client saw a reset and retried
    if head.startswith(b"GET"):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nSet-Cookie: csrftoken=tok;"
                     b" Path=/\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(_FORM)
                     + _FORM)
    else:
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://evil.example/\x1b[2J\x1b[31m"
                     b"PWNED\r\nSet-Cookie: sessionid=s; Path=/\r\nContent-Length: 0\r\n"
                     b"Connection: close\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_server_text_in_a_run_error_is_escaped(tmp_path: Path, anyio_backend: str) -> None:
    import threading

    from typer.testing import CliRunner

    from gibatch.cli import app
    from tests.test_hostile_input import write_base

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(asyncio.start_server(_raw_site, "127.0.0.1", 0))
    port = [server.sockets[0].getsockname()[1]]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    jobs = tmp_path / "jobs"
    write_base(jobs / "1")
    try:
        result = CliRunner().invoke(app, [
            "run", "--jobs", str(jobs), "--models", "1", "--no-live",
            "--server", f"http://127.0.0.1:{port[0]}/ast80011", "--username", "alice"],
            env={"GIBATCH_PASSWORD": "pw", "GIBATCH_LOCK_DIR": str(tmp_path / "locks")},
            color=True)  # as on a terminal: click strips CSI only when it is not one
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.close()
    assert "PWNED" in result.output  # the error was shown ...
    assert "\x1b" not in result.output  # ... but not as escape sequences


# 10. A listed size is the site's word: a file larger than the free disk was written
#     until the disk was full, and that stops the whole run. It fails its job alone.

async def test_a_file_larger_than_the_free_disk_fails_at_once(
        serve: Serve, tmp_path: Path) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BODY, content_type="application/octet-stream")

    site = await serve({**login_routes(), f"{PREFIX}/media/huge.bin": endless})
    client = await logged_in(site)
    try:
        with pytest.raises(TransferError, match="GB free"):
            await fetch(client, RemoteFile("huge.bin", f"{site.url}{PREFIX}/media/huge.bin",
                                           10**18), tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    assert list(tmp_path.iterdir()) == []  # nothing written


# 11. A partial file deleted between the request for its remaining bytes and their
#     writing (a job's partial downloads are dropped when its tasks are about to run
#     again, while an early download of a held section resumed one): the answer's bytes
#     were written from byte 0 of a new file, and the next resume made a file of the
#     listed size with other content, hashed and recorded as whole (CI saw it once).

@pytest.mark.parametrize("size", [1000, 3 << 20], ids=["small", "large"])
async def test_a_partial_file_deleted_while_resumed_starts_over(
        serve: Serve, tmp_path: Path, size: int) -> None:
    body = (BODY * (size // len(BODY) + 1))[:size]

    async def ranged(request: web.Request) -> web.StreamResponse:
        rng = request.headers.get("Range", "")
        if not rng:
            return web.Response(body=body, content_type="application/octet-stream")
        start = int(rng.removeprefix("bytes=").rstrip("-"))
        return web.Response(status=206, body=body[start:],
                            headers={"Content-Range": f"bytes {start}-{size - 1}/{size}"},
                            content_type="application/octet-stream")

    site = await serve({**login_routes(), f"{PREFIX}/media/r.bin": ranged})
    part = tmp_path / ("r.bin" + PART_SUFFIX)
    part.write_bytes(body[:size // 3])  # an earlier attempt's
    client = await logged_in(site)
    real_open = client.open_file

    @contextlib.asynccontextmanager
    async def open_then_drop(url: str, offset: int) -> Any:
        async with real_open(url, offset) as resp:
            part.unlink(missing_ok=True)  # dropped while the answer is on its way
            yield resp

    client.open_file = open_then_drop  # type: ignore[method-assign]
    try:
        got = await fetch(client, RemoteFile("r.bin", f"{site.url}{PREFIX}/media/r.bin", size),
                          tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    assert (tmp_path / "r.bin").read_bytes() == body
    assert got.size == size
