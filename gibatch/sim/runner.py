"""Runs queued tasks in a process pool: one task at a time per model number, model
numbers concurrently, at most `workers` tasks computing at once."""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from gibatch.sim import tasks
from gibatch.sim.store import Store, Task, TaskStatus

log = logging.getLogger("gibatch.sim")

_INPUTS = {  # which sections a task reads
    "galaxy1": (), "galaxy2": (), "merge": ("Galaxy 1", "Galaxy 2"),
    "interact": ("Galaxy Merge",), "plot": ("Galaxy Interaction",),
}


def execute(step: str, payload: dict[str, Any], inputs: list[str | None], out: str) -> str | None:
    """Run one task in a worker process; return None, or the reason it failed."""
    folder = Path(out)
    paths = [Path(p) if p else None for p in inputs]
    try:
        if step.startswith("galaxy"):
            tasks.run_galaxy(payload, folder)
        elif step == "merge":
            tasks.run_merge(payload, paths[0], paths[1], folder)
        elif step == "interact":
            tasks.run_interact(payload, paths[0], folder)
        else:
            tasks.run_plot(payload, paths[0], folder)
    except tasks.TaskFailed as exc:
        return str(exc)
    except Exception:  # a bug in the simulator must still fail the task, not the site
        return "internal error in the simulator:\n" + traceback.format_exc()
    return None


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)


TaskEnd = Callable[[Task, TaskStatus], None]


class Runner:
    """Owns the process pool; `start(task)` runs a queued task to Completed or Failed.

    `on_end(task, status)` records the end; it runs on the event loop with no await
    between it and the task's last file, so what it does next (a browser click waiting
    for the model to be free) happens before any request can see the task finished.
    """

    def __init__(self, store: Store, media: Path, workers: int | None = None,
                 on_end: TaskEnd | None = None) -> None:
        self.store = store
        self.media = media
        self.workers = workers or default_workers()
        self._on_end = on_end or (lambda task, status: store.set_status(task.job_id, status))
        # spawn: the site may run inside a threaded client; forking that is unsafe.
        self._pool = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn")
        )
        self._slots = asyncio.Semaphore(self.workers)
        self._running: set[asyncio.Task[None]] = set()

    def task_dir(self, username: str, model: int, job_id: int) -> Path:
        return self.media / username / str(model) / str(job_id)

    def start(self, task: Task) -> None:
        t = asyncio.get_running_loop().create_task(self._run(task))
        self._running.add(t)
        t.add_done_callback(self._running.discard)

    async def _run(self, task: Task) -> None:
        async with self._slots:
            await asyncio.to_thread(self.store.set_status, task.job_id, TaskStatus.RUNNING)
            out = self.task_dir(task.username, task.model, task.job_id)
            shutil.rmtree(out, ignore_errors=True)  # a restarted task starts clean
            out.mkdir(parents=True)
            inputs = []
            for section in _INPUTS[task.step]:
                job = await asyncio.to_thread(
                    self.store.section_job, task.username, task.model, section
                )
                ok = job is not None and self.store.status(job) is TaskStatus.COMPLETED
                inputs.append(
                    str(self.task_dir(task.username, task.model, job))
                    if job is not None and ok else None
                )
            loop = asyncio.get_running_loop()
            try:
                error = await loop.run_in_executor(
                    self._pool, execute, task.step, json.loads(task.payload), inputs, str(out)
                )
            except Exception as exc:  # the pool itself broke: fail the task, keep the site
                error = f"internal error: the simulator's worker process failed: {exc!r}"
            if error is not None:
                (out / "error.txt").write_text(error + "\n")
            status = TaskStatus.FAILED if error else TaskStatus.COMPLETED
            self._on_end(task, status)
            log.debug("task %d %s model %d: %s", task.job_id, task.step, task.model, status.value)

    async def close(self) -> None:
        for t in list(self._running):
            t.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
