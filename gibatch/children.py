"""Worker processes that never outlive gibatch, however it ends (SIGKILL included).

The local site's simulation workers and `gibatch match`'s scorers run in spawned
process pools. A spawned worker blocks on a queue whose write end it holds itself, so
it never sees its parent go: left alone it would finish a minutes-long task, then wait
forever, holding ~100 MB and the resource tracker's pipe (which keeps that alive too).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

log = logging.getLogger("gibatch")

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCHDOG_PERIOD_S = 0.5


def process_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` spawned processes that end when this process ends.

    spawn, not fork: the pool may be started inside a threaded program (a site in a
    thread of a client), and forking that is unsafe.
    """
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=die_with_parent, initargs=(os.getpid(),))


def die_with_parent(parent: int) -> None:
    """Worker initializer: end this worker when `parent` ends."""
    # Ctrl-C on a terminal reaches the whole process group; the parent decides what its
    # workers do, and a worker's KeyboardInterrupt would only print noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform == "linux":
        # The kernel kills us the moment the parent dies, even mid-computation. It fires
        # when the *thread* that started the worker ends: the pool spawns workers on
        # demand from the thread that submits (the site's event loop, match's main
        # thread), which outlives the pool.
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.debug("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    # Elsewhere (and should prctl fail), notice the parent's death by being re-parented.
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watchdog",
                     daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCHDOG_PERIOD_S)
    os._exit(1)  # no clean-up to do: the task's result has no one left to receive it


