"""Runs queued tasks in a process pool: one task at a time per model number, model
numbers concurrently, at most `workers` tasks computing at once.

The workers never outlive the site's process: each dies with its parent however the
parent ends (SIGKILL included), and closing the site ends them at once. multiprocessing's
resource tracker (spawn starts one for the pool's semaphores) needs nothing of its own:
it exits when the last holder of its pipe is gone, and those are the parent and these
workers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gibatch.children import process_pool
from gibatch.sim.physics import Physics
from gibatch.sim.store import Store, Task, TaskStatus

log = logging.getLogger("gibatch.sim")

_INPUTS = {  # which sections a task reads
    "galaxy1": (), "galaxy2": (), "merge": ("Galaxy 1", "Galaxy 2"),
    "interact": ("Galaxy Merge",), "plot": ("Galaxy Interaction",),
}


def execute(step: str, payload: dict[str, Any], inputs: list[str | None], out: str,
            physics: str = Physics.RESTRICTED.value) -> str | None:
    """Run one task in a worker process; return None, or the reason it failed."""
    from gibatch.sim import tasks  # only workers load the simulator (see `preload`)

    folder = Path(out)
    paths = [Path(p) if p else None for p in inputs]
    try:
        if step.startswith("galaxy"):
            tasks.run_galaxy(payload, folder)
        elif step == "merge":
            tasks.run_merge(payload, paths[0], paths[1], folder)
        elif step == "interact":
            tasks.run_interact(payload, paths[0], folder, Physics(physics))
        else:
            tasks.run_plot(payload, paths[0], folder)
    except tasks.TaskFailed as exc:
        return str(exc)
    except Exception:  # a bug in the simulator must still fail the task, not the site
        return "internal error in the simulator:\n" + traceback.format_exc()
    return None


def preload() -> None:
    """Load the simulator (numpy, scipy, h5py, pillow: about a second) in a worker.

    The site's own process never needs it, and that process is often gibatch's client
    (the embedded site): importing it there delayed the first submission by as much."""
    from gibatch.sim import tasks  # noqa: F401


WORKER_EXIT_S = 5.0  # after SIGTERM, before SIGKILL


def _ledger(folder: Path) -> list[tuple[str, int, str]]:
    """(name, size, sha256) of every file a task wrote."""
    return [(f.name, f.stat().st_size, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in sorted(folder.iterdir()) if f.is_file()]


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
                 on_end: TaskEnd | None = None, physics: Physics = Physics.RESTRICTED) -> None:
        self.store = store
        self.media = media
        self.physics = physics
        self.workers = workers or default_workers()
        self._on_end = on_end or (lambda task, status: store.set_status(task.job_id, status))
        self._pool = process_pool(self.workers)
        self._slots = asyncio.Semaphore(self.workers)
        self._running: set[asyncio.Task[None]] = set()

    def warm(self) -> None:
        """Start every worker now and load the simulator in it, while the client logs
        in, instead of on the first tasks (which then took a second longer and taught
        the client's poller a wrong duration). The pool spawns one worker per call it
        has no idle worker for."""
        for _ in range(self.workers):
            self._pool.submit(preload)

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
            inputs: list[str | None] = []
            read: list[int] = []
            for section in _INPUTS[task.step]:
                job = await asyncio.to_thread(
                    self.store.section_job, task.username, task.model, section
                )
                ok = job is not None and self.store.status(job) is TaskStatus.COMPLETED
                inputs.append(
                    str(self.task_dir(task.username, task.model, job))
                    if job is not None and ok else None
                )
                read += [job] if job is not None and ok else []
            loop = asyncio.get_running_loop()
            try:
                error = await loop.run_in_executor(
                    self._pool, execute, task.step, json.loads(task.payload), inputs, str(out),
                    self.physics.value,
                )
            except Exception as exc:  # the pool itself broke: fail the task, keep the site
                error = f"internal error: the simulator's worker process failed: {exc!r}"
            if error is not None:
                (out / "error.txt").write_text(error + "\n")
            await asyncio.to_thread(self.store.record_output, task.job_id, _ledger(out), read)
            status = TaskStatus.FAILED if error else TaskStatus.COMPLETED
            self._on_end(task, status)
            log.debug("task %d %s model %d: %s", task.job_id, task.step, task.model, status.value)

    async def close(self) -> None:
        """Stop now. A task still computing is abandoned rather than awaited: its status
        stays Running, so a restarted site runs it again from scratch, and its result
        would have had no one to receive it anyway."""
        for t in list(self._running):
            t.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        await asyncio.to_thread(self._stop_workers)

    def _stop_workers(self) -> None:
        workers = list((self._pool._processes or {}).values())  # shutdown() forgets them
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join(WORKER_EXIT_S)
            if worker.is_alive():
                worker.kill()
                worker.join()
        # The pool's manager thread sees its workers gone and winds up; this joins it.
        self._pool.shutdown(wait=True, cancel_futures=True)
