"""The local site as a server: driven the way the course's own batch script reads it
(requests and BeautifulSoup, no gibatch code), restarted without
losing results, and run standalone as `gibatch serve` in a process of its own."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import anyio
import pytest
import requests
from bs4 import BeautifulSoup

from gibatch import steps
from gibatch.errors import LoginFailed
from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from gibatch.site import SiteClient, TaskState
from tests.conftest import tiny_job_files

PAGES = {"galaxy1": "gi/galactic", "galaxy2": "gi/galactic", "merge": "gi/galacticsmerge",
         "interact": "gi/interactgalaxies", "plot1": "gi/plotgalaxies"}


class CourseScript:
    """The course's batch script's way of reading the site, with its library: requests,
    BeautifulSoup's `html.parser`, the multipart login with Referer, the JSON POST with
    `X-CSRFToken` scraped from `window.CSRF_TOKEN = "`, the `th` -> `tr` -> `thead` ->
    `table` climb to `<tbody>` in view_jobs (the last row read for a model number is its
    state), the `<h3>` / `find_next('table')` walk of view_data, and file links joined
    to the site's root with the leading slash stripped."""

    def __init__(self, base: str) -> None:
        self.base = base.rstrip("/") + "/"
        parts = urlsplit(base)
        self.root = f"{parts.scheme}://{parts.netloc}"
        self.http = requests.Session()

    def get(self, path: str) -> requests.Response:
        response = self.http.get(self.base + path, timeout=30)
        assert response.status_code == 200, (path, response.status_code)
        return response

    def login(self, user: str, password: str) -> None:
        soup = BeautifulSoup(self.get("accounts/login/").text, "html.parser")
        token = soup.find("input", {"name": "csrfmiddlewaretoken"})["value"]  # type: ignore[index]
        form = {"csrfmiddlewaretoken": (None, token), "username": (None, user),
                "password": (None, password)}
        response = self.http.post(self.base + "accounts/login/", files=form, timeout=30,
                                  headers={"Referer": self.base + "accounts/login/"})
        assert response.status_code == 200
        assert "sessionid" in self.http.cookies

    def logout(self) -> None:
        self.get("accounts/logout/")

    def submit(self, step: str, model: int, params: dict[str, object]) -> None:
        html = self.get(PAGES[step]).text
        begin = 'window.CSRF_TOKEN = "'
        start = html.index(begin) + len(begin)
        token = html[start:html.index('"', start)]
        response = self.http.post(self.base + PAGES[step], json={**params, "model_number": model},
                                  headers={"X-CSRFToken": token}, timeout=30)
        assert response.status_code == 200

    def task_status(self) -> dict[int, str]:
        soup = BeautifulSoup(self.get("gi/view_jobs/").text, "html.parser")
        status: dict[int, str] = {}
        for header in soup.find_all("th"):
            if header.text == "Job Type":
                body = header.parent.parent.parent.find("tbody")
                for row in body.find_all("tr"):
                    cells = row.find_all("td")
                    status[int(cells[2].text)] = cells[3].text
                break
        return status

    def rows(self) -> list[list[str]]:
        soup = BeautifulSoup(self.get("gi/view_jobs/").text, "html.parser")
        header = next(h for h in soup.find_all("th") if h.text == "Job Type")
        body = header.parent.parent.parent.find("tbody")
        return [[td.text for td in tr.find_all("td")] for tr in body.find_all("tr")]

    def wait_completed(self, model: int, deadline_s: float = 60) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            state = self.task_status().get(model)
            if state in ("Completed", "Failed"):
                assert state == "Completed"
                return
            time.sleep(0.1)
        raise AssertionError("task did not finish")

    def files(self, model: int) -> dict[str, dict[str, str]]:
        soup = BeautifulSoup(self.get(f"gi/view_data/{model}/").text, "html.parser")
        out: dict[str, dict[str, str]] = {}
        for heading in soup.find_all("h3"):
            name = heading.text[:heading.text.find(" - Status:")]
            table = heading.find_next("table")
            out[name] = {a.text: a["href"] for a in table.find_all("a")}
        return out

    def download(self, href: str) -> bytes:
        response = self.http.get(f"{self.root}/{href.lstrip('/')}", stream=True, timeout=30)
        response.raise_for_status()
        return b"".join(response.iter_content(chunk_size=1 << 20))


def test_course_script_drives_the_site(tmp_path: Path) -> None:
    site = ThreadedSite(SiteConfig(data_dir=tmp_path / "site", accounts={"s": "pw"}))
    try:
        script = CourseScript(site.running.url)
        script.login("s", "pw")
        assert script.task_status() == {}
        files = {k.removesuffix(".json"): v for k, v in tiny_job_files().items()}
        chain = ("galaxy1", "galaxy2", "merge", "interact", "plot1")
        for step in chain:
            script.submit(step, 2, files[step])
            script.wait_completed(2)
        script.submit("galaxy1", 3, files["galaxy1"])  # another model: its own last row
        script.wait_completed(3)
        rows = script.rows()
        assert [(r[1], r[2], r[3]) for r in rows] == [
            ("Galaxy 1", "2", "Completed"), ("Galaxy 2", "2", "Completed"),
            ("Galaxy Merge", "2", "Completed"), ("Galaxy Interaction", "2", "Completed"),
            ("Plot", "2", "Completed"), ("Galaxy 1", "3", "Completed")]
        assert [int(r[0]) for r in rows] == sorted(int(r[0]) for r in rows)
        assert script.task_status() == {2: "Completed", 3: "Completed"}

        sections = script.files(2)
        assert list(sections) == ["Galaxy 1", "Galaxy 2", "Galaxy Merge", "Galaxy Interaction",
                                  "Plot 1"]
        assert all(sections.values()), "every section lists its files"
        assert {"final.png", "animation.gif"} <= set(sections["Plot 1"])
        for section in sections.values():
            for href in section.values():
                assert href.startswith("/ast80011/media/")  # root-relative, as on the real site
        gif = script.download(sections["Plot 1"]["animation.gif"])
        assert gif[:6] in (b"GIF87a", b"GIF89a")
        script.logout()
        assert "sessionid" not in script.http.cookies or not script.http.cookies["sessionid"]
        assert script.http.get(script.base + "gi/view_jobs/", timeout=30).url.startswith(
            script.base + "accounts/login/")
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


def test_a_queueing_site_runs_each_models_tasks_in_turn_across_a_restart(
        tmp_path: Path) -> None:
    """`queue=True`: a whole chain POSTed at once to one model number (in one turn of
    the site's loop, so every task after the first finds the model busy) is taken, not
    refused; the site is stopped before most have run and restarted; each task then
    runs after the one before it has ended, reading its results, and takes its section
    only when it starts (two plots: Plot 1 and Plot 2)."""
    config = SiteConfig(data_dir=tmp_path / "site", accounts={"s": "pw"}, queue=True)
    files = tiny_job_files()
    chain = [steps.GALAXY1, steps.GALAXY2, steps.MERGE, steps.INTERACT, steps.plot(1),
             steps.plot(1)]
    site = ThreadedSite(config)
    store = site.running.site.store

    def take_chain() -> tuple[list[int], list[int]]:
        taken = [site.running.site.submit("s", 1, step, json.dumps(files[f"{step.name}.json"]))
                 for step in chain]
        return taken, store.waiting()  # in the same turn: the first cannot have ended yet

    try:
        ids, waiting = site.call(take_chain)
        assert waiting == ids[1:]  # all but the first wait their turn
    finally:
        site.stop()
    site = ThreadedSite(config)
    store = site.running.site.store
    try:
        deadline = time.monotonic() + 120
        while any(t.status.active for t in store.tasks("s")):
            assert time.monotonic() < deadline, "tasks did not finish"
            time.sleep(0.05)
        tasks = store.tasks("s")
        assert [t.status for t in tasks] == ["Completed"] * len(chain)
        ends = [store.finished(i) or "" for i in ids]
        assert ends == sorted(ends)
        g1, g2, merge, interact, plot1, plot2 = ids
        assert sorted(store.inputs_of(merge)) == [g1, g2]
        assert store.inputs_of(interact) == [merge]
        assert store.inputs_of(plot1) == store.inputs_of(plot2) == [interact]
        assert {s.name: s.job_id for s in store.sections("s", 1)} == {
            "Galaxy 1": g1, "Galaxy 2": g2, "Galaxy Merge": merge,
            "Galaxy Interaction": interact, "Plot 1": plot1, "Plot 2": plot2}
        assert store.waiting() == []
    finally:
        site.stop()
