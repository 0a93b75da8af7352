"""An independent, minimal GI Simulator site written from the protocol spec alone
(/work/shared/spec/site-protocol.md and jobs.md), without reading gibatch's own site or
client. Tasks do no physics: each sleeps a short while and writes a few files of random
bytes (some of 1-5 MB) with the names the spec shows. A ledger keeps, per task, its
parameters, the results it read and the files it produced (name, size, sha256), so a
test can tell whether a job's files are exactly what this site made for that job.

Like the real site, a model number holds only its current results: a task that
replaces or clears a section deletes the old files, whose URLs then answer 404.

Section 3's variations are options (`Variations`): newest-first listings (or one row
per model number), other status words, extra columns, task POSTs answered in HTML with
no job id, no size cells, headings without a status, `Range` ignored, 502s (also after
a POST was accepted), downloads cut halfway, tasks started "in the browser" at random
moments when a model number is free (after a task ends; or just before a client's POST,
having run to its end since the client last looked), short sessions, files on another
origin.

Where the spec is silent, this site takes the harshest reading: replaced files are
deleted when the replacing task is submitted (not when it starts or ends); a POST on a
busy model number answers 409 (only section 2 says so; section 1's script just waited;
the variation `queue_when_busy`, added later, queues it behind the model's task instead);
a one-row listing shows each model's newest task, so a client may never see its own
row finish; a foreign plot shifts the plot numbering; the CSRF token rotates at login.

Serve it standalone: `python -m tests.independent_site --port 8001` (user alice, pw).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import json
import os
import random
import secrets
import shutil
import string
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import web

PREFIX = "/ast80011"
CSRF_CHARS = string.ascii_letters + string.digits

# page -> job types it accepts (galaxy pages carry galaxy_number)
PAGES = {"galactic": "galaxy", "galacticsmerge": "Galaxy Merge",
         "interactgalaxies": "Galaxy Interaction", "plotgalaxies": "Plot"}
ORDER = ["Galaxy 1", "Galaxy 2", "Galaxy Merge", "Galaxy Interaction"]
DOWNSTREAM = {"Galaxy 1": ORDER[2:], "Galaxy 2": ORDER[2:], "Galaxy Merge": ORDER[3:],
              "Galaxy Interaction": [], "Plot": []}
RUNNING_STATES = ("Queued", "Running")


@dataclass
class Variations:
    """Section 3 of the spec, and the known faults of section 1, each switchable."""

    newest_first: bool = False
    one_row_per_model: bool = False
    other_status_words: bool = False      # "Pending"/"Submitted" for queued/running
    extra_columns: bool = False
    html_post_answer: bool = False        # 200 with an HTML body, no job id
    no_size_cells: bool = False
    no_status_in_headings: bool = False
    ignore_range: bool = False
    error_rate: float = 0.0               # any request: the proxy answers 502/503/504
    post_502_rate: float = 0.0            # a task POST is accepted, then answered 502
    cut_rate: float = 0.0                 # a download stops halfway, connection closed
    browser_rate: float = 0.0             # chance, after each task ends, of a browser task
    browser_budget: int = 0               # at most this many browser tasks
    # chance, on a task POST for a free model number, that a browser task of the same
    # type ran there just before (submitted and completed since the client last looked)
    browser_before_post_rate: float = 0.0
    browser_before_post_budget: int = 0
    browser_before_post_types: tuple[str, ...] = ()    # job types it may hit (all if empty)
    browser_delay_s: tuple[float, float] = (0.0, 0.3)  # after a task ends
    session_lifetime_s: float | None = None
    file_host: bool = False               # links to another origin (absolute URLs)
    # a POST for a busy model number is taken and queued behind its current task (a
    # site in front of a task queue) instead of answered 409; a browser task just
    # before a POST (browser_before_post_*) is then still running, not ended
    queue_when_busy: bool = False

    @classmethod
    def everything(cls) -> Variations:
        return cls(newest_first=True, other_status_words=True, extra_columns=True,
                   html_post_answer=True, no_size_cells=True, no_status_in_headings=True,
                   ignore_range=True, error_rate=0.03, post_502_rate=0.15, cut_rate=0.05,
                   browser_rate=0.25, browser_budget=6, browser_before_post_rate=1.0,
                   browser_before_post_budget=1, browser_before_post_types=("Plot",),
                   session_lifetime_s=2.0,
                   file_host=True)


@dataclass
class SiteOptions:
    accounts: dict[str, str] = field(default_factory=lambda: {"alice": "pw"})
    model_count: int = 3
    task_s: tuple[float, float] = (0.05, 0.25)
    queue_s: tuple[float, float] = (0.0, 0.05)
    large_mb: tuple[float, float] = (1.0, 5.0)
    seed: int = 1
    variations: Variations = field(default_factory=Variations)


@dataclass
class FileRec:
    name: str
    size: int
    sha256: str
    path: Path
    deleted: bool = False


@dataclass
class Task:
    job_id: int
    user: str
    model: int
    job_type: str            # "Galaxy 1", "Galaxy 2", "Galaxy Merge", ... "Plot"
    section: str             # "Plot 3" for a plot
    payload: dict[str, Any]
    origin: str              # "client" or "browser"
    submitted: float
    status: str = "Queued"
    inputs: list[int] = field(default_factory=list)
    files: list[FileRec] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(8))


@dataclass
class Session:
    user: str
    expires: float | None


class Ledger:
    """What every task was asked, read and produced; and protocol violations seen."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tasks: dict[int, Task] = {}
        self.violations: list[str] = []
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] = self.counts.get(what, 0) + 1

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def snapshot(self) -> list[Task]:
        with self.lock:
            return list(self.tasks.values())


class Site:
    def __init__(self, options: SiteOptions, data_dir: Path) -> None:
        self.o = options
        self.v = options.variations
        self.rng = random.Random(options.seed)
        # A generator of its own for the browser task just before a POST: the draws of
        # `rng` interleave as the requests come (their timing), so drawn from it, the k-th
        # POST's chance fell differently each run and a budget was sometimes never spent.
        # Drawn from this one, the k-th POST that may meet it always draws the same.
        self.before_post_rng = random.Random(options.seed)
        self.data_dir = data_dir
        self.ledger = Ledger()
        self.sessions: dict[str, Session] = {}
        self.next_id = 1000
        # (user, model) -> section -> current task id
        self.sections: dict[tuple[str, int], dict[str, int]] = {}
        self.plot_count: dict[tuple[str, int], int] = {}
        self.current: dict[tuple[str, int], int] = {}     # newest task per model
        self.by_token: dict[str, Task] = {}
        self.browser_left = self.v.browser_budget
        self.before_post_left = self.v.browser_before_post_budget
        self.file_host_url = ""
        self.background: set[asyncio.Task[None]] = set()
        self.tails: dict[tuple[str, int], asyncio.Task[None]] = {}  # last task per model

    # --- helpers -------------------------------------------------------------------
    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def login_url(self, request: web.Request) -> str:
        return f"{PREFIX}/accounts/login/?next={quote(request.path_qs)}"

    def user_of(self, request: web.Request) -> str | None:
        sid = request.cookies.get("sessionid")
        session = self.sessions.get(sid or "")
        if session is None:
            return None
        if session.expires is not None and time.monotonic() > session.expires:
            del self.sessions[sid or ""]
            self.ledger.count("session_expired")
            return None
        return session.user

    def require(self, request: web.Request) -> str:
        user = self.user_of(request)
        if user is None:
            raise web.HTTPFound(self.login_url(request))
        return user

    @staticmethod
    def mask(secret: str) -> str:
        """Django's masked CSRF token: a random mask, then the secret shifted by it."""
        m = "".join(secrets.choice(CSRF_CHARS) for _ in secret)
        n = len(CSRF_CHARS)
        return m + "".join(CSRF_CHARS[(CSRF_CHARS.index(s) + CSRF_CHARS.index(k)) % n]
                           for s, k in zip(secret, m, strict=True))

    @staticmethod
    def unmask(token: str) -> str:
        if len(token) == 32:
            return token
        half = len(token) // 2
        m, c = token[:half], token[half:]
        return "".join(CSRF_CHARS[CSRF_CHARS.index(x) - CSRF_CHARS.index(k)]
                       for x, k in zip(c, m, strict=True))

    def csrf_secret(self, request: web.Request, response: web.StreamResponse | None,
                    ) -> str:
        secret = request.cookies.get("csrftoken", "")
        if len(secret) != 32 or any(ch not in CSRF_CHARS for ch in secret):
            secret = "".join(secrets.choice(CSRF_CHARS) for _ in range(32))
            if response is not None:
                response.set_cookie("csrftoken", secret, path="/", samesite="Lax")
        return secret

    def csrf_ok(self, request: web.Request, token: str) -> bool:
        secret = request.cookies.get("csrftoken", "")
        if len(secret) != 32 or len(token) not in (32, 64):
            return False
        try:
            return secrets.compare_digest(self.unmask(token), secret)
        except ValueError:
            return False

    # --- authentication --------------------------------------------------------------
    def login_page(self, secret: str, error: str = "") -> str:
        err = f'<p class="errornote">{html.escape(error)}</p>' if error else ""
        return (f"<!DOCTYPE html><html><head><title>Log in</title></head><body>{err}"
                f'<form method="post" action="{PREFIX}/accounts/login/">'
                f'<input type="hidden" name="csrfmiddlewaretoken" value="{self.mask(secret)}">'
                '<input type="text" name="username"><input type="password" name="password">'
                '<input type="submit" value="Log in"></form></body></html>')

    async def login_get(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(content_type="text/html")
        response.text = self.login_page(self.csrf_secret(request, response))
        return response

    async def login_post(self, request: web.Request) -> web.StreamResponse:
        if not (request.content_type or "").startswith("multipart/form-data"):
            self.ledger.violation(f"login POST as {request.content_type}")
        form = await request.post()
        if not self.csrf_ok(request, str(form.get("csrfmiddlewaretoken", ""))):
            return web.Response(status=403, text="<h1>403 Forbidden</h1><p>CSRF failed</p>",
                                content_type="text/html")
        if not request.headers.get("Referer", "").endswith(f"{PREFIX}/accounts/login/"):
            self.ledger.violation("login POST without the login page as Referer")
        user, password = str(form.get("username", "")), str(form.get("password", ""))
        if self.o.accounts.get(user) != password or not password:
            self.ledger.count("login_refused")
            response = web.Response(content_type="text/html")
            response.text = self.login_page(
                self.csrf_secret(request, response),
                "Please enter a correct username and password.")
            return response
        sid = secrets.token_hex(16)
        lifetime = self.v.session_lifetime_s
        self.sessions[sid] = Session(user, None if lifetime is None
                                     else time.monotonic() + lifetime)
        self.ledger.count("login")
        target = request.query.get("next") or f"{PREFIX}/gi/"
        if not target.startswith(PREFIX):
            target = f"{PREFIX}/gi/"
        response = web.Response(status=302, headers={"Location": target})
        response.set_cookie("sessionid", sid, path="/", httponly=True, samesite="Lax")
        # Django's login() rotates the CSRF token
        response.set_cookie("csrftoken", "".join(secrets.choice(CSRF_CHARS) for _ in range(32)),
                            path="/", samesite="Lax")
        return response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.pop(request.cookies.get("sessionid", ""), None)
        response = web.Response(status=302, headers={"Location": f"{PREFIX}/accounts/login/"})
        response.del_cookie("sessionid", path="/")
        return response

    async def home(self, request: web.Request) -> web.StreamResponse:
        user = self.require(request)
        return web.Response(text=f"<html><body><h1>GI Simulator</h1><p>Hello {user}</p>"
                                 f'<a href="{PREFIX}/accounts/logout/">Log out</a>'
                                 "</body></html>", content_type="text/html")

    # --- task pages --------------------------------------------------------------------
    async def task_page(self, request: web.Request) -> web.StreamResponse:
        self.require(request)
        response = web.Response(content_type="text/html")
        token = self.mask(self.csrf_secret(request, response))
        response.text = ("<!DOCTYPE html><html><head><script>\n"
                         f'window.CSRF_TOKEN = "{token}";\n</script></head>'
                         "<body><div id='app'>GI Simulator</div></body></html>")
        return response

    async def task_post(self, request: web.Request) -> web.StreamResponse:
        user = self.require(request)
        if not self.csrf_ok(request, request.headers.get("X-CSRFToken", "")):
            self.ledger.count("csrf_refused")
            return web.Response(status=403, text="<h1>403 Forbidden</h1>",
                                content_type="text/html")
        page = request.match_info["page"]
        try:
            body = json.loads(await request.text())
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        problem = self.validate(page, body)
        if problem:
            self.ledger.count("post_400")
            self.ledger.violation(f"POST {page} refused: {problem}")
            return web.json_response({"error": problem}, status=400)
        key = (user, int(body["model_number"]))
        busy = self.busy(key)
        if busy and not self.v.queue_when_busy:
            self.ledger.count("post_409")
            return web.json_response({"error": "model number busy"}, status=409)
        if busy:
            self.ledger.count("post_queued")
        job_type = self.job_type(page, body)
        if not busy and self.before_post_left > 0 and (
                not self.v.browser_before_post_types
                or job_type in self.v.browser_before_post_types) and (
                self.before_post_rng.random() < self.v.browser_before_post_rate):
            self.before_post_left -= 1
            if self.v.queue_when_busy:  # still running: the client's task queues behind
                self.ledger.count("browser_task_before_post")
                self.submit(user, key[1], job_type, self.browser_body(job_type, key[1]),
                            "browser")
                self.ledger.count("post_queued")
            else:
                await self.browser_now(user, key[1], job_type)
        task = self.submit(user, key[1], job_type, body, "client")
        if self.chance(self.v.post_502_rate):
            self.ledger.count("post_502")
            return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1>"
                                                 "</body></html>", content_type="text/html")
        if self.v.html_post_answer:
            return web.Response(text="<html><body><p>Task submitted.</p></body></html>",
                                content_type="text/html")
        return web.json_response({"job_id": task.job_id})

    @staticmethod
    def job_type(page: str, body: dict[str, Any]) -> str:
        kind = PAGES[page]
        return f"Galaxy {body['galaxy_number']}" if kind == "galaxy" else kind

    def validate(self, page: str, body: Any) -> str:
        if not isinstance(body, dict):
            return "body is not an object"
        model = body.get("model_number")
        if not isinstance(model, int) or isinstance(model, bool) \
                or not 1 <= model <= self.o.model_count:
            return f"model_number: {model!r} is not 1..{self.o.model_count}"
        if "plot_number" in body:
            return "plot_number: unknown field"
        required = {"galactic": ("galaxy_number", "components_to_use"),
                    "galacticsmerge": ("length_scale", "position_galaxy_2",
                                       "velocity_galaxy_2", "theta_galaxy_2"),
                    "interactgalaxies": ("duration", "nFrames", "softening", "mass_1",
                                         "mass_2"),
                    "plotgalaxies": ("x_axis", "y_axis", "x_min", "x_max", "y_min", "y_max",
                                     "colour_scheme", "plot_size")}[page]
        missing = [k for k in required if k not in body]
        if missing:
            return f"{missing[0]}: missing"
        if page == "galactic" and body["galaxy_number"] not in (1, 2):
            return "galaxy_number: must be 1 or 2"
        return ""

    def busy(self, key: tuple[str, int]) -> bool:
        current = self.current.get(key)
        return current is not None and self.ledger.tasks[current].status in RUNNING_STATES

    def submit(self, user: str, model: int, job_type: str, body: dict[str, Any],
               origin: str, run: bool = True) -> Task:
        key = (user, model)
        held = self.sections.setdefault(key, {})
        if job_type == "Plot":
            self.plot_count[key] = self.plot_count.get(key, 0) + 1
            section = f"Plot {self.plot_count[key]}"
        else:
            section = job_type
        # replace the section and clear what depends on it: old files are deleted now
        cleared = [section, *DOWNSTREAM[job_type]]
        if job_type != "Plot":
            cleared += [s for s in held if s.startswith("Plot ")]
            self.plot_count[key] = 0
        for s in cleared:
            old = held.pop(s, None)
            if old is not None:
                self.delete_files(self.ledger.tasks[old])
        self.next_id += 1
        task = Task(self.next_id, user, model, job_type, section, body, origin, time.time())
        with self.ledger.lock:
            self.ledger.tasks[task.job_id] = task
        held[section] = task.job_id
        self.current[key] = task.job_id
        self.by_token[task.token] = task
        if run:  # after the model's task before it, if one is queued or running
            self.tails[key] = self.spawn(self.run_after(self.tails.get(key), task))
        return task

    async def run_after(self, before: asyncio.Task[None] | None, task: Task) -> None:
        if before is not None:
            await asyncio.wait({before})
        await self.run_task(task)

    def spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        t = asyncio.ensure_future(coro)
        self.background.add(t)
        t.add_done_callback(self.background.discard)
        return t

    def delete_files(self, task: Task) -> None:
        for f in task.files:
            if not f.deleted:
                f.deleted = True
                with contextlib.suppress(FileNotFoundError):
                    f.path.unlink()

    def inputs_for(self, task: Task) -> tuple[list[int], str]:
        held = self.sections.get((task.user, task.model), {})
        needs = {"Galaxy Merge": ["Galaxy 1", "Galaxy 2"],
                 "Galaxy Interaction": ["Galaxy Merge"],
                 "Plot": ["Galaxy Interaction"]}.get(task.job_type, [])
        ids = []
        for section in needs:
            tid = held.get(section)
            if tid is None or self.ledger.tasks[tid].status != "Completed":
                return [], f"no completed {section} on model number {task.model}"
            ids.append(tid)
        return ids, ""

    async def run_task(self, task: Task, instant: bool = False) -> None:
        if not instant:
            await asyncio.sleep(self.rng.uniform(*self.o.queue_s))
        task.status = "Running"
        inputs, error = self.inputs_for(task)
        task.inputs = inputs
        if not instant:
            await asyncio.sleep(self.rng.uniform(*self.o.task_s))
        folder = self.data_dir / task.user / str(task.model) / str(task.job_id)
        folder.mkdir(parents=True, exist_ok=True)
        specs = [("error.txt", 200)] if error else self.file_specs(task)
        files = await asyncio.to_thread(write_files, folder, specs, error)
        held = self.sections.get((task.user, task.model), {})
        if held.get(task.section) != task.job_id:      # replaced while it ran
            for f in files:
                f.path.unlink()
                f.deleted = True
        task.files = files
        task.status = "Failed" if error else "Completed"
        if not instant:
            self.maybe_browser(task.user, task.model)

    def file_specs(self, task: Task) -> list[tuple[str, int]]:
        mb = 1 << 20
        large = int(self.rng.uniform(*self.o.large_mb) * mb)
        medium = int(self.rng.uniform(0.2, 1.0) * self.o.large_mb[0] * mb)
        small = self.rng.randint(300, 5000)
        kind = task.job_type
        if kind.startswith("Galaxy ") and kind[-1] in "12":
            return [(f"galaxy{kind[-1]}_particles.csv", medium), ("log.txt", small)]
        if kind == "Galaxy Merge":
            return [("merged_particles.csv", medium), ("log.txt", small)]
        if kind == "Galaxy Interaction":
            csv = self.rng.choice(["_output_ascii.csv.gz", "_output_ascii.csv"])
            return [(csv, large), ("_output_Movie: lastmovie.gif", medium),
                    ("log.txt", small)]
        return [("final.png", self.rng.randint(20_000, 90_000)), ("animation.gif", large // 2),
                ("thumbnail.png", self.rng.randint(2000, 9000)), ("log.txt", small)]

    # --- tasks started in the browser ---------------------------------------------
    def maybe_browser(self, user: str, model: int) -> None:
        if self.browser_left > 0 and self.chance(self.v.browser_rate):
            self.browser_left -= 1
            self.spawn(self.browser_task(user, model, self.rng.uniform(*self.v.browser_delay_s)))

    async def browser_task(self, user: str, model: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self.busy((user, model)):     # no longer free: the moment has passed
            self.browser_left += 1
            return
        kind = self.rng.choice(["Galaxy 2", "Galaxy Merge", "Galaxy Interaction", "Plot",
                                "Plot"])
        self.ledger.count("browser_task")
        self.submit(user, model, kind, self.browser_body(kind, model), "browser")

    async def browser_now(self, user: str, model: int, kind: str) -> None:
        """A browser task of `kind` that has already run to its end."""
        self.ledger.count("browser_task_before_post")
        task = self.submit(user, model, kind, self.browser_body(kind, model), "browser",
                           run=False)
        await self.run_task(task, instant=True)

    @staticmethod
    def browser_body(kind: str, model: int) -> dict[str, Any]:
        if kind == "Galaxy 1":
            return {"galaxy_number": 1, "components_to_use": ["disk"],
                    "disk": {"number_of_particles": 77, "mass_factor": 0.5},
                    "model_number": model}
        bodies: dict[str, dict[str, Any]] = {
            "Galaxy 2": {"galaxy_number": 2, "components_to_use": ["disk", "halo"],
                         "disk": {"number_of_particles": 77, "mass_factor": 0.5},
                         "halo": {"number_of_particles": 77, "potential_well_depth": -3.3}},
            "Galaxy Merge": {"length_scale": {"galaxy_1": 1, "galaxy_2": 0.33},
                             "position_galaxy_2": {"x": 77, "y": 7, "z": 0},
                             "velocity_galaxy_2": {"vx": -77, "vy": 7, "vz": 0},
                             "theta_galaxy_2": 17},
            "Galaxy Interaction": {"duration": 0.77, "nFrames": 7, "softening": 1,
                                   "mass_1": 7, "mass_2": 0.7},
            "Plot": {"x_axis": "y", "y_axis": "z", "x_min": -77, "x_max": 77, "y_min": -77,
                     "y_max": 77, "colour_scheme": "blackonwhite", "plot_size": "small"},
        }
        return {**bodies[kind], "model_number": model}

    # --- listings --------------------------------------------------------------------
    def status_word(self, status: str) -> str:
        if self.v.other_status_words:
            return {"Queued": "Pending", "Running": "Submitted"}.get(status, status)
        return status

    async def view_jobs(self, request: web.Request) -> web.StreamResponse:
        user = self.require(request)
        tasks = [t for t in self.ledger.snapshot() if t.user == user]
        if self.v.one_row_per_model:
            tasks = [self.ledger.tasks[i] for k, i in self.current.items() if k[0] == user]
        tasks.sort(key=lambda t: t.job_id, reverse=self.v.newest_first)
        heads = ["Job ID", "Job Type", "Model Number", "Status", "Submitted"]
        if self.v.extra_columns:
            heads += ["Duration", "Actions"]
        rows = []
        for t in tasks:
            cells = [str(t.job_id), t.job_type, str(t.model), self.status_word(t.status),
                     time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t.submitted))]
            if self.v.extra_columns:
                cells += ["-", '<a href="#">delete</a>']
            rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        page = ("<!DOCTYPE html><html><body><h2>Your jobs</h2><table class='table'><thead><tr>"
                + "".join(f"<th>{h}</th>" for h in heads) + "</tr></thead>\n<tbody>\n"
                + "\n".join(rows) + "\n</tbody></table></body></html>")
        return web.Response(text=page, content_type="text/html")

    async def view_data(self, request: web.Request) -> web.StreamResponse:
        user = self.require(request)
        try:
            model = int(request.match_info["model"])
        except ValueError:
            model = 0
        if not 1 <= model <= self.o.model_count:
            return web.Response(status=400, text="bad model number")
        held = self.sections.get((user, model), {})
        names = [s for s in ORDER if s in held] + sorted(
            (s for s in held if s.startswith("Plot ")), key=lambda s: int(s.split()[1]))
        parts = ["<!DOCTYPE html><html><body>", f"<h2>Model {model}</h2>"]
        for name in names:
            task = self.ledger.tasks[held[name]]
            heading = name if self.v.no_status_in_headings \
                else f"{name} - Status: {self.status_word(task.status)}"
            parts.append(f"<h3>{heading}</h3><table>")
            if task.status in ("Completed", "Failed"):
                for f in task.files:
                    if not f.deleted:
                        parts.append(self.file_row(task, f))
            parts.append("</table>")
        parts.append("</body></html>")
        return web.Response(text="\n".join(parts), content_type="text/html")

    def file_row(self, task: Task, f: FileRec) -> str:
        if self.v.file_host:
            href = f"{self.file_host_url}/files/{task.token}/{quote(f.name)}"
        else:
            href = f"{PREFIX}/media/{task.user}/{task.model}/{task.job_id}/{quote(f.name)}"
        size = "" if self.v.no_size_cells else f"<td>{f.size}</td>"
        return (f'<tr><td><a href="{html.escape(href)}">{html.escape(f.name)}</a></td>'
                f"{size}</tr>")

    # --- downloads -------------------------------------------------------------------
    async def media(self, request: web.Request) -> web.StreamResponse:
        user = self.require(request)
        try:
            task = self.ledger.tasks[int(request.match_info["job"])]
        except (KeyError, ValueError):
            raise web.HTTPNotFound() from None
        if task.user != user or request.match_info["user"] != user \
                or str(task.model) != request.match_info["model"]:
            raise web.HTTPNotFound()
        return await self.send(request, task, request.match_info["name"])

    async def file_host(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Cookie"):
            self.ledger.violation("cookies sent to the file host: "
                                  + ",".join(sorted(request.cookies)))
        task = self.by_token.get(request.match_info["token"])
        if task is None:
            raise web.HTTPNotFound()
        return await self.send(request, task, request.match_info["name"])

    async def send(self, request: web.Request, task: Task, name: str) -> web.StreamResponse:
        rec = next((f for f in task.files if f.name == name and not f.deleted), None)
        if rec is None:
            self.ledger.count("download_404")
            raise web.HTTPNotFound()
        start, end = 0, rec.size
        response = web.StreamResponse()
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes=") and not self.v.ignore_range:
            first, _, last = rng[6:].partition("-")
            with contextlib.suppress(ValueError):
                start = int(first)
                end = int(last) + 1 if last else rec.size
            if not 0 <= start < end <= rec.size:
                return web.Response(status=416)
            response.set_status(206)
            response.headers["Content-Range"] = f"bytes {start}-{end - 1}/{rec.size}"
        response.content_length = end - start
        response.content_type = "application/octet-stream"
        cut = end - start > 2 and self.chance(self.v.cut_rate)
        stop = start + (end - start) // 2 if cut else end
        try:
            data = rec.path.read_bytes()
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        await response.prepare(request)
        self.ledger.count("download")
        pos = start
        while pos < stop:
            chunk = data[pos:min(stop, pos + 256 * 1024)]
            await response.write(chunk)
            pos += len(chunk)
        if cut:
            self.ledger.count("download_cut")
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write_eof()
        return response

    # --- the proxy in front ----------------------------------------------------------
    @web.middleware
    async def proxy(self, request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> web.StreamResponse:
        route = request.match_info.route.resource
        self.ledger.count(f"{request.method} {route.canonical if route else '?'}")
        if self.chance(self.v.error_rate):
            self.ledger.count("proxy_error")
            status = self.rng.choice([502, 502, 503, 504])
            return web.Response(status=status, text=f"<html><body><h1>{status}</h1>"
                                                    "</body></html>",
                                content_type="text/html")
        return await handler(request)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.proxy])
        r = app.router
        r.add_get(f"{PREFIX}/accounts/login/", self.login_get)
        r.add_post(f"{PREFIX}/accounts/login/", self.login_post)
        r.add_get(f"{PREFIX}/accounts/logout/", self.logout)
        r.add_get(f"{PREFIX}/gi/", self.home)
        for page in PAGES:
            r.add_get(f"{PREFIX}/gi/{page}", self.task_page)
            r.add_post(f"{PREFIX}/gi/{{page:{page}}}", self.task_post)
        r.add_get(f"{PREFIX}/gi/view_jobs/", self.view_jobs)
        r.add_get(f"{PREFIX}/gi/view_data/{{model}}/", self.view_data)
        r.add_get(f"{PREFIX}/media/{{user}}/{{model}}/{{job}}/{{name}}", self.media)
        return app

    def file_app(self) -> web.Application:
        app = web.Application(middlewares=[self.proxy])
        app.router.add_get("/files/{token}/{name}", self.file_host)
        return app


def write_files(folder: Path, specs: list[tuple[str, int]], error: str) -> list[FileRec]:
    out = []
    for name, size in specs:
        data = (error.encode() + b"\n").ljust(size, b" ") if error else os.urandom(size)
        path = folder / name
        path.write_bytes(data)
        out.append(FileRec(name, size, hashlib.sha256(data).hexdigest(), path))
    return out


class ThreadedIndependentSite:
    """The site on 127.0.0.1 (an ephemeral port), in an event loop of its own thread."""

    def __init__(self, options: SiteOptions, data_dir: Path) -> None:
        self.site = Site(options, data_dir)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    @property
    def ledger(self) -> Ledger:
        return self.site.ledger

    async def _serve(self, app: web.Application) -> int:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        tcp = web.TCPSite(runner, "127.0.0.1", 0)
        await tcp.start()
        self.runners.append(runner)
        return int(runner.addresses[0][1])

    async def _start(self) -> str:
        port = await self._serve(self.site.app())
        if self.site.v.file_host:
            self.site.file_host_url = f"http://127.0.0.1:{await self._serve(self.site.file_app())}"
        return f"http://127.0.0.1:{port}{PREFIX}"

    async def _stop(self) -> None:
        for t in list(self.site.background):
            t.cancel()
        await asyncio.gather(*self.site.background, return_exceptions=True)
        for runner in self.runners:
            await runner.cleanup()

    def idle(self) -> bool:
        """No task queued or running (a browser task may still be pending)."""
        return not any(t.status in RUNNING_STATES for t in self.ledger.snapshot())

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
        shutil.rmtree(self.site.data_dir, ignore_errors=True)


def main() -> None:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("--everything", action="store_true", help="every variation on")
    args = parser.parse_args()
    variations = Variations.everything() if args.everything else Variations()
    site = ThreadedIndependentSite(SiteOptions(variations=variations),
                                   Path(tempfile.mkdtemp(prefix="indep-site-")))
    print(site.url, "(alice / pw); Ctrl-C stops", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        site.stop()


if __name__ == "__main__":
    main()
