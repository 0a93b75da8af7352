"""What a model number holds, and how a task changes it: the rules both the scheduler
(`run`) and its dry run (`plan`) follow, so that the plan predicts what the run does.

A model's holdings map each result section the site shows for it (`Galaxy 1`, ...,
`Plot 3`) to the lineage of the parameters that produced it (see `jobs.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from gibatch.jobs import Job
from gibatch.steps import Stage, Step, section_stage, survives

Holdings = dict[str, str]  # section name -> lineage
FAILED_MARK = "!failed"  # a section whose task failed: counted for numbering, never reused


def held_section(held: Mapping[str, str], job: Job, step: Step) -> str | None:
    """The section on this model that already holds `step`'s result for `job`, if any.

    A plot may be reused from any plot section (numbering only says where it is shown);
    every other step only from its own section.
    """
    lineage = job.lineage[step]
    if step.stage is not Stage.PLOT:
        return step.section if held.get(step.section) == lineage else None
    for name, value in sorted(held.items()):
        if section_stage(name) is Stage.PLOT and value == lineage:
            return name
    return None


def new_section(held: Mapping[str, str], step: Step) -> str:
    """The section a new task of `step` will fill: plots append after the last one."""
    if step.stage is not Stage.PLOT:
        return step.section
    plots = sum(1 for s in held if section_stage(s) is Stage.PLOT)
    return f"Plot {plots + 1}"


def after_task(held: Mapping[str, str], step: Step, section: str, lineage: str,
               completed: bool) -> Holdings:
    """The holdings once a task of `step` into `section` has finished (site rules)."""
    out = {s: v for s, v in held.items() if survives(s, step)}
    out[section] = lineage if completed else FAILED_MARK
    return out


def saving(held: Mapping[str, str], job: Job, cost: Mapping[Stage, float]) -> float:
    """Seconds of site time this model saves on `job` by what it already holds."""
    return sum(cost[step.stage] for step in job.steps if held_section(held, job, step) is not None)


def best_job(pending: Sequence[Job], held: Mapping[str, str],
             cost: Mapping[Stage, float]) -> int:
    """Index of the pending job saving the most here; ties go to the earliest."""
    return min(range(len(pending)), key=lambda i: (-saving(held, pending[i], cost), i))


def section_step(section: str) -> Step:
    """The step whose task fills `section` (`Plot 3` -> plot 3)."""
    stage = section_stage(section)
    if stage is None:
        raise ValueError(f"not a result section: {section!r}")
    number = int(section.rsplit(" ", 1)[-1]) if stage in (Stage.GALAXY, Stage.PLOT) else 0
    return Step(stage, number)
