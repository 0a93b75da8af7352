"""Every error gibatch raises on purpose, in one tree; retry policy checks base classes only.

    GibatchError
    ├── TransientError          worth retrying with backoff
    │   ├── NetworkError        connection refused/reset, timeout, cut transfer
    │   └── ServerError         502/503/504 and other 5xx from the site or its proxy
    ├── SessionExpired          the site sent us to its login page: log in and retry
    ├── AmbiguousSubmit         a task POST may or may not have been accepted
    ├── ModelBusy               409: the model number's current task is still running
    ├── ModelStuck              a task has held the model number past the limit: set
    │                           it aside for the run, the job goes to another
    ├── ResultVanished          a result the job needs is gone (404/410, section replaced
    │                           or missing): work to redo, not a failure
    └── PermanentError          retrying cannot help
        ├── LoginFailed         the site did not accept the credentials
        ├── RequestRejected     a 4xx answer (400 names the bad field)
        ├── ProtocolError       a page we cannot read (the site changed?)
        ├── TaskFailed          the site ran the task and it failed
        ├── TransferError       a file did not arrive whole (size never matched)
        ├── JobFailed           this job cannot be finished (the reason says why)
        ├── LocalError          the local disk refused (EACCES, EROFS): names the path
        │   └── DiskFull        ENOSPC/EDQUOT: stops the run, nothing more can be saved
        └── NoModelAvailable    every requested model number is held elsewhere

aiohttp exceptions are translated in one place (`site.translate`), OS errors of local
files in another (`local_io`), chained, so callers never see them; a write error is
never taken for a network error. Job and model number are attached where known.
Anything else reaching a job's boundary is a bug: the job fails with its traceback
logged, and the run goes on (`run.py`).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class GibatchError(Exception):
    def __init__(self, message: str, *, job: str | None = None, model: int | None = None) -> None:
        super().__init__(message)
        self.job = job
        self.model = model

    def __str__(self) -> str:
        where = ", ".join(
            p for p in (f"job {self.job}" if self.job else "",
                        f"model {self.model}" if self.model else "") if p
        )
        return f"{super().__str__()} ({where})" if where else super().__str__()


class TransientError(GibatchError):
    pass


class NetworkError(TransientError):
    pass


class ServerError(TransientError):
    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(f"site answered {status}" + (f": {message}" if message else ""))
        self.status = status


class SessionExpired(GibatchError):
    pass


class AmbiguousSubmit(GibatchError):
    """The POST failed in a way that leaves open whether the site queued the task."""


class PermanentError(GibatchError):
    pass


class LoginFailed(PermanentError):
    pass


class RequestRejected(PermanentError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"site refused the request ({status}): {message}")
        self.status = status


class ProtocolError(PermanentError):
    pass


class TaskFailed(PermanentError):
    pass


class TransferError(PermanentError):
    pass


class NoModelAvailable(PermanentError):
    pass


class ModelBusy(GibatchError):
    """409: the model number's current task is still queued or running."""


class ModelStuck(GibatchError):
    """A task (the job's own or one started elsewhere) has been queued or running on the
    model number for longer than `RetryPolicy.stuck_after_s`: the site's worker died, or
    someone's task will not end. Nothing more can run there in this run."""


class ResultVanished(GibatchError):
    """A result the job needs is no longer on the site: its task must run again.

    `elsewhere`: a task started elsewhere (seen in the task list) replaced it, or the
    site lost gibatch's task: someone else's doing, which a busy model number may see
    often, not a sign that the site keeps deleting what it made."""

    def __init__(self, message: str, *, section: str | None = None, job: str | None = None,
                 model: int | None = None, elsewhere: bool = False) -> None:
        super().__init__(message, job=job, model=model)
        self.section = section
        self.elsewhere = elsewhere


class JobFailed(PermanentError):
    pass


class LocalError(PermanentError):
    """A local file could not be written or read for a reason the network cannot fix."""


class DiskFull(LocalError):
    pass


_FULL = {errno.ENOSPC, errno.EDQUOT}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EISDIR,
            errno.ENAMETOOLONG}


@contextmanager
def local_io(path: Path) -> Iterator[None]:
    """Map an OSError on a local file to LocalError/DiskFull naming `path`."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, GibatchError):
            raise
        reason = exc.strerror or type(exc).__name__
        if exc.errno in _FULL:
            raise DiskFull(f"disk full writing {path}: {reason}") from exc
        if exc.errno in _REFUSED:
            raise LocalError(f"cannot write {path}: {reason}") from exc
        raise LocalError(f"local file error on {path}: {reason}") from exc


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (possibly nested) exception groups, or `exc` itself."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
