"""The local site as a server: driven by a positional scraper written the way the
course's original batch script was (stdlib only, no gibatch code), restarted without
losing results, and run standalone as `gibatch serve` in a process of its own."""

from __future__ import annotations

import http.cookiejar
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from html.parser import HTMLParser
from pathlib import Path
from typing import IO
from urllib.parse import urljoin

import anyio
import pytest

from gibatch import steps
from gibatch.errors import LoginFailed
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from gibatch.site import SiteClient, TaskState
from tests.conftest import tiny_job_files

PAGES = {"galaxy1": "gi/galactic", "galaxy2": "gi/galactic", "merge": "gi/galacticsmerge",
         "interact": "gi/interactgalaxies", "plot1": "gi/plotgalaxies"}


class Cells(HTMLParser):
    """Every table row's cell texts, in order: what a positional scraper reads."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None and self.rows:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


class OldScript:
    """The original batch script's way: urllib, cookies, multipart login, JSON POSTs,
    and positional scraping of view_jobs and view_data."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/") + "/"
        self.jar = http.cookiejar.CookieJar()
        self.http = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, path: str) -> str:
        with self.http.open(urljoin(self.base, path), timeout=30) as r:
            return str(r.read().decode())

    def login(self, user: str, password: str) -> None:
        page = self.get("accounts/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)[1]  # type: ignore[index]
        boundary = uuid.uuid4().hex
        body = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'
                       f"{v}\r\n" for k, v in (("csrfmiddlewaretoken", token),
                                               ("username", user), ("password", password)))
        body += f"--{boundary}--\r\n"
        url = urljoin(self.base, "accounts/login/")
        request = urllib.request.Request(url, data=body.encode(), headers={
            "Content-Type": f"multipart/form-data; boundary={boundary}", "Referer": url})
        self.http.open(request, timeout=30).close()
        assert any(c.name == "sessionid" for c in self.jar)

    def submit(self, step: str, model: int, params: dict[str, object]) -> None:
        page = self.get(PAGES[step])
        token = re.search(r'window\.CSRF_TOKEN = "([^"]+)";', page)[1]  # type: ignore[index]
        request = urllib.request.Request(
            urljoin(self.base, PAGES[step]), data=json.dumps({**params, "model_number": model})
            .encode(), headers={"Content-Type": "application/json", "X-CSRFToken": token})
        with self.http.open(request, timeout=30) as r:
            assert r.status == 200

    def jobs(self) -> list[list[str]]:
        parser = Cells()
        parser.feed(self.get("gi/view_jobs/"))
        header, *rows = parser.rows
        assert "Job Type" in header
        return rows

    def wait_last_completed(self, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            last = self.jobs()[-1]
            if last[3] in ("Completed", "Failed"):
                assert last[3] == "Completed", last
                return
            time.sleep(0.1)
        raise AssertionError("task did not finish")

    def sections(self, model: int) -> dict[str, tuple[str, list[tuple[str, str]]]]:
        page = self.get(f"gi/view_data/{model}/")
        out = {}
        for m in re.finditer(r"<h3>(.*?) - Status: (\w+)</h3>\s*<table>(.*?)</table>", page, re.S):
            links = re.findall(r"<a href=[\"']([^\"']+)[\"']>([^<]+)</a>", m[3])
            out[m[1]] = (m[2], links)
        return out


def test_original_script_style_scraper_drives_the_site(tmp_path: Path) -> None:
    site = ThreadedSite(SiteConfig(data_dir=tmp_path / "site", accounts={"s": "pw"}))
    try:
        script = OldScript(site.running.url)
        script.login("s", "pw")
        files = {k.removesuffix(".json"): v for k, v in tiny_job_files().items()}
        for step in ("galaxy1", "galaxy2", "merge", "interact", "plot1"):
            script.submit(step, 2, files[step])
            script.wait_last_completed()
        rows = script.jobs()
        assert [r[1] for r in rows] == ["Galaxy 1", "Galaxy 2", "Galaxy Merge",
                                        "Galaxy Interaction", "Plot"]
        assert {r[2] for r in rows} == {"2"}
        sections = script.sections(2)
        assert list(sections) == ["Galaxy 1", "Galaxy 2", "Galaxy Merge", "Galaxy Interaction",
                                  "Plot 1"]
        status, links = sections["Plot 1"]
        assert status == "Completed"
        names = {name for _, name in links}
        assert {"final.png", "animation.gif"} <= names
        href = next(h for h, n in links if n == "animation.gif")
        assert href.startswith("/ast80011/")  # root-relative, as on the real site
        with script.http.open(urljoin(script.base, href), timeout=30) as r:
            assert r.read(6) in (b"GIF87a", b"GIF89a")
    finally:
        site.stop()


def test_restart_keeps_results_and_finishes_unfinished_tasks(tmp_path: Path) -> None:
    config = SiteConfig(data_dir=tmp_path / "site", accounts={"s": "pw"})
    files = tiny_job_files()

    async def first_life(url: str) -> bytes:
        async with SiteClient(url, "s", "pw") as client:
            await client.login()
            await client.submit(steps.GALAXY1, 1, files["galaxy1.json"])
            for _ in range(600):
                rows = await client.tasks()
                if rows[-1].state is TaskState.COMPLETED:
                    break
                await anyio.sleep(0.05)
            preview = next(f for s in await client.sections(1) for f in s.files
                           if f.name == "preview.png")
            async with client.open_file(preview.url, 0) as response:
                data = await response.read()
            await client.submit(steps.GALAXY2, 1, files["galaxy2.json"])
            return bytes(data)

    async def second_life(url: str) -> tuple[list[str], bytes]:
        async with SiteClient(url, "s", "pw") as client:
            await client.login()
            for _ in range(600):
                rows = await client.tasks()
                if all(r.state is not TaskState.ACTIVE for r in rows):
                    break
                await anyio.sleep(0.05)
            sections = await client.sections(1)
            preview = next(f for s in sections for f in s.files if f.name == "preview.png"
                           and s.name == "Galaxy 1")
            async with client.open_file(preview.url, 0) as response:
                data = await response.read()
            return [f"{r.job_type}:{r.status}" for r in rows], bytes(data)

    site = ThreadedSite(config)
    before = anyio.run(first_life, site.running.url)
    site.stop()  # galaxy 2 was queued or running: it must not be lost
    site = ThreadedSite(config)
    try:
        rows, after = anyio.run(second_life, site.running.url)
    finally:
        site.stop()
    assert rows == ["Galaxy 1:Completed", "Galaxy 2:Completed"]
    assert after == before


def _lines(stream: IO[str]) -> tuple[queue.Queue[str], threading.Thread]:
    """The lines of `stream` as they come, read in a thread (so waits can be bounded)."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        with stream:
            for line in stream:
                lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return lines, reader


@pytest.mark.timeout(120)
def test_gibatch_serve_as_a_process(tmp_path: Path) -> None:
    secret = "correct horse battery"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gibatch", "serve", "--port", "0", "--user", "bob",
         "--data-dir", str(tmp_path / "data"), "--model-count", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "GIBATCH_PASSWORD": secret})
    try:
        assert proc.stdout is not None
        lines, reader = _lines(proc.stdout)
        line = lines.get(timeout=60)
        match = re.fullmatch(r"Serving (http://127\.0\.0\.1:\d+/ast80011)\n", line)
        assert match, line
        how = lines.get(timeout=10)
        assert "as 'bob'" in how and secret not in how and "GIBATCH_PASSWORD" in how

        async def visit() -> tuple[int, int]:
            async with SiteClient(match[1], "bob", secret) as client:
                await client.login()
                rows = await client.tasks()
            async with SiteClient(match[1], "bob", "wrong") as client:
                with pytest.raises(LoginFailed):
                    await client.login()
            return len(rows), 1

        assert anyio.run(visit) == (0, 1)
        assert (tmp_path / "data").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            proc.kill()
            reader.join(timeout=10)
    rest = "".join(lines.get(timeout=10) for _ in range(lines.qsize()))
    assert proc.returncode == 0, rest
    assert "Traceback" not in rest
