"""The sweep companions: `sweep`, `check`, `plan`, `status`, `report`, through typer's
runner and as real processes, on a tiny sweep run for real on the embedded site."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from gibatch import sweep as sw
from gibatch.cli import app
from gibatch.jobs import load_sweep
from gibatch.journal import Journal
from gibatch.plan import make_plan
from gibatch.status import JobState, sweep_status
from tests.conftest import BASE_JOB, gibatch, tiny_job_files, wait_for_event, write_job

runner = CliRunner()


def run_cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


# -- sweep

def test_grid_writes_named_valid_jobs_and_records_how(tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    code, text = run_cli("sweep", str(BASE_JOB), "--out", str(out),
                         "--vary", "merge.theta_galaxy_2=0:90:45",
                         "--vary", "interact.mass_2=1,1.5")
    assert code == 0, text
    sweep = load_sweep(out)
    assert not sweep.problems and len(sweep.jobs) == 6
    assert sweep.jobs[0].name == "001-theta_galaxy_2_0-mass_2_1"
    assert sweep.jobs[-1].name == "006-theta_galaxy_2_90-mass_2_1.5"
    record = json.loads((out / sw.SWEEP_FILE).read_text())
    assert record["mode"] == "grid"
    assert record["vary"] == ["merge.theta_galaxy_2=0:90:45", "interact.mass_2=1,1.5"]
    assert record["jobs"]["003-theta_galaxy_2_45-mass_2_1"] == {
        "merge.theta_galaxy_2": 45, "interact.mass_2": 1}
    merge = json.loads((out / "006-theta_galaxy_2_90-mass_2_1.5" / "merge.json").read_text())
    assert merge["theta_galaxy_2"] == 90


def test_zip_random_and_refusing_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "jobs"
    code, text = run_cli("sweep", str(BASE_JOB), "--out", str(out), "--zip",
                         "--vary", "interact.mass_2=1,2,3", "--vary", "interact.mass_1=10,20,30")
    assert code == 0, text
    pairs = [(j.params[next(s for s in j.steps if s.name == "interact")]) for j in
             load_sweep(out).jobs]
    assert [(p.mass_1, p.mass_2) for p in pairs] == [(10, 1), (20, 2), (30, 3)]  # type: ignore[union-attr]

    code, text = run_cli("sweep", str(BASE_JOB), "--out", str(out), "--zip",
                         "--vary", "interact.mass_2=1,2,3", "--vary", "interact.mass_1=10,20,30")
    assert code == 2 and "--force" in text
    code, text = run_cli("sweep", str(BASE_JOB), "--out", str(out), "--zip", "--force",
                         "--vary", "interact.mass_2=1,2,3", "--vary", "interact.mass_1=10,20,30")
    assert code == 0, text

    a = sw.random_points([sw.parse_vary("interact.mass_2=1:3"),
                          sw.parse_vary("galaxy1.disk.number_of_particles=100:200")],
                         50, seed=7, base=sw.read_base(BASE_JOB))
    b = sw.random_points([sw.parse_vary("interact.mass_2=1:3"),
                          sw.parse_vary("galaxy1.disk.number_of_particles=100:200")],
                         50, seed=7, base=sw.read_base(BASE_JOB))
    assert a == b  # the seed makes it reproducible
    assert all(1 <= p["interact.mass_2"] <= 3 for p in a)
    assert all(isinstance(p["galaxy1.disk.number_of_particles"], int) for p in a)
    assert len({p["interact.mass_2"] for p in a}) > 40  # continuous, not a grid


@pytest.mark.parametrize(("vary", "expected"), [
    ("merge.theta_galxy_2=0,1", "merge.json has no key 'theta_galxy_2'"),
    ("galaxy3.disk.mass_factor=1", "the base job has no galaxy3.json"),
    ("merge.theta_galaxy_2=0:90", "a range needs a step"),
    ("theta=0,1", "expected FILE.KEY=VALUES"),
    ("galaxy1.disk.number_of_particles=1.5",
     "galaxy1.json: disk.number_of_particles: Input should be a valid integer"),
    ("orbit.speed=-5,abc", "orbit keys are"),
])
def test_bad_variations_name_the_key_and_write_nothing(
        tmp_path: Path, vary: str, expected: str) -> None:
    out = tmp_path / "jobs"
    code, text = run_cli("sweep", str(BASE_JOB), "--out", str(out), "--vary", vary)
    assert code == 2
    assert expected in text
    assert "Traceback" not in text
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


def test_orbit_helpers_round_trip_and_place_galaxy_2() -> None:
    merge = json.loads((BASE_JOB / "merge.json").read_text())
    orbit = sw.orbit_of(merge)
    r = [merge["position_galaxy_2"][k] for k in "xyz"]
    v = [merge["velocity_galaxy_2"][k] for k in ("vx", "vy", "vz")]
    assert orbit["distance"] == pytest.approx(math.hypot(*r))
    assert orbit["azimuth"] == pytest.approx(math.degrees(math.atan2(r[1], r[0])))
    inward = -sum(a * b for a, b in zip(r, v, strict=True)) / math.hypot(*r) / math.hypot(*v)
    assert orbit["approach"] == pytest.approx(math.degrees(math.acos(inward)))
    pos, vel = sw.orbit_state(orbit)
    assert pos == pytest.approx(merge["position_galaxy_2"], abs=1e-3)
    assert vel == pytest.approx(merge["velocity_galaxy_2"], abs=1e-3)
    # 90 degrees of approach: moving tangentially, perpendicular to the separation.
    pos, vel = sw.orbit_state({**orbit, "approach": 90, "distance": 200, "elevation": 30})
    r = [pos[k] for k in "xyz"]
    v = [vel[k] for k in ("vx", "vy", "vz")]
    assert math.dist(r, [0, 0, 0]) == pytest.approx(200, abs=1e-3)
    assert sum(a * b for a, b in zip(r, v, strict=True)) == pytest.approx(0, abs=1e-2)
    assert pos["z"] == pytest.approx(100, abs=1e-3)


# -- check

def test_check_as_a_process_names_folder_file_and_field(tmp_path: Path) -> None:
    root = tmp_path / "jobs"
    bad = tiny_job_files()
    bad["merge.json"]["velocity_galaxy_2"] = {"x": 1, "y": 2, "z": 3}
    write_job(root, "1", tiny_job_files())
    write_job(root, "2", bad)
    done = subprocess.run([sys.executable, "-m", "gibatch", "check", "--jobs", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "2/merge.json: velocity_galaxy_2.x: unknown key (velocity_galaxy_2 takes vx, vy, " \
           "vz (not x, y, z))" in done.stdout
    assert "1 valid, 1 invalid" in done.stdout


@pytest.mark.parametrize("command", ["run", "check", "plan", "status", "sweep", "report",
                                     "serve"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    code, text = run_cli(command, "--help")
    assert code == 0
    assert "Example: gibatch" in text or "Example: GIBATCH_PASSWORD" in text


# -- plan, run, status, report on one real tiny sweep

@pytest.fixture(scope="module")
def ran_sweep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """A 4-job sweep generated by `gibatch sweep`, planned, then run as a real process."""
    tmp = tmp_path_factory.mktemp("companions")
    base = tmp / "base"
    write_job(tmp, "base", tiny_job_files())
    jobs = tmp / "jobs"
    sw.write_sweep(base, jobs, sw.grid([sw.parse_vary("merge.theta_galaxy_2=0,90"),
                                        sw.parse_vary("interact.mass_2=1,2")]))
    code, plan_text = run_cli("plan", "--jobs", str(jobs), "--models", "1-2")
    assert code == 0, plan_text
    log = tmp / "run.log"
    env = {"GIBATCH_LOCK_DIR": str(tmp / "locks")}
    proc = gibatch(log, "run", "--jobs", str(jobs), "--models", "1-2", env=env)
    try:
        wait_for_event(jobs, "step-submitted", None, deadline_s=60)
        # Stopped while status looks: the run (2 s in all) cannot end before it does.
        proc.send_signal(signal.SIGSTOP)
        try:
            code, status_text = run_cli("status", "--jobs", str(jobs))
        finally:
            proc.send_signal(signal.SIGCONT)
        assert code == 0, status_text
        proc.wait(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log.read_text()
    yield jobs, plan_text, status_text + "\n" + log.read_text()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_plan_predicts_the_tasks_run_submits(ran_sweep: tuple[Path, str, str]) -> None:
    jobs, plan_text, texts = ran_sweep
    predicted = int(re.search(r"(\d+) tasks for (\d+) job steps", plan_text)[1])  # type: ignore[index]
    submitted = int(re.search(r"tasks submitted: (\d+)", texts)[1])  # type: ignore[index]
    assert predicted == submitted == 4 + 4 + 4 + 8  # galaxies on 2 models, no merge shared
    # The same planner on the finished sweep: nothing left to do.
    sweep = load_sweep(jobs)
    journal = Journal(jobs)
    try:
        site = f"embedded:{(jobs / '.gibatch' / 'site').resolve()}"
        held = {m: journal.held(site, m) for m in (1, 2)}
        again = make_plan(sweep.jobs, held, journal.stage_estimates())
    finally:
        journal.close()
    # Every job's plots are held on one model or the other: rerunning them is cheap.
    assert again.tasks < predicted


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_status_during_and_after_the_run(ran_sweep: tuple[Path, str, str]) -> None:
    jobs, _, texts = ran_sweep
    assert "run in progress (pid" in texts  # read from another process mid-run
    code, text = run_cli("status", "--jobs", str(jobs))
    assert code == 0
    assert "no run in progress" in text and "4 complete, 0 running, 0 failed, 0 pending" in text
    journal = Journal(jobs)
    try:
        st = sweep_status(load_sweep(jobs), journal)
    finally:
        journal.close()
    assert {j.state for j in st.jobs} == {JobState.COMPLETE}
    assert {j.model for j in st.jobs} == {1, 2}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_report_page_and_contact_sheet(ran_sweep: tuple[Path, str, str]) -> None:
    jobs, _, _ = ran_sweep
    code, text = run_cli("report", "--jobs", str(jobs))
    assert code == 0, text
    page = (jobs / "report.html").read_text()
    rows = json.loads(page.split('<script type="application/json" id="data">')[1]
                      .split("</script>")[0])["rows"]
    assert len(rows) == 4 and all(len(row[4]) == 2 for row in rows)  # 2 plots each
    assert 'img.loading = "lazy"' in page and "http" not in page.split("<body>")[1]
    assert (jobs / "contact-sheet.png").stat().st_size > 1000
    assert load_sweep(jobs).problems == []  # the report adds no folder taken for a job


ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[object]:
    """Headless Chromium through Selenium; CI sets GIBATCH_REQUIRE_BROWSER=1 so that a
    missing browser fails there instead of skipping."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        if os.environ.get("GIBATCH_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromium-driver are required (apt-get install them)")
        pytest.skip("headless Chromium is not installed (apt-get install chromium "
                    "chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync", "--window-size=1400,900",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def _column(driver: Any, index: int) -> list[str]:
    rows = driver.find_elements("css selector", "#jobs tbody tr")
    return [r.find_elements("css selector", "td")[index].get_attribute("data-v") for r in rows]


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(400)
def test_report_in_headless_chromium(ran_sweep: tuple[Path, str, str], browser: Any) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    jobs, _, _ = ran_sweep
    code, text = run_cli("report", "--jobs", str(jobs))
    assert code == 0, text
    driver = browser
    driver.get((jobs / "report.html").as_uri())
    assert len(driver.find_elements("css selector", "#jobs tbody tr")) == 4

    headers = driver.find_elements("css selector", "#jobs th[data-key]")
    keys = [h.get_attribute("data-key") for h in headers]
    mass = keys.index("interact.mass_2")
    headers[mass].click()
    assert [float(v) for v in _column(driver, mass)] == [1, 1, 2, 2]
    headers[mass].click()
    assert [float(v) for v in _column(driver, mass)] == [2, 2, 1, 1]
    names = _column(driver, 0)
    assert names[0].endswith("mass_2_2") and names[-1].endswith("mass_2_1")

    theta = keys.index("merge.theta_galaxy_2")
    minimum = driver.find_element("css selector", f'input[data-min="{theta - 1}"]')
    minimum.send_keys("45")
    visible = [r for r in driver.find_elements("css selector", "#jobs tbody tr")
               if r.is_displayed()]
    assert len(visible) == 2
    minimum.clear()
    minimum.send_keys("-1")

    first = driver.find_elements("css selector", "a.shot")[0]
    thumb_ok = driver.execute_script(
        "return arguments[0].complete && arguments[0].naturalWidth > 0",
        first.find_element("css selector", "img"))
    assert thumb_ok
    first.click()
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "const i = document.getElementById('animation');"
        "return document.getElementById('viewer').open && i.complete && i.naturalWidth > 0"))
    src = driver.find_element("id", "animation").get_attribute("src")
    assert src.endswith("animation.gif")
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "report-animation.png"))
    driver.find_element("id", "viewer").click()
    driver.save_screenshot(str(ARTIFACTS / "report.png"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_plan_with_server_sees_what_the_models_hold(tmp_path: Path) -> None:
    from gibatch import steps
    from gibatch.sim.app import SiteConfig
    from gibatch.sim.server import ThreadedSite
    from gibatch.site import SiteClient
    from tests.test_run import run_sweep

    jobs = tmp_path / "jobs"
    write_job(jobs, "a", tiny_job_files())
    site = ThreadedSite(SiteConfig(data_dir=tmp_path / "site", accounts={"alice": "pw"}))
    try:
        run_sweep(site, jobs, [1])
        write_job(jobs, "b", tiny_job_files(**{"plot1.json": {"colour_scheme": "blackonwhite"}}))
        args = ["plan", "--jobs", str(jobs), "--models", "1", "--server", site.running.url,
                "--username", "alice"]
        env = {**os.environ, "GIBATCH_PASSWORD": "pw"}
        done = subprocess.run([sys.executable, "-m", "gibatch", *args], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "1 jobs to run (1 already complete, 0 invalid): 1 tasks for 6 job steps" \
            in done.stdout

        async def meddle(step: steps.Step, name: str) -> None:  # a click in the browser
            async with SiteClient(site.running.url, "alice", "pw") as client:
                await client.login()
                await client.submit(step, 1, tiny_job_files()[name])

        def click(step: steps.Step, name: str) -> None:
            anyio.run(meddle, step, name)
            end = time.monotonic() + 30  # a condition polled, with a bound
            while site.running.site.store.is_busy("alice", 1):
                assert time.monotonic() < end, "the browser task never ended"
                time.sleep(0.02)

        def plan() -> str:
            done = subprocess.run([sys.executable, "-m", "gibatch", *args], env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            return done.stdout

        click(steps.plot(1), "plot1.json")  # adds a section, replaces nothing
        out = plan()
        assert "model 1: 1 task(s) started elsewhere" in out
        assert "nothing held was touched" in out and "1 tasks for 6 job steps" in out
        click(steps.GALAXY1, "galaxy1.json")  # the same galaxy, but not ours
        out = plan()
        assert "model 1: 2 task(s) started elsewhere" in out
        assert ("no longer counted as held: Galaxy 1, Galaxy Interaction, Galaxy Merge, "
                "Plot 1") in out
        assert "5 tasks for 6 job steps" in out  # galaxy 2 is still the job's own
        assert "pw" not in " ".join(args)
    finally:
        site.stop()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_companions_as_processes(ran_sweep: tuple[Path, str, str]) -> None:
    jobs, _, _ = ran_sweep
    for args, expected in ((("status",), "4 complete"), (("plan", "--models", "1-2"),
                                                         "0 jobs to run (4 already complete"),
                           (("report",), "4 jobs, 8 thumbnails")):
        done = subprocess.run([sys.executable, "-m", "gibatch", args[0], "--jobs", str(jobs),
                               *args[1:]], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert expected in done.stdout, done.stdout


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.timeout(300)
def test_report_pages_a_large_sweep_in_headless_chromium(tmp_path: Path, browser: Any) -> None:
    """1,200 jobs: 500 rows laid out at a time; sorting and filtering work on all of
    them and go back to the first page."""
    jobs = tmp_path / "jobs"
    points = [{"interact.mass_2": 1 + k / 1000} for k in range(1200)]
    sw.write_sweep(BASE_JOB, jobs, points)
    code, text = run_cli("report", "--jobs", str(jobs))
    assert code == 0, text
    driver = browser
    driver.get((jobs / "report.html").as_uri())

    def shown() -> list[str]:
        return driver.execute_script(
            "return [...document.querySelectorAll('#jobs tbody tr')]"
            ".filter((r) => !r.hidden).map((r) => r.cells[0].dataset.v)")

    def page_text() -> str:
        return str(driver.find_element("id", "page").text)

    assert len(driver.find_elements("css selector", "#jobs tbody tr")) == 500  # one page
    assert driver.find_element("id", "shown").text == "1200 of 1200 shown"
    first = shown()
    assert len(first) == 500 and first[0].startswith("0001-") and page_text() == "page 1 of 3"
    driver.find_element("id", "next").click()
    second = shown()
    assert len(second) == 500 and second[0].startswith("0501-")
    driver.find_element("id", "next").click()
    assert len(shown()) == 200 and page_text() == "page 3 of 3"
    assert not driver.find_element("id", "next").is_enabled()

    keys = [h.get_attribute("data-key") for h in
            driver.find_elements("css selector", "#jobs th[data-key]")]
    mass = keys.index("interact.mass_2")
    driver.find_elements("css selector", "#jobs th[data-key]")[mass].click()
    driver.find_elements("css selector", "#jobs th[data-key]")[mass].click()  # descending
    top = shown()
    assert page_text() == "page 1 of 3" and top[0].startswith("1200-")
    minimum = driver.find_element("css selector", f'input[data-min="{mass - 1}"]')
    minimum.send_keys("2.1")  # mass_2 from 2.1 to 2.199: 100 jobs, one page
    assert len(shown()) == 100
    assert driver.find_element("id", "shown").text == "100 of 1200 shown"
    assert not driver.find_element("id", "pager").is_displayed()
