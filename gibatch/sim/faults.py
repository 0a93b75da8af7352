"""Fault injection for the local site: the failures the real course site's proxy shows.

Off by default. Each fault is a rate (0..1, drawn from a seeded generator so a test run
is repeatable) and can also be scripted: `script("cut", "/media/")` makes the next
request whose path contains "/media/" meet that fault, whatever the rates.

kinds:
  error      the proxy answers 502 Bad Gateway (after `error_delay_s`)
  hang       the request never answers (held `hang_s`, then dropped)
  cut        a file download stops mid-stream and the connection closes
  post_502   a task POST is accepted (the task is queued) but answered 502
  lost       a task POST is answered as accepted (with its job id where the site gives
             one), but the site loses the task: it is never listed nor run
  stuck      a task starts and never ends (the site's worker died on it): listed as
             Running for ever, it holds its model number (409 to every later POST, or
             with `queue` every later task waits behind it). Drawn as a task starts,
             on the path "task:STEP" (e.g. script("stuck", "task:interact")), browser
             tasks included.
  browser    someone starts a task "in the browser" on the model number the request
             concerns (view_data/N, a file of model N, a task POST for N; any other
             request: a random one of the account's), as soon as that model is free:
             at once if it is idle, else the moment its current task ends (before any
             client can see that end). `browser_step` fixes the kind of task
             (galaxy1, galaxy2, merge, interact, plot); unset, each click draws one.
Session expiry is a site setting (`session_lifetime_s`), not a fault here.
"""

from __future__ import annotations

import random
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["error", "hang", "cut", "post_502", "lost", "stuck", "browser"]


@dataclass
class Faults:
    error_rate: float = 0.0
    hang_rate: float = 0.0
    cut_rate: float = 0.0
    post_502_rate: float = 0.0
    lost_rate: float = 0.0
    stuck_rate: float = 0.0
    browser_rate: float = 0.0
    browser_step: str | None = None
    error_delay_s: float = 0.0
    hang_s: float = 3600.0
    seed: int = 0
    _scripted: deque[tuple[FaultKind, str]] = field(default_factory=deque, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    injected: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def update(self, **rates: float | str | None) -> None:
        """Change rates while the site runs (tests call this from another thread)."""
        with self._lock:
            for name, value in rates.items():
                if not hasattr(self, name) or name.startswith("_"):
                    raise AttributeError(f"no fault setting {name!r}")
                setattr(self, name, value)

    def script(self, kind: FaultKind, path_contains: str = "", times: int = 1) -> None:
        with self._lock:
            self._scripted.extend([(kind, path_contains)] * times)

    def clear(self) -> None:
        with self._lock:
            self._scripted.clear()
            self.error_rate = self.hang_rate = self.cut_rate = self.post_502_rate = 0.0
            self.lost_rate = self.stuck_rate = self.browser_rate = 0.0

    @property
    def rng(self) -> random.Random:
        """The seeded generator, for what a fault does once drawn (a click's task)."""
        return self._rng

    def draw(self, kind: FaultKind, path: str) -> bool:
        """Whether this request meets fault `kind` (a scripted one is consumed)."""
        with self._lock:
            for i, (k, needle) in enumerate(self._scripted):
                if k == kind and needle in path:
                    del self._scripted[i]
                    return self._count(kind)
            rate = getattr(self, f"{kind}_rate")
            if rate > 0 and self._rng.random() < rate:
                return self._count(kind)
        return False

    def _count(self, kind: str) -> bool:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        return True
