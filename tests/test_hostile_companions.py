"""Review 9: `sweep`, `match`, `search` and `report` against careless or hostile input.

Each test failed before its fix (see /work/notes/review9.md, probes in
/work/notes/probes9/)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gibatch import match, match_settings, search
from gibatch.jobs import job_files
from tests.conftest import tiny_job_files, write_job
from tests.test_search import MASS, THETA, tiny_search

# -- search: one study's trials are its own


def _ask(finder: search.Search) -> tuple[dict[str, object], dict[str, object]]:
    """A new trial's parameters, and the values its job folder holds."""
    job, number = finder._ask()
    trial = finder.study.get_trials(deepcopy=False)[number]
    return dict(trial.params), dict(search.job_values(job_files(job), finder.dims) or {})


@pytest.fixture
def found(tmp_path: Path) -> Path:
    jobs = tmp_path / "found"
    (jobs / ".gibatch").mkdir(parents=True)
    return jobs


def test_a_second_target_in_one_folder_never_takes_the_first_ones_trials(
        tmp_path: Path, found: Path) -> None:
    """A new target (here the centres given again) is a new study, numbered from 0: its
    trial 0 was the old study's folder `search-0000`, and it told the score of that
    folder's parameters for the ones it asked."""
    base, dims, target = tiny_search(tmp_path, THETA + MASS)
    first = search.Search(found, base, dims, target, match_settings.Settings(), 4, seed=1)
    try:
        asked, held = _ask(first)
        assert asked == held
    finally:
        first.close()
    other = match.load_target(tmp_path / "t.png", match_settings.parse_centres("13,12,40,30"))
    second = search.Search(found, base, dims, other, match_settings.Settings(), 4, seed=2)
    try:
        asked, held = _ask(second)
        assert asked == held
        assert (found / "search-0001").is_dir()
    finally:
        second.close()
    again = search.Search(found, base, dims, other, match_settings.Settings(), 4, seed=2)
    try:  # resumed, the second study keeps its numbering
        assert again.first == 1 and again._job_of(
            again.study.get_trials(deepcopy=False)[0]).name == "search-0001"
    finally:
        again.close()


@pytest.mark.parametrize("settings", [
    match_settings.Settings(metric=match_settings.Metric.IOU),
    match_settings.Settings(views=6), match_settings.Settings(kpc_per_px=(0.5, 2.0))])
def test_another_scoring_is_another_study(tmp_path: Path, found: Path,
                                          settings: match_settings.Settings) -> None:
    """Resumed with --metric iou, the study of SSIM scores was told IoU values."""
    base, dims, target = tiny_search(tmp_path, THETA)
    names = []
    for how in (match_settings.Settings(), settings, match_settings.Settings()):
        finder = search.Search(found, base, dims, target, how, 4, seed=1)
        names.append(finder.study.study_name)
        finder.close()
    assert names[0] != names[1] and names[0] == names[2]
    assert names[0] == f"{target.key}-{search.space_key(dims)}"  # as before: resumable


def test_a_folder_that_holds_other_values_is_not_taken_for_the_trial(
        tmp_path: Path, found: Path) -> None:
    base, dims, target = tiny_search(tmp_path, THETA)
    write_job(found, "search-0000", tiny_job_files(**{"merge.json": {"theta_galaxy_2": 7}}))
    finder = search.Search(found, base, dims, target, match_settings.Settings(), 4, seed=1)
    try:
        assert finder.first == 1  # past the folder already there
        finder.first = 0  # as a study begun before the numbering was kept
        with pytest.raises(search.SearchError, match=r"search-0000: holds "
                           r"merge.theta_galaxy_2 = 7, but it is trial 0's folder"):
            finder._ask()
    finally:
        finder.close()
