"""The live view of a run on a terminal: overall progress with ETA, one line per model
number, and running counts. It is a scheduler listener, fed the same events as the
journal; rich's `Live` redraws it a few times a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from rich.console import Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from gibatch.journal import Event
from gibatch.status import eta_s
from gibatch.text import cell


@dataclass
class ModelLine:
    job: str = "-"
    step: str = "-"
    state: str = "idle"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


_STATE_OF_EVENT = {
    Event.JOB_START: "starting",
    Event.STEP_SKIPPED: "skipped (held)",
    Event.STEP_SUBMITTED: "running on the site",
    Event.STEP_ADOPTED: "running on the site",
    Event.STEP_COMPLETED: "completed",
    Event.STEP_FAILED: "failed",
    Event.JOB_FAILED: "job failed",
    Event.JOB_INTERRUPTED: "stopped",
}


class RunDisplay:
    """Listener and renderable at once: `Live(display)` shows what `display(...)` heard."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = clock()
        self.total = 0
        self.done = 0
        self.failed = 0
        self.skipped_steps = 0
        self.tasks = 0
        self.models: dict[int, ModelLine] = {}

    def __call__(self, event: str, fields: dict[str, object]) -> None:
        kind = Event(event)
        model = fields.get("model")
        if kind is Event.RUN_START:
            self.started = self._clock()
            self.total = int(str(fields.get("jobs", 0)))
            models = fields.get("models")
            for m in models if isinstance(models, list) else ():
                self.models.setdefault(int(m), ModelLine())
        elif kind is Event.JOB_COMPLETE:
            self.done += 1
        elif kind is Event.JOB_FAILED:
            self.failed += 1
        elif kind is Event.STEP_SKIPPED:
            self.skipped_steps += 1
        elif kind is Event.STEP_SUBMITTED:
            self.tasks += 1
        if isinstance(model, int) and kind in _STATE_OF_EVENT:
            line = self.models.setdefault(model, ModelLine())
            line.job = str(fields.get("job") or line.job)
            line.step = str(fields.get("step") or ("-" if kind is Event.JOB_START else line.step))
            line.state = _STATE_OF_EVENT[kind]

    def eta_s(self) -> float | None:
        finished = self.done + self.failed
        return eta_s(finished, self.total - finished, self._clock() - self.started)

    def __rich__(self) -> RenderableType:
        finished = self.done + self.failed
        elapsed = self._clock() - self.started
        head = Table.grid(padding=(0, 1))
        head.add_row(
            ProgressBar(total=max(self.total, 1), completed=finished, width=40),
            Text(f"{finished}/{self.total} jobs"),
            Text(f"elapsed {format_duration(elapsed)}"),
            Text(f"ETA {format_duration(self.eta_s())}"),
        )
        models = Table(box=None, pad_edge=False, show_edge=False)
        for column in ("model", "job", "step", "state"):
            models.add_column(column)
        for number, line in sorted(self.models.items()):
            models.add_row(str(number), cell(line.job), cell(line.step), line.state)
        counts = Text(f"done {self.done}  failed {self.failed}  tasks submitted {self.tasks}  "
                      f"steps skipped {self.skipped_steps}")
        return Group(head, models, counts)
