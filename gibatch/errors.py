"""Every error gibatch raises on purpose, in one tree; retry policy checks base classes only.

    GibatchError
    ├── TransientError          worth retrying with backoff
    │   ├── NetworkError        connection refused/reset, timeout, cut transfer
    │   └── ServerError         502/503/504 and other 5xx from the site or its proxy
    ├── SessionExpired          the site sent us to its login page: log in and retry
    ├── AmbiguousSubmit         a task POST may or may not have been accepted
    └── PermanentError          retrying cannot help
        ├── LoginFailed         the site did not accept the credentials
        ├── RequestRejected     a 4xx answer (400 names the bad field)
        ├── ProtocolError       a page we cannot read (the site changed?)
        ├── TaskFailed          the site ran the task and it failed
        ├── TransferError       a file did not arrive whole (size never matched)
        └── NoModelAvailable    every requested model number is held elsewhere

aiohttp and OS exceptions are translated in one place (`site.translate`), chained,
so callers never see them. Job and model number are attached where known.
"""

from __future__ import annotations


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
