"""What `plan` and `status` print: rich tables over the planner and the status reader.

Kept apart from `cli.py` so the command line stays a thin layer of options.
"""

from __future__ import annotations

import time

import anyio
from rich.console import Console
from rich.table import Table

from gibatch import record
from gibatch.display import format_duration
from gibatch.holdings import Holdings
from gibatch.jobs import Sweep
from gibatch.journal import Journal
from gibatch.memory import ModelMemory
from gibatch.plan import make_plan
from gibatch.poller import newest
from gibatch.site import SiteClient, TaskState
from gibatch.status import JobState, sweep_status
from gibatch.steps import DEFAULT_STAGE_COST_S, Stage
from gibatch.text import cell, first_line, printable

MAX_LISTED = 20  # failed or invalid jobs named one by one; the rest are counted


def _say(console: Console, text: str) -> None:
    """A plain line: no markup read into job names, no wrapping inside it, and no
    escape sequence from the site's words (a foreign task's type in plan's notes)."""
    console.print(printable(text), soft_wrap=True, markup=False, highlight=False)


async def _site_check(client: SiteClient, models: list[int], journal: Journal, site: str,
                      holdings: dict[int, Holdings], notes: list[str]) -> None:
    """Account for tasks this gibatch did not start, by the same rules as `run`.

    Each model's memory reads the site's task list: a foreign task's effect is applied
    as the site would (a foreign plot adds a section, a foreign galaxy clears all that
    depends on it), so the plan skips only what the model still holds for sure.
    Nothing is written: a run may be using the journal.
    """
    async with client:
        await client.login()
        rows = await client.tasks()
    for model in models:
        memory = ModelMemory.load(model, site, journal, readonly=True)
        top = newest(rows, model)
        if top is not None and top.state is TaskState.ACTIVE:
            notes.append(f"model {model} is busy now with task {top.job_id} ({top.job_type})")
        if memory.last_task_id < 0:  # never used by gibatch: nothing held is known
            holdings[model] = {}
            continue
        before = dict(memory.held)
        foreign = memory.observe(rows)
        if foreign:
            lost = sorted(set(before) - {s for s, v in memory.held.items()
                                         if before.get(s) == v})
            notes.append(f"model {model}: {len(foreign)} task(s) started elsewhere "
                         f"(newest {foreign[-1].job_id}, {foreign[-1].job_type}); "
                         + (f"no longer counted as held: {', '.join(lost)}" if lost
                            else "nothing held was touched"))
        holdings[model] = dict(memory.held)


def show_plan(console: Console, sweep: Sweep, models: list[int], site: str,
              client: SiteClient | None) -> None:
    journal = Journal(sweep.root)
    try:
        holdings = {m: journal.held(site, m) for m in models}
        notes: list[str] = []
        if client is not None:
            anyio.run(_site_check, client, models, journal, site, holdings, notes)
        cost = journal.stage_estimates()
        measured = set(journal.mean_durations())
    finally:
        journal.close()
    done = record.completed(sweep.root, sweep.jobs)
    todo = [j for j in sweep.jobs if j.name not in done]
    plan = make_plan(todo, holdings, cost)

    table = Table(title=cell(f"plan for {sweep.root} on model numbers "
                             f"{', '.join(map(str, models))}"))
    for column in ("job", "model", "start", "runs", "skips"):
        table.add_column(column)
    for a in plan.assignments:
        table.add_row(cell(a.job), str(a.model), format_duration(a.start_s),
                      " ".join(s.name for s in a.run) or "-",
                      " ".join(s.name for s in a.skipped) or "-")
    console.print(table)
    for note in notes:
        _say(console, f"note: {note}")
    _say(console,
        f"{len(todo)} jobs to run ({len(done)} already complete, "
        f"{len(sweep.invalid_jobs)} invalid): {plan.tasks} tasks for "
        f"{plan.job_steps} job steps ({plan.job_steps - plan.tasks} skipped)")
    basis = ", ".join(
        f"{stage.name.lower()} {cost[stage]:.1f} s"
        f"{'' if int(stage) in measured else ' (default)'}" for stage in Stage)
    _say(console, f"estimated duration: {format_duration(plan.makespan_s)} on "
                  f"{len(models)} model numbers (per task: {basis})")
    if not measured:
        default = DEFAULT_STAGE_COST_S[Stage.INTERACT]
        _say(console, "(defaults are rough: after a first run the journal's measured "
                      f"durations are used; default interaction {default:.0f} s)")


def show_status(console: Console, sweep: Sweep, recent: int) -> None:
    journal = Journal(sweep.root)
    try:
        st = sweep_status(sweep, journal, recent)
    finally:
        journal.close()
    if st.live_pids:
        _say(console, f"run in progress (pid {', '.join(map(str, st.live_pids))}): elapsed "
                      f"{format_duration(st.elapsed_s)}, ETA {format_duration(st.eta_s)}")
    elif st.run_started is None:
        _say(console, "no run yet")
    else:
        ended = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.run_ended or 0))
        _say(console, f"no run in progress; the last one took "
                      f"{format_duration(st.elapsed_s)}, ended {ended}")
    _say(console, ", ".join(f"{st.count(s)} {s.value}" for s in JobState))

    per_model = Table(title="per model number")
    for column in ("model", "complete", "failed", "now"):
        per_model.add_column(column)
    models = sorted({j.model for j in st.jobs if j.model is not None})
    for m in models:
        mine = [j for j in st.jobs if j.model == m]
        running = [f"{j.name} ({j.step or 'starting'})" for j in mine
                   if j.state is JobState.RUNNING]
        per_model.add_row(str(m), str(sum(j.state is JobState.COMPLETE for j in mine)),
                          str(sum(j.state is JobState.FAILED for j in mine)),
                          cell(", ".join(running) or "-"))
    if models:
        console.print(per_model)
    for state in (JobState.FAILED, JobState.INVALID):  # a summary, whatever the sweep's size
        shown = [j for j in st.jobs if j.state is state]
        for j in shown[:MAX_LISTED]:
            _say(console, f"{state.value}: {printable(j.name)}: {first_line(j.reason or '')}")
        if len(shown) > MAX_LISTED:
            _say(console, f"{state.value}: ... and {len(shown) - MAX_LISTED} more "
                          "(all of them in `gibatch report` and `gibatch check`)")
    if st.last_events:
        _say(console, "last events:")
        for e in st.last_events:
            when = time.strftime("%H:%M:%S", time.localtime(e.at))
            where = " ".join(p for p in (e.job and f"job {e.job}", e.model and f"model {e.model}",
                                         e.step) if p)
            where = printable(where)
            _say(console, f"  {when} {e.event} {where}"
                          f"{': ' + first_line(e.detail) if e.detail else ''}")
