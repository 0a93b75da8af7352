"""The local GI Simulator site: aiohttp routes implementing site-protocol.md exactly.

Sections 1 and 2 of the protocol: Django-style sessions and CSRF, the four task pages,
view_jobs and view_data, media files with Content-Length and Range, 400/403/409
answers, downstream invalidation, plot numbering and session expiry; plus the faults
of `faults.py` in front of everything, as the course site's proxy would show them.

Like the real site, a model number holds only its current results: a task that
replaces or clears a section deletes the files of the task that filled it, and their
URLs answer 404. Media are private to their owner's session.

`strict=True` keeps only what section 1 guarantees and takes the worst variations of
section 3: view_jobs newest first with other words for waiting work (`Pending`), task
POSTs answered 200 with an HTML page and no job id, no size cell in view_data,
`plot_number` refused with 400, and `Range` ignored (files always whole, 200).

`one_row=True` lists only each model number's newest task in view_jobs (a variation
of section 3): a task that another replaced as the newest is never listed again, so a
client must tell that its own task ended without seeing its row finish.

`queue=True` takes a task POSTed for a busy model number instead of answering 409, as a
site in front of a task queue would: it is listed as Queued and starts, taking its
section and deleting what it replaces, when the tasks before it on that model number
have ended. A browser task then joins the queue too, at once.

`stream_rate_mb_s` serves each file download no faster than that many MB/s, as one
TCP stream from a remote server across a network is limited (by the window over the
round trip, or by the proxy), while several streams together go faster: on loopback
a single stream is only limited by the CPU, which hides what concurrency buys.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web
from pydantic import ValidationError

from gibatch.params import GalaxyParams, InteractParams, MergeParams, PlotParams, describe_errors
from gibatch.sim import pages
from gibatch.sim.browser import click_task
from gibatch.sim.faults import Faults
from gibatch.sim.physics import Physics
from gibatch.sim.runner import Runner, default_workers
from gibatch.sim.store import Busy, Store, Task, TaskStatus
from gibatch.steps import GALAXY1, GALAXY2, INTERACT, MERGE, Step, plot

DEFAULT_PREFIX = "/ast80011"
DEFAULT_MODEL_COUNT = 4
DEFAULT_SESSION_LIFETIME_S = 14 * 24 * 3600.0  # Django's default
SITE_KEY: web.AppKey[Site] = web.AppKey("site")

_TASK_PAGES: dict[str, tuple[str, type[Any]]] = {
    "galactic": ("Build a galaxy", GalaxyParams),
    "galacticsmerge": ("Merge galaxies", MergeParams),
    "interactgalaxies": ("Interact galaxies", InteractParams),
    "plotgalaxies": ("Plot galaxies", PlotParams),
}


@dataclass
class SiteConfig:
    data_dir: Path
    accounts: dict[str, str] = field(default_factory=dict, repr=False)
    prefix: str = DEFAULT_PREFIX
    model_count: int = DEFAULT_MODEL_COUNT
    session_lifetime_s: float = DEFAULT_SESSION_LIFETIME_S
    workers: int | None = None
    faults: Faults = field(default_factory=Faults)
    strict: bool = False
    physics: Physics = Physics.RESTRICTED
    stream_rate_mb_s: float = 0.0  # per download; 0: as fast as loopback goes
    warm: bool = False  # start the simulator's workers with the site, not on first use
    one_row: bool = False  # view_jobs: only each model number's newest task
    queue: bool = False  # a task POSTed to a busy model number waits its turn (no 409)


class Site:
    """State behind the routes: store, task runner, sessions."""

    def __init__(self, config: SiteConfig) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(config.data_dir / "site.db")
        for user, password in config.accounts.items():
            self.store.set_password(user, password)
        self.runner: Runner | None = None
        self._sessions: dict[str, tuple[str, float]] = {}
        self._clicks: dict[tuple[str, int], list[str | None]] = {}  # waiting for a free model
        self._queued: dict[tuple[str, int], list[int]] = {}  # `queue`: taken, not started
        self.clicked: list[int] = []  # job ids of browser tasks, for tests and benchmarks
        self.stuck: list[int] = []  # job ids of tasks that never end (the `stuck` fault)

    @property
    def faults(self) -> Faults:
        return self.config.faults

    @property
    def media(self) -> Path:
        return self.config.data_dir / "media"

    async def startup(self, _app: web.Application) -> None:
        # No more workers than tasks can ever run at once (one per model number and
        # account): each loads the simulator, and `warm` starts them all.
        most = self.config.model_count * max(1, len(self.config.accounts))
        self.runner = Runner(self.store, self.media,
                             min(self.config.workers or default_workers(), most),
                             self._task_ended, self.config.physics)
        if self.config.warm:
            self.runner.warm()
        # A restarted site finishes what it had started, then what waited its turn.
        waiting = set(await asyncio.to_thread(self.store.waiting))
        running = set()
        for task in await asyncio.to_thread(self.store.unfinished):
            key = (task.username, task.model)
            if task.job_id in waiting:
                self._queued.setdefault(key, []).append(task.job_id)
            else:
                running.add(key)
                self.runner.start(task)
        for key in self._queued.keys() - running:
            self._start_next(*key)

    async def cleanup(self, _app: web.Application) -> None:
        if self.runner is not None:
            await self.runner.close()
        self.store.close()

    # tasks
    def submit(self, user: str, model: int, step: Step, payload: str,
               plot_number: int | None = None) -> int:
        """Queue a task (Busy if the model is occupied) and delete what it replaces.

        Runs on the event loop: the runner starts the task in the same turn.
        """
        assert self.runner is not None
        done = self.store.submit(user, model, step, payload, plot_number, self.config.queue)
        if done.replaced is None:
            self._queued.setdefault((user, model), []).append(done.job_id)
        else:
            self._run(done.job_id, done.replaced)
        return done.job_id

    def _run(self, job_id: int, replaced: tuple[int, ...]) -> None:
        """Start a task that has taken its section (or, the `stuck` fault, never end it)."""
        assert self.runner is not None
        task = self.store.task(job_id)
        assert task is not None
        for old in replaced:
            shutil.rmtree(self.runner.task_dir(task.username, task.model, old),
                          ignore_errors=True)
        if self.faults.draw("stuck", f"task:{task.step}"):
            self.store.set_status(job_id, TaskStatus.RUNNING)
            self.stuck.append(job_id)
            return
        self.runner.start(task)

    def _start_next(self, user: str, model: int) -> bool:
        """Start the oldest task waiting in the model's queue, if any."""
        queued = self._queued.get((user, model))
        if not queued:
            return False
        job_id = queued.pop(0)
        self._run(job_id, self.store.start(job_id))
        return True

    def click(self, user: str, model: int | None = None, kind: str | None = None) -> None:
        """Someone starts a task in the browser on `model` (default: a random one of the
        account's) as soon as it is free: now if idle, else when its current task ends."""
        if model is None:
            model = self.faults.rng.randint(1, self.config.model_count)
        if self.store.is_busy(user, model) and not self.config.queue:
            self._clicks.setdefault((user, model), []).append(kind)
            return
        self._start_click(user, model, kind)

    def _start_click(self, user: str, model: int, kind: str | None) -> None:
        step, payload = click_task(self.faults.rng, kind or self.faults.browser_step)
        self.clicked.append(self.submit(user, model, step, payload))

    def _task_ended(self, task: Task, status: TaskStatus) -> None:
        self.store.set_status(task.job_id, status)
        if self._start_next(task.username, task.model):
            return
        waiting = self._clicks.get((task.username, task.model))
        if waiting:
            self._start_click(task.username, task.model, waiting.pop(0))

    # sessions
    def login(self, username: str) -> str:
        sid = secrets.token_urlsafe(24)
        self._sessions[sid] = (username, time.monotonic() + self.config.session_lifetime_s)
        return sid

    def user_of(self, request: web.Request) -> str | None:
        sid = request.cookies.get("sessionid")
        entry = self._sessions.get(sid or "")
        if entry is None:
            return None
        if time.monotonic() > entry[1]:
            del self._sessions[sid or ""]
            return None
        return entry[0]

    def expire_sessions(self) -> None:
        """Tests: every current session ends now, as if its lifetime had run out."""
        self._sessions.clear()

    def require_user(self, request: web.Request) -> str:
        user = self.user_of(request)
        if user is None:
            raise web.HTTPFound(
                f"{self.config.prefix}/accounts/login/?next={quote(request.path_qs)}"
            )
        return user


def _site(request: web.Request) -> Site:
    return request.app[SITE_KEY]


def _csrf_cookie(request: web.Request, response: web.StreamResponse, token: str) -> None:
    if request.cookies.get("csrftoken") != token:
        response.set_cookie("csrftoken", token, path="/", samesite="Lax")


def _csrf(request: web.Request) -> str:
    return request.cookies.get("csrftoken") or secrets.token_urlsafe(24)


def _html(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type="text/html")


def _json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# --- faults: the proxy in front of the site -------------------------------------------------

@web.middleware
async def proxy_faults(request: web.Request, handler: Any) -> web.StreamResponse:
    faults = _site(request).faults
    if faults.draw("hang", request.path):
        await asyncio.sleep(faults.hang_s)
        raise web.HTTPGatewayTimeout()
    if faults.draw("error", request.path):
        if faults.error_delay_s:
            await asyncio.sleep(faults.error_delay_s)
        return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                            content_type="text/html")
    site = _site(request)
    user = site.user_of(request)
    if user is not None and faults.draw("browser", request.path):
        site.click(user, await _model_concerned(request, site))
    response: web.StreamResponse = await handler(request)
    return response


_MODEL_IN_PATH = re.compile(r"/(?:gi/view_data|media/[^/]+)/(\d+)/")


async def _model_concerned(request: web.Request, site: Site) -> int | None:
    """The model number a request is about, if it names one that exists."""
    found = _MODEL_IN_PATH.search(request.path)
    value: object = int(found[1]) if found else None
    if value is None and request.method == "POST" and request.path.endswith(
            tuple(_TASK_PAGES) + tuple(f"{p}/" for p in _TASK_PAGES)):
        try:
            value = json.loads(await request.read()).get("model_number")
        except (ValueError, AttributeError, RecursionError):
            value = None
    return _model_number(value, site)


# --- accounts -------------------------------------------------------------------------------

async def login_get(request: web.Request) -> web.Response:
    token = _csrf(request)
    resp = _html(pages.login_form(token, request.query.get("next", "")))
    _csrf_cookie(request, resp, token)
    return resp


async def login_post(request: web.Request) -> web.Response:
    site = _site(request)
    try:
        form = await request.post()
    except web.HTTPException:
        raise  # 413: a body over the size limit
    except Exception as exc:
        # Whatever the parser trips on is the client's bytes: ValueError, but also
        # LookupError (an unknown charset) and RuntimeError (an unknown transfer
        # encoding) in aiohttp's multipart reader. The reason echoes input: escaped.
        from html import escape

        return _html(pages.page("Bad request", f"<p>Unreadable login form: "
                                               f"{escape(str(exc))}</p>"), 400)
    cookie = request.cookies.get("csrftoken")
    if not cookie or form.get("csrfmiddlewaretoken") != cookie:
        return _html(pages.page("Forbidden", "<p>CSRF verification failed.</p>"), 403)
    username, password = str(form.get("username", "")), str(form.get("password", ""))
    ok = await asyncio.to_thread(site.store.check_password, username, password)
    if not ok:  # Django answers 200 with the form again
        return _html(pages.login_form(
            cookie, str(form.get("next", "")),
            "Please enter a correct username and password. Note that both fields may be "
            "case-sensitive.",
        ))
    target = str(form.get("next") or "")
    if not target.startswith(site.config.prefix + "/"):
        target = f"{site.config.prefix}/gi/"
    resp = web.HTTPFound(target)
    resp.set_cookie("sessionid", site.login(username), path="/", httponly=True, samesite="Lax")
    resp.set_cookie("csrftoken", secrets.token_urlsafe(24), path="/", samesite="Lax")  # rotated
    raise resp


async def logout(request: web.Request) -> web.Response:
    site = _site(request)
    sid = request.cookies.get("sessionid")
    site._sessions.pop(sid or "", None)
    resp = web.HTTPFound(f"{site.config.prefix}/accounts/login/")
    resp.del_cookie("sessionid", path="/")
    raise resp


async def home(request: web.Request) -> web.Response:
    site = _site(request)
    user = site.require_user(request)
    return _html(pages.home(site.config.prefix, user, site.config.model_count))


# --- tasks ----------------------------------------------------------------------------------

async def task_get(request: web.Request) -> web.Response:
    site = _site(request)
    site.require_user(request)
    title, _ = _TASK_PAGES[request.match_info["page"]]
    token = _csrf(request)
    resp = _html(pages.task_page(title, token))
    _csrf_cookie(request, resp, token)
    return resp


def _model_number(value: object, site: Site) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value if 1 <= value <= site.config.model_count else None


def _step_of(page: str, body: dict[str, Any]) -> Step:
    if page == "galactic":
        return GALAXY2 if body.get("galaxy_number") == 2 else GALAXY1
    return {"galacticsmerge": MERGE, "interactgalaxies": INTERACT}.get(page, plot(0))


async def task_post(request: web.Request) -> web.Response:
    site = _site(request)
    user = site.require_user(request)
    token = request.cookies.get("csrftoken")
    if not token or request.headers.get("X-CSRFToken") != token:
        return _html(pages.page("Forbidden", "<p>CSRF verification failed.</p>"), 403)
    page = request.match_info["page"]
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _json_error(400, "body: not valid JSON (or nested too deeply)")
    if not isinstance(body, dict):
        return _json_error(400, "body: must be a JSON object")
    model = _model_number(body.pop("model_number", None), site)
    if model is None:
        return _json_error(400, f"model_number: must be an integer from 1 to "
                                f"{site.config.model_count}")
    plot_number = body.pop("plot_number", None) if page == "plotgalaxies" else None
    if plot_number is not None and site.config.strict:
        return _json_error(400, "plot_number: unknown field")
    if plot_number is not None and (isinstance(plot_number, bool)
                                    or not isinstance(plot_number, int)):
        return _json_error(400, "plot_number: must be an integer")
    try:
        params = _TASK_PAGES[page][1].model_validate(body)
    except ValidationError as exc:
        return _json_error(400, "; ".join(f"{f}: {m}" for f, m in describe_errors(exc)))
    payload = json.dumps(params.model_dump(mode="json", exclude_none=True))
    try:
        job_id = _take(site, request, user, model, _step_of(page, body), payload, plot_number)
    except Busy:
        return _json_error(409, f"model_number: model {model} is busy with another task")
    except ValueError as exc:
        return _json_error(400, str(exc))
    if site.faults.draw("post_502", request.path):
        return web.Response(status=502, text="<h1>502 Bad Gateway</h1>", content_type="text/html")
    if site.config.strict:
        return _html(pages.page("Task submitted", "<p>Your task has been submitted.</p>"))
    return web.json_response({"job_id": job_id})


def _take(site: Site, request: web.Request, user: str, model: int, step: Step, payload: str,
          plot_number: int | None) -> int:
    """Queue the task, or (the `lost` fault) use up a job id and drop it."""
    if site.faults.draw("lost", request.path):
        return site.store.lose(user, model, step, payload)
    return site.submit(user, model, step, payload, plot_number)


# --- listings and files ---------------------------------------------------------------------

async def view_jobs(request: web.Request) -> web.Response:
    site = _site(request)
    user = site.require_user(request)
    tasks = await asyncio.to_thread(site.store.tasks, user)
    if site.config.one_row:
        newest = {t.model: t for t in tasks}  # in id order: the last one stays
        tasks = [t for t in tasks if newest[t.model] is t]
    if site.config.strict:
        return _html(pages.view_jobs(reversed(tasks), pages.STRICT_WORDS))
    return _html(pages.view_jobs(tasks))


async def view_data(request: web.Request) -> web.Response:
    site = _site(request)
    user = site.require_user(request)
    try:
        model = int(request.match_info["model"])
    except ValueError:
        model = 0
    if not 1 <= model <= site.config.model_count:
        return _html(pages.page("Bad request", "<p>No such model number.</p>"), 400)
    sections = await asyncio.to_thread(site.store.sections, user, model)
    listed = []
    for section in sections:
        files: list[tuple[str, str, int]] = []
        if not section.status.active:
            folder = site.media / user / str(model) / str(section.job_id)
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    url = (f"{site.config.prefix}/media/{quote(user)}/{model}/"
                           f"{section.job_id}/{quote(f.name)}")
                    files.append((f.name, url, f.stat().st_size))
        listed.append((section, files))
    if site.config.strict:
        return _html(pages.view_data(model, listed, sizes=False, words=pages.STRICT_WORDS))
    return _html(pages.view_data(model, listed))


async def media(request: web.Request) -> web.StreamResponse:
    """A result file, to its owner's session only. Without a session: to the login page,
    as Django's login_required does; another account: 404 (not 403: whether a file
    exists is the owner's business too)."""
    site = _site(request)
    user, model, job, name = (request.match_info[k] for k in ("user", "model", "job", "name"))
    if site.require_user(request) != user or not (model.isdigit() and job.isdigit()):
        raise web.HTTPNotFound()
    root = site.media.resolve()
    try:
        path = (site.media / user / model / job / name).resolve()
        # Resolved paths, not text: `..`, encoded forms and symlinks all end up compared here.
        found = path.parent == root / user / model / job and path.is_file()
    except (OSError, ValueError, RuntimeError):  # a name too long, a NUL, a symlink loop
        found = False
    if not found:
        raise web.HTTPNotFound()
    if site.faults.draw("cut", request.path):
        return await _cut_download(request, path)
    rate = site.config.stream_rate_mb_s * 1e6
    if site.config.strict:
        return await _streamed(request, path, 0, rate)
    if rate > 0:
        return await _streamed(request, path, _range_start(request), rate)
    return web.FileResponse(path)


def _range_start(request: web.Request) -> int:
    """The first byte of `Range: bytes=N-` (the form a resuming client sends), else 0."""
    rng = request.headers.get("Range", "")
    first = rng[6:].split("-")[0] if rng.startswith("bytes=") else ""
    return int(first) if first.isdecimal() else 0


async def _streamed(request: web.Request, path: Path, start: int, rate: float
                    ) -> web.StreamResponse:
    """The file from byte `start` (206 then, 416 past its end), at most `rate` bytes a
    second when `rate` > 0. Strict mode calls it with start 0: a site without Range."""
    size = path.stat().st_size
    if start and start >= size:
        raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"bytes */{size}"})
    resp = web.StreamResponse(status=206 if start else 200)
    resp.content_length = size - start
    resp.content_type = "application/octet-stream"
    if start:
        resp.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    block = 1 << 20 if rate <= 0 else max(1 << 14, min(1 << 20, int(rate / 50)))
    try:
        await resp.prepare(request)
        began, sent = time.monotonic(), 0
        with path.open("rb") as f:
            f.seek(start)
            while data := await asyncio.to_thread(f.read, block):
                await resp.write(data)
                sent += len(data)
                if rate > 0:  # ahead of the pace: wait until the bytes sent are due
                    await asyncio.sleep(max(0.0, began + sent / rate - time.monotonic()))
        await resp.write_eof()
    except ConnectionResetError:  # the client went away: nothing to answer
        pass
    return resp


async def _cut_download(request: web.Request, path: Path) -> web.StreamResponse:
    """Announce the whole (ranged) body, send half of it, then drop the connection."""
    size = path.stat().st_size
    start = min(_range_start(request), size)
    resp = web.StreamResponse(status=206 if start else 200)
    resp.content_length = size - start
    if start:
        resp.headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
    await resp.prepare(request)
    with path.open("rb") as f:
        f.seek(start)
        await resp.write(f.read(max(1, (size - start) // 2)))
    assert request.transport is not None
    request.transport.close()
    return resp


def create_app(config: SiteConfig) -> tuple[web.Application, Site]:
    """The site mounted under its path prefix, as on the course server."""
    site = Site(config)
    app = web.Application()
    app[SITE_KEY] = site
    pages_re = "{page:" + "|".join(_TASK_PAGES) + "}"
    app.add_routes([
        web.get("/accounts/login/", login_get),
        web.post("/accounts/login/", login_post),
        web.get("/accounts/logout/", logout),
        web.get("/gi/", home),
        web.get(f"/gi/{pages_re}", task_get),
        web.get(f"/gi/{pages_re}/", task_get),
        web.post(f"/gi/{pages_re}", task_post),
        web.post(f"/gi/{pages_re}/", task_post),
        web.get("/gi/view_jobs/", view_jobs),
        web.get("/gi/view_data/{model}/", view_data),
        web.get("/media/{user}/{model}/{job}/{name}", media),
    ])
    root = web.Application(middlewares=[proxy_faults])
    root[SITE_KEY] = site
    root.add_subapp(config.prefix, app)
    root.on_startup.append(site.startup)
    root.on_cleanup.append(site.cleanup)
    return root, site


__all__ = ["Site", "SiteConfig", "TaskStatus", "create_app"]
