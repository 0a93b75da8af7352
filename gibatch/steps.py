"""The step chain of one model number: galaxy 1, galaxy 2 -> merge -> interaction -> plots.

This is shared vocabulary: the job folder's file names, the site's section names and
job types, and which earlier results a new task clears (downstream invalidation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum


class Stage(IntEnum):
    """Position in the chain; a task clears every section of a later stage."""

    GALAXY = 0
    MERGE = 1
    INTERACT = 2
    PLOT = 3


# Relative server cost of each stage, used to rank which job a model number should take
# when the journal has no measured durations yet. The interaction dominates.
DEFAULT_STAGE_COST_S = {Stage.GALAXY: 1.0, Stage.MERGE: 0.5, Stage.INTERACT: 20.0, Stage.PLOT: 2.0}


@dataclass(frozen=True, order=True)
class Step:
    """One task of a job: `number` is the galaxy (1, 2) or plot (1..k) number, else 0."""

    stage: Stage
    number: int = 0

    # Names are asked for millions of times when a 100,000-job sweep is planned: each
    # is made once per Step object (jobs share their Step objects).
    @functools.cached_property
    def name(self) -> str:
        """The job-folder file stem: galaxy1, merge, interact, plot2."""
        return {
            Stage.GALAXY: f"galaxy{self.number}",
            Stage.MERGE: "merge",
            Stage.INTERACT: "interact",
            Stage.PLOT: f"plot{self.number}",
        }[self.stage]

    @property
    def filename(self) -> str:
        return f"{self.name}.json"

    @functools.cached_property
    def section(self) -> str:
        """The result section on the site, and the job's output folder name."""
        return {
            Stage.GALAXY: f"Galaxy {self.number}",
            Stage.MERGE: "Galaxy Merge",
            Stage.INTERACT: "Galaxy Interaction",
            Stage.PLOT: f"Plot {self.number}",
        }[self.stage]

    @property
    def job_type(self) -> str:
        """The job type the site shows in view_jobs for this task."""
        return "Plot" if self.stage is Stage.PLOT else self.section

    def __str__(self) -> str:
        return self.name


GALAXY1 = Step(Stage.GALAXY, 1)
GALAXY2 = Step(Stage.GALAXY, 2)
MERGE = Step(Stage.MERGE)
INTERACT = Step(Stage.INTERACT)


def plot(number: int) -> Step:
    return Step(Stage.PLOT, number)


def chain(plot_count: int) -> list[Step]:
    """Every step of a job with `plot_count` plots, in submission order."""
    return [GALAXY1, GALAXY2, MERGE, INTERACT, *(plot(k) for k in range(1, plot_count + 1))]


@functools.lru_cache(maxsize=4096)
def section_stage(section: str) -> Stage | None:
    """The stage a site section belongs to, or None for a name we do not know."""
    if section in ("Galaxy 1", "Galaxy 2"):
        return Stage.GALAXY
    if section == "Galaxy Merge":
        return Stage.MERGE
    if section == "Galaxy Interaction":
        return Stage.INTERACT
    if section.startswith("Plot "):
        return Stage.PLOT
    return None


def survives(section: str, new_task: Step) -> bool:
    """Whether `section` keeps its result when `new_task` is submitted on the same model."""
    stage = section_stage(section)
    if stage is None:
        return True
    if stage > new_task.stage:
        return False
    if new_task.stage is Stage.PLOT:
        return True  # plots append (or replace their own number); others stay
    return section != new_task.section
