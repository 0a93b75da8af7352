"""Starting the local site: in the caller's event loop (the embedded default, `serve`)
or in a thread of its own (tests, synchronous callers)."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import anyio
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from gibatch.sim.app import Site, SiteConfig, create_app

LOOPBACK = "127.0.0.1"
EMBEDDED_USER = "gibatch"
SHUTDOWN_GRACE_S = 2.0
T = TypeVar("T")


class _ClientFaultInOneLine(logging.Filter):
    """aiohttp logs a request it cannot parse at all (a raw non-ASCII byte in the URL, a
    broken request line or chunk) as an error with a traceback, as if the site had
    failed. It is the client's doing, and answered 400: one warning line says it all.
    Errors in the site's own handlers keep their tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())  # one line, whatever was sent
            record.msg, record.args = f"{record.getMessage()}: {exc.code} {reason}", ()
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


HTTP_LOG = logging.getLogger("gibatch.sim.http")  # aiohttp's server log, for this site
HTTP_LOG.addFilter(_ClientFaultInOneLine())


@dataclass(frozen=True)
class RunningSite:
    """A listening local site: its base URL, and the one account it was started with."""

    url: str
    username: str
    password: str = field(repr=False)
    site: Site = field(repr=False)


def one_time_config(data_dir: Path, username: str = EMBEDDED_USER, **options: object) -> SiteConfig:
    """A site config with a single account whose password is random and never shown."""
    return SiteConfig(data_dir=data_dir, accounts={username: secrets.token_urlsafe(18)},
                      **options)  # type: ignore[arg-type]


@asynccontextmanager
async def running_site(
    config: SiteConfig, host: str = LOOPBACK, port: int = 0
) -> AsyncIterator[RunningSite]:
    """Serve `config` on host:port (0 picks a free port) until the block ends."""
    app, site = create_app(config)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S,
                           logger=HTTP_LOG)
    await runner.setup()
    try:
        tcp = web.TCPSite(runner, host, port)
        await tcp.start()
        bound_host, bound_port = runner.addresses[0][:2]
        user, password = next(iter(config.accounts.items()), ("", ""))
        yield RunningSite(f"http://{bound_host}:{bound_port}{config.prefix}", user, password, site)
    finally:
        await runner.cleanup()


async def until_stopped() -> signal.Signals:
    """Wait for Ctrl-C or SIGTERM and return which came.

    SIGTERM (`kill`, a service manager, a container stopping) is handled like Ctrl-C
    rather than left to its default action, which ends the process on the spot: so the
    site closes its store and ends its workers, and the process exits 0.
    """
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            return signum
    raise AssertionError("the signal receiver never ends")  # pragma: no cover


class ThreadedSite:
    """A local site on its own event loop in a daemon thread; `stop()` ends it."""

    def __init__(self, config: SiteConfig, port: int = 0) -> None:
        self._ready: Future[RunningSite] = Future()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._main(config, port)), daemon=True, name="gi-site"
        )
        self._thread.start()
        self.running = self._ready.result(timeout=60)

    async def _main(self, config: SiteConfig, port: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with running_site(config, port=port) as running:
                self._ready.set_result(running)
                await self._stop.wait()
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the site's event loop and return its result (e.g. a browser click:
        `threaded.call(lambda: threaded.running.site.click("alice", 2))`)."""
        assert self._loop is not None
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result(timeout=30)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
