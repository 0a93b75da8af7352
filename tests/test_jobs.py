"""Job discovery, validation messages (folder, file, field), and lineage."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from gibatch import steps
from gibatch.jobs import JobInvalid, discover, load_job, load_sweep
from tests.conftest import EXAMPLES, read_base


def problems_of(folder: Path) -> list[str]:
    with pytest.raises(JobInvalid) as info:
        load_job(folder)
    return [str(p) for p in info.value.problems]


def test_examples_are_valid() -> None:
    sweep = load_sweep(EXAMPLES / "sweep")
    assert sweep.problems == []
    assert len(sweep.jobs) == 6
    assert [s.name for s in sweep.jobs[0].steps] == [
        "galaxy1", "galaxy2", "merge", "interact", "plot1", "plot2"
    ]


def test_natural_order_and_dot_folders(tmp_path: Path) -> None:
    for name in ("10", "2", "1", ".gibatch", "a"):
        (tmp_path / name).mkdir()
    (tmp_path / "file.json").write_text("{}")
    assert [p.name for p in discover(tmp_path)] == ["1", "2", "10", "a"]


def test_a_job_folder_link_whose_target_is_gone_is_reported(
    make_job: Callable[..., Path], tmp_path: Path
) -> None:
    """An unmounted drive or a moved folder: the job is a problem, not left out unsaid.
    A link to a file is no job, as a file is not."""
    make_job("1")
    jobs = tmp_path / "jobs"
    (jobs / "2").symlink_to(tmp_path / "unmounted" / "2")
    (tmp_path / "notes.txt").write_text("x")
    (jobs / "notes").symlink_to(tmp_path / "notes.txt")
    sweep = load_sweep(jobs)
    assert [j.name for j in sweep.jobs] == ["1"]
    assert sweep.invalid_jobs == ["2"]
    assert [str(p) for p in sweep.problems] == [
        "2: cannot read the folder: No such file or directory"]


BROKEN = [
    ({"merge_json": '{"length_scale": {\n  "galaxy_1": 1,,}'},
     "job/merge.json: malformed JSON at line 2 column"),
    ({"interact_json": None}, "job/interact.json: file is missing"),
    ({"plot2_json": None, "plot3_json": read_base()["plot1.json"]},
     "job/plot3.json: plots must be numbered 1, 2, 3 ... without gaps: plot2.json is missing"),
    ({"merge_json": {**read_base()["merge.json"],
                     "velocity_galaxy_2": {"x": -100, "y": -100, "z": 0}}},
     "job/merge.json: velocity_galaxy_2.x: unknown key (velocity_galaxy_2 takes vx, vy, vz"),
    ({"merge_json": {**read_base()["merge.json"],
                     "velocity_galaxy_2": {"x": -100, "y": -100, "z": 0}}},
     "job/merge.json: velocity_galaxy_2.vx: missing"),
    ({"galaxy2_json": {**read_base()["galaxy2.json"], "galaxy_number": 1}},
     "job/galaxy2.json: galaxy_number: is 1 but this is galaxy2.json"),
    ({"galaxy1_json": {**read_base()["galaxy1.json"],
                       "disk": {"number_of_particles": 10**30, "mass_factor": 1}}},
     "job/galaxy1.json: disk.number_of_particles: Input should be less than or equal to 200000"),
    ({"interact_json": {**read_base()["interact.json"], "duration": "6"}},
     "job/interact.json: duration: Input should be a valid number"),
    ({"plot1_json": {**read_base()["plot1.json"], "x_min": 600}},
     "job/plot1.json: (top level): x_min must be below x_max"),
    ({"galaxy1_json": {**read_base()["galaxy1.json"], "components_to_use": ["disk", "gas"]}},
     "job/galaxy1.json: components_to_use.1: Input should be 'disk', 'bulge' or 'halo'"),
    ({"interact_json": "[1, 2]"}, "job/interact.json: must hold a JSON object"),
    # A Literal[1, 2] matches by equality: true and 1.0 were taken for 1.
    ({"galaxy1_json": {**read_base()["galaxy1.json"], "galaxy_number": True}},
     "job/galaxy1.json: galaxy_number: Input should be 1 or 2"),
    ({"galaxy1_json": {**read_base()["galaxy1.json"], "galaxy_number": 1.0}},
     "job/galaxy1.json: galaxy_number: Input should be 1 or 2"),
]


@pytest.mark.parametrize(("files", "expected"), BROKEN)
def test_broken_jobs_are_named_precisely(
    make_job: Callable[..., Path], files: dict[str, object], expected: str
) -> None:
    found = problems_of(make_job("job", **files))
    assert any(p.startswith(expected) for p in found), found


def test_sweep_keeps_good_jobs_and_reports_bad(
    make_job: Callable[..., Path], tmp_path: Path
) -> None:
    make_job("1")
    make_job("2", interact_json=None)
    make_job("3")
    sweep = load_sweep(tmp_path / "jobs")
    assert [j.name for j in sweep.jobs] == ["1", "3"]
    assert sweep.invalid_jobs == ["2"]


def test_lineage_follows_upstream_changes(make_job: Callable[..., Path]) -> None:
    base = load_job(make_job("a"))
    merge = {**read_base()["merge.json"], "theta_galaxy_2": 10}
    other = load_job(make_job("b", merge_json=merge))
    for step in (steps.GALAXY1, steps.GALAXY2):
        assert base.lineage[step] == other.lineage[step]
    for step in (steps.MERGE, steps.INTERACT, steps.plot(1), steps.plot(2)):
        assert base.lineage[step] != other.lineage[step]
    # key order and formatting in the file do not matter
    shuffled = json.dumps(dict(reversed(list(read_base()["merge.json"].items()))), indent=4)
    assert load_job(make_job("c", merge_json=shuffled)).lineage == base.lineage
