"""gibatch's client against a hostile site: small aiohttp servers on 127.0.0.1.

A "site" on one port and a "file host" on another (cookies are scoped by host, not by
port, so only the client's own origin check keeps the site's session away from it).
The file host records every request's credentials. What must hold:

- files linked on another origin are fetched, and nothing of the site's goes with them
  (no cookie, no CSRF token, no Referer); redirects never carry them across origins;
- a listed size that never matches what is served fails that file after two tries,
  naming the file and both sizes (not fifty downloads in silence);
- a login answered by a redirect loop, or by a redirect to another origin, says so;
- links that are not http(s), or plain http from an https site, are refused unfetched.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from aiohttp import web

from gibatch.errors import AmbiguousSubmit, ProtocolError, RequestRejected, TransferError
from gibatch.site import RemoteFile, SiteClient
from gibatch.steps import plot
from gibatch.transfer import fetch
from tests.conftest import FAST_RETRY

pytestmark = pytest.mark.anyio

PREFIX = "/ast80011"
BODY = secrets.token_bytes(100_000)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Seen:
    """What one server was asked, with the credentials each request carried."""

    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    def credentials(self) -> list[str]:
        sent = []
        for path, headers in self.requests:
            for name in ("Cookie", "X-CSRFToken", "Referer", "Authorization"):
                if name in headers:
                    sent.append(f"{path}: {name}: {headers[name]}")
        return sent

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Server:
    url: str
    seen: Seen

Serve = Callable[[dict[str, Handler]], Awaitable[Server]]

JOBS_TABLE = ("<table><thead><tr><th>ID</th><th>Job Type</th><th>Model</th><th>Status</th>"
              "</tr></thead><tbody><tr><td>1</td><td>Galaxy 1</td><td>1</td>"
              "<td>Completed</td></tr></tbody></table>")


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[dict[str, Handler]], Awaitable[Server]]]:
    """Start aiohttp servers on 127.0.0.1 from {path: handler}; all stopped afterwards."""
    runners: list[web.AppRunner] = []

    async def start(routes: dict[str, Handler]) -> Server:
        seen = Seen()

        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            seen.requests.append((request.path, dict(request.headers)))
            return await handler(request)

        app = web.Application(middlewares=[record])
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return Server(f"http://127.0.0.1:{port}", seen)

    yield start
    for runner in runners:
        await runner.cleanup()


def redirect(location: str, session: str | None = None) -> web.StreamResponse:
    resp = web.Response(status=302, headers={"Location": location})
    if session is not None:
        resp.set_cookie("sessionid", session)
    return resp


def login_routes(after_login: Callable[[web.Request], web.StreamResponse] | None = None
                 ) -> dict[str, Handler]:
    """A Django-like login: a form with a token, then a session cookie and a redirect."""
    async def form(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            if after_login is not None:
                return after_login(request)
            return redirect(f"{PREFIX}/", "s3cret-session")
        resp = web.Response(text='<form><input type="hidden" name="csrfmiddlewaretoken" '
                                 'value="tok123"></form>', content_type="text/html")
        resp.set_cookie("csrftoken", "tok123")
        return resp

    async def home(request: web.Request) -> web.StreamResponse:
        return web.Response(text="<h1>GI Simulator</h1>", content_type="text/html")

    return {f"{PREFIX}/accounts/login/": form, f"{PREFIX}/": home}


async def file_handler(request: web.Request) -> web.StreamResponse:
    return web.Response(body=BODY, content_type="application/octet-stream")


async def logged_in(site: Server) -> SiteClient:
    client = SiteClient(site.url + PREFIX, "alice", "pw", retry=FAST_RETRY)
    await client.__aenter__()
    try:
        await client.login()
    except BaseException:
        await client.__aexit__(None, None, None)
        raise
    return client


async def test_files_on_another_origin_get_no_credentials(
        serve: Callable[[dict[str, Handler]], Awaitable[Server]], tmp_path: Path) -> None:
    host = await serve({"/files/x.bin": file_handler})
    site = await serve({**login_routes(), f"{PREFIX}/media/own.bin": file_handler})
    client = await logged_in(site)
    try:
        foreign = await fetch(client, RemoteFile("x.bin", f"{host.url}/files/x.bin", len(BODY)),
                              tmp_path, anyio.Semaphore(2))
        own = await fetch(client, RemoteFile("own.bin", f"{site.url}{PREFIX}/media/own.bin",
                                             len(BODY)), tmp_path, anyio.Semaphore(2))
    finally:
        await client.__aexit__(None, None, None)
    assert (tmp_path / "x.bin").read_bytes() == BODY == (tmp_path / "own.bin").read_bytes()
    assert foreign.size == own.size == len(BODY)
    assert host.seen.paths() == ["/files/x.bin"]
    assert host.seen.credentials() == []  # the links keep working, without the session
    # ... while the site's own origin does get its session (a control: the check can fail).
    assert any("sessionid=s3cret-session" in c for c in site.seen.credentials())


async def test_a_redirect_never_carries_credentials_across_origins(
        serve: Callable[[dict[str, Handler]], Awaitable[Server]], tmp_path: Path) -> None:
    host = await serve({"/files/x.bin": file_handler})

    async def to_host(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{host.url}/files/x.bin")

    async def host_to_site(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{site.url}{PREFIX}/media/own.bin")

    host_routes = {"/files/bounce.bin": host_to_site}
    bounce = await serve(host_routes)
    site = await serve({**login_routes(), f"{PREFIX}/media/r.bin": to_host,
                        f"{PREFIX}/media/own.bin": file_handler})
    client = await logged_in(site)
    try:
        with pytest.raises(ProtocolError, match="redirect"):
            await fetch(client, RemoteFile("r.bin", f"{site.url}{PREFIX}/media/r.bin", None),
                        tmp_path, anyio.Semaphore(1))
        with pytest.raises(ProtocolError, match="redirected"):
            await fetch(client, RemoteFile("b.bin", f"{bounce.url}/files/bounce.bin", None),
                        tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    assert host.seen.requests == []  # the site's redirect was not followed at all
    assert bounce.seen.credentials() == []
    assert f"{PREFIX}/media/own.bin" not in site.seen.paths()  # nor the file host's
    assert not list(tmp_path.iterdir())  # nothing taken for a result


async def test_a_size_that_never_matches_fails_that_file_naming_both_sizes(
        serve: Callable[[dict[str, Handler]], Awaitable[Server]], tmp_path: Path) -> None:
    site = await serve({**login_routes(), f"{PREFIX}/media/y.bin": file_handler})
    client = await logged_in(site)
    listed = len(BODY) + 7
    try:
        with pytest.raises(TransferError) as caught:
            await fetch(client, RemoteFile("y.bin", f"{site.url}{PREFIX}/media/y.bin", listed),
                        tmp_path, anyio.Semaphore(1))
    finally:
        await client.__aexit__(None, None, None)
    message = str(caught.value)
    assert "y.bin" in message and str(listed) in message and str(len(BODY)) in message
    assert site.seen.paths().count(f"{PREFIX}/media/y.bin") <= 3
    assert not (tmp_path / "y.bin").exists()


async def test_a_login_redirect_loop_says_so(
        serve: Callable[[dict[str, Handler]], Awaitable[Server]]) -> None:
    def into_loop(request: web.Request) -> web.StreamResponse:
        return redirect(f"{PREFIX}/a/", "s")

    async def a(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{PREFIX}/b/")

    async def b(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(f"{PREFIX}/a/")

    site = await serve({**login_routes(into_loop), f"{PREFIX}/a/": a, f"{PREFIX}/b/": b})
    async with SiteClient(site.url + PREFIX, "alice", "pw", retry=FAST_RETRY) as client:
        with pytest.raises(ProtocolError, match="redirect loop"):
            await client.login()
    assert len(site.seen.requests) < 20


async def test_a_login_redirect_to_another_origin_is_not_followed(
        serve: Callable[[dict[str, Handler]], Awaitable[Server]]) -> None:
    elsewhere = await serve({"/": file_handler})

    def away(request: web.Request) -> web.StreamResponse:
        return redirect(f"{elsewhere.url}/", "s3cret-session")

    site = await serve(login_routes(away))
    async with SiteClient(site.url + PREFIX, "alice", "pw", retry=FAST_RETRY) as client:
        with pytest.raises(ProtocolError, match="another origin"):
            await client.login()
    assert elsewhere.seen.requests == []


@pytest.mark.parametrize(("base", "link"), [
    ("https://127.0.0.1:9/ast80011", "http://127.0.0.1:9/ast80011/media/a.bin"),
    ("http://127.0.0.1:9/ast80011", "file:///etc/passwd"),
    ("http://127.0.0.1:9/ast80011", "ftp://127.0.0.1/a.bin"),
])
async def test_links_that_are_not_http_or_downgrade_are_refused_unfetched(
        base: str, link: str, tmp_path: Path) -> None:
    async with SiteClient(base, "alice", "pw", retry=FAST_RETRY) as client:
        with pytest.raises(ProtocolError, match="refusing"):
            await fetch(client, RemoteFile("a.bin", link, 10), tmp_path, anyio.Semaphore(1))
    assert client.requests["download"] == 0
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("status", "outcome"), [
    (201, "accepted"), (202, "accepted"), (204, "accepted"),
    (302, "ambiguous"), (303, "ambiguous"), (400, "rejected")])
async def test_a_task_post_answer_is_judged_by_its_status_class(
        serve: Callable[[dict[str, Handler]], Awaitable[Server]], status: int, outcome: str
) -> None:
    """Any 2xx took the task (a 202 Accepted was once a 4xx-like refusal that failed the
    job while the site ran its task); a redirect that is not to the login page (a
    form's post-then-show-the-list) may or may not have: the task list decides."""
    async def task_page(request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            headers = {"Location": f"{PREFIX}/gi/view_jobs/"} if 300 <= status < 400 else {}
            return web.Response(status=status, headers=headers)
        return web.Response(text='<script>window.CSRF_TOKEN = "tok123";</script>',
                            content_type="text/html")

    site = await serve({**login_routes(), f"{PREFIX}/gi/plotgalaxies": task_page})
    client = await logged_in(site)
    try:
        if outcome == "accepted":
            assert await client.submit(plot(1), 1, {}) is None
        else:
            with pytest.raises(AmbiguousSubmit if outcome == "ambiguous" else RequestRejected):
                await client.submit(plot(1), 1, {})
    finally:
        await client.__aexit__(None, None, None)
