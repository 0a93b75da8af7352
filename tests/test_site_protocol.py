"""The local site speaks site-protocol.md: each rule checked over real HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from yarl import URL

from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from tests.conftest import read_base, task_ends_held

pytestmark = pytest.mark.anyio
PASSWORD = "correct horse"
TINY_GALAXY = {"galaxy_number": 1, "components_to_use": ["disk", "halo"],
               "disk": {"number_of_particles": 20, "mass_factor": 1.0},
               "halo": {"number_of_particles": 20, "potential_well_depth": -4.6}}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedSite]:
    config = SiteConfig(data_dir=tmp_path_factory.mktemp("site"),
                        accounts={"alice": PASSWORD}, workers=1, model_count=3)
    running = ThreadedSite(config)
    yield running
    running.stop()


async def login(http: aiohttp.ClientSession, base: str, password: str = PASSWORD) -> str:
    async with http.get(f"{base}/accounts/login/") as resp:
        form = await resp.text()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form)
    assert token
    data = aiohttp.FormData(default_to_multipart=True)
    for k, v in (("csrfmiddlewaretoken", token.group(1)), ("username", "alice"),
                 ("password", password)):
        data.add_field(k, v)
    async with http.post(f"{base}/accounts/login/", data=data,
                         headers={"Referer": f"{base}/accounts/login/"}) as resp:
        assert resp.status == 200
        return await resp.text()


async def csrf(http: aiohttp.ClientSession, base: str, page: str = "galactic") -> str:
    async with http.get(f"{base}/gi/{page}") as resp:
        match = re.search(r'window\.CSRF_TOKEN = "([^"]+)";', await resp.text())
    assert match
    return match.group(1)


async def post(http: aiohttp.ClientSession, base: str, page: str, body: dict[str, Any],
               token: str) -> tuple[int, Any]:
    async with http.post(f"{base}/gi/{page}", json=body,
                         headers={"X-CSRFToken": token}) as resp:
        text = await resp.text()
        return resp.status, json.loads(text) if text.startswith("{") else text


@pytest.fixture
async def http(site: ThreadedSite) -> Any:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def test_wrong_password_answers_200_without_session(site: ThreadedSite, http: Any) -> None:
    body = await login(http, site.running.url, "wrong")
    assert "Please enter a correct username and password" in body
    assert "sessionid" not in {c.key for c in http.cookie_jar}


async def test_login_sets_session_and_protected_pages_redirect(site: ThreadedSite,
                                                               http: Any) -> None:
    base = site.running.url
    async with http.get(f"{base}/gi/view_jobs/", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"].startswith("/ast80011/accounts/login/?next=")
    await login(http, base)
    assert "sessionid" in {c.key for c in http.cookie_jar}
    async with http.get(f"{base}/gi/view_jobs/") as resp:
        assert resp.status == 200
        assert "<th>Job Type</th>" in await resp.text()


async def test_post_rules_csrf_400_409(site: ThreadedSite, http: Any) -> None:
    base = site.running.url
    await login(http, base)
    token = await csrf(http, base)
    status, _ = await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 2}, "bad")
    assert status == 403
    status, body = await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 9}, token)
    assert (status, body["error"].split(":")[0]) == (400, "model_number")
    merge = {**read_base()["merge.json"], "velocity_galaxy_2": {"x": 1, "y": 1, "z": 0}}
    status, body = await post(http, base, "galacticsmerge", {**merge, "model_number": 2}, token)
    assert status == 400 and "velocity_galaxy_2.x" in body["error"]
    with task_ends_held(site, lambda task: task.model == 2):  # busy for the second POST
        status, body = await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 2},
                                  token)
        assert status == 200 and isinstance(body["job_id"], int)
        status, body = await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 2},
                                  token)
        assert status == 409


async def test_expired_session_redirects_to_login(site: ThreadedSite, http: Any) -> None:
    base = site.running.url
    await login(http, base)
    site.running.site.expire_sessions()
    async with http.get(f"{base}/gi/view_data/1/", allow_redirects=False) as resp:
        assert resp.status == 302 and "/accounts/login/" in resp.headers["Location"]


def test_store_invalidation_and_plot_numbering(tmp_path: Path) -> None:
    from gibatch import steps
    from gibatch.sim.store import Store, TaskStatus

    store = Store(tmp_path / "s.db")

    def run(step: steps.Step) -> int:
        job = store.submit("u", 1, step, "{}").job_id
        store.set_status(job, TaskStatus.COMPLETED)
        return job

    for step in (steps.GALAXY1, steps.GALAXY2, steps.MERGE, steps.INTERACT,
                 steps.plot(0), steps.plot(0)):
        run(step)
    assert [s.name for s in store.sections("u", 1)] == [
        "Galaxy 1", "Galaxy 2", "Galaxy Merge", "Galaxy Interaction", "Plot 1", "Plot 2"]
    store.submit("u", 1, steps.plot(0), "{}", plot_number=1)  # extension: replace Plot 1
    assert len([s for s in store.sections("u", 1) if s.name.startswith("Plot")]) == 2
    store.set_status(store.tasks("u")[-1].job_id, TaskStatus.COMPLETED)
    run(steps.MERGE)  # clears interaction and plots, keeps galaxies
    assert [s.name for s in store.sections("u", 1)] == ["Galaxy 1", "Galaxy 2", "Galaxy Merge"]
    run(steps.GALAXY2)
    assert [s.name for s in store.sections("u", 1)] == ["Galaxy 1", "Galaxy 2"]
    store.close()


async def wait_idle(http: aiohttp.ClientSession, base: str, model: int) -> list[str]:
    """Poll view_jobs (bounded) until the model's newest task has finished; its cells."""
    for _ in range(600):
        async with http.get(f"{base}/gi/view_jobs/") as resp:
            rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]*)</td><td>(\d+)</td><td>(\w+)</td>",
                              await resp.text())
        mine = [r for r in rows if int(r[2]) == model]
        if mine and mine[-1][3] in ("Completed", "Failed"):
            return list(mine[-1])
        await anyio.sleep(0.05)
    raise AssertionError("the task did not finish")


async def test_files_length_range_and_failed_task(site: ThreadedSite, http: Any) -> None:
    base = site.running.url
    await login(http, base)
    token = await csrf(http, base)
    assert (await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 3}, token))[0] \
        == 200
    assert (await wait_idle(http, base, 3))[3] == "Completed"
    async with http.get(f"{base}/gi/view_data/3/") as resp:
        page = await resp.text()
    href, size = re.search(r"<a href='([^']+)'>preview\.png</a></td><td>(\d+)</td>", page).groups()  # type: ignore[union-attr]
    assert href.startswith("/ast80011/media/")
    url = str(URL(base).join(URL(href)))
    async with http.get(url) as resp:
        whole = await resp.read()
        assert int(resp.headers["Content-Length"]) == int(size) == len(whole)
    async with http.get(url, headers={"Range": "bytes=10-"}) as resp:
        assert resp.status == 206 and await resp.read() == whole[10:]

    merge = {**read_base()["merge.json"], "model_number": 1}  # model 1 holds no galaxies
    token = await csrf(http, base, "galacticsmerge")
    assert (await post(http, base, "galacticsmerge", merge, token))[0] == 200
    assert (await wait_idle(http, base, 1))[3] == "Failed"
    async with http.get(f"{base}/gi/view_data/1/") as resp:
        page = await resp.text()
    assert "<h3>Galaxy Merge - Status: Failed</h3>" in page and ">error.txt</a>" in page


async def test_each_fault_switch(site: ThreadedSite, http: Any) -> None:
    base = site.running.url
    faults = site.running.site.faults
    await login(http, base)
    faults.script("error", "/gi/view_jobs/")
    async with http.get(f"{base}/gi/view_jobs/") as resp:
        assert resp.status == 502
    await wait_idle(http, base, 3)
    token = await csrf(http, base)
    before = len(site.running.site.store.tasks("alice"))
    faults.script("post_502", "/gi/galactic")
    status, _ = await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 3}, token)
    assert status == 502 and len(site.running.site.store.tasks("alice")) == before + 1
    await wait_idle(http, base, 3)
    async with http.get(f"{base}/gi/view_data/3/") as resp:
        href = re.search(r"<a href='([^']+)'>galaxy\.h5</a>", await resp.text())[1]  # type: ignore[index]
    url = str(URL(base).join(URL(href)))
    faults.script("cut", "/media/")
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as resp:
            await resp.read()
    faults.script("hang", "/gi/view_jobs/")
    with pytest.raises(TimeoutError):
        async with http.get(f"{base}/gi/view_jobs/",
                            timeout=aiohttp.ClientTimeout(total=0.5)) as resp:
            await resp.read()
    assert {k: faults.injected[k] for k in ("error", "post_502", "cut", "hang")} == {
        "error": 1, "post_502": 1, "cut": 1, "hang": 1}


async def test_logout_ends_the_session(site: ThreadedSite, http: Any) -> None:
    base = site.running.url
    await login(http, base)
    async with http.get(f"{base}/accounts/logout/") as resp:
        assert resp.status == 200
    async with http.get(f"{base}/gi/view_jobs/", allow_redirects=False) as resp:
        assert resp.status == 302
