"""The `gibatch` command line (typer)."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated

import anyio
import typer

from gibatch.errors import GibatchError, NoModelAvailable
from gibatch.jobs import STATE_DIR, load_sweep
from gibatch.journal import Journal
from gibatch.run import Listener, Options, Outcome, Scheduler, Summary
from gibatch.site import SiteClient

PASSWORD_ENV = "GIBATCH_PASSWORD"
EXIT_USAGE = 2
EXIT_NO_MODEL = 3

app = typer.Typer(
    help="Unattended, resumable parameter sweeps on the GI Simulator site.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
log = logging.getLogger("gibatch")


def parse_models(text: str) -> list[int]:
    """`1-4`, `1,3`, `2` -> sorted model numbers."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 1 or last < first:
                raise ValueError
            out.update(range(first, last + 1))
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a list of model numbers like 1-4 or 1,3") from None
    return sorted(out)


def _usage_error(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _password(password_file: Path | None) -> str:
    """From the environment, a file, or a hidden prompt: never from argv."""
    if password_file is not None:
        try:
            return password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise _usage_error(
                f"cannot read --password-file {password_file}: {exc.strerror}") from None
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if sys.stdin.isatty():
        return getpass.getpass("GI site password: ")
    raise _usage_error(f"no password: set {PASSWORD_ENV}, pass --password-file, "
                       "or run on a terminal to be asked")


def _setup_logging(log_file: Path | None) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("gibatch")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def _json_listener(path: Path) -> Listener:
    stream = path.open("a", buffering=1)

    def listen(event: str, fields: dict[str, object]) -> None:
        stream.write(json.dumps({"at": time.time(), "event": event, **fields}) + "\n")

    return listen


def _print_summary(summary: Summary) -> None:
    s = summary
    elapsed = s.ended - s.started
    typer.echo(f"\n{len(s.outcomes)} jobs in {elapsed:.1f} s: " + ", ".join(
        f"{s.count(o)} {o.value}" for o in Outcome if s.count(o)))
    typer.echo(f"tasks submitted: {s.tasks_submitted}, steps skipped: {s.steps_skipped}, "
               f"model numbers used: {', '.join(map(str, s.models_used)) or 'none'}")
    total = sum(s.requests.values())
    if s.tasks_submitted:
        typer.echo(f"requests to the site: {total} ({total / s.tasks_submitted:.1f} per task: "
                   + ", ".join(f"{k} {v}" for k, v in sorted(s.requests.items())) + ")")
    if s.dispatch_delays_s:
        delays = sorted(s.dispatch_delays_s)
        typer.echo(f"median delay from noticing a task's end to the next submission: "
                   f"{delays[len(delays) // 2]:.2f} s")
    for job, reason in s.reasons.items():
        typer.echo(f"  {job}: {reason}")


@app.command()
def run(
    jobs: Annotated[Path, typer.Option(help="Folder of job folders.")],
    models: Annotated[str, typer.Option(help="Model numbers to use, e.g. 1-4 or 1,3.")] = "1-4",
    concurrency: Annotated[int, typer.Option(min=1, help="Downloads at once.")] = 4,
    server: Annotated[str | None, typer.Option(
        help="Base URL of a GI site, e.g. https://HOST/ast80011. Default: the embedded one.")
    ] = None,
    username: Annotated[str | None, typer.Option(help="Account on --server.")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help=f"File holding the password (else ${PASSWORD_ENV}, else a prompt).")] = None,
    log_file: Annotated[Path | None, typer.Option(help="Append JSON lines of events.")] = None,
    grace: Annotated[float, typer.Option(help="Seconds to let work settle on Ctrl-C.")] = 30.0,
) -> None:
    """Run every job of a sweep, skipping what each model number already holds.

    Example: gibatch run --jobs examples/sweep --models 1-4 --concurrency 4
    """
    if not jobs.is_dir():
        raise _usage_error(f"--jobs {jobs}: no such folder")
    model_list = parse_models(models)
    if server is not None and not username:
        raise _usage_error("--server needs --username")
    secret = _password(password_file) if server is not None else ""
    _setup_logging(log_file)
    sweep = load_sweep(jobs)
    for problem in sweep.problems:
        typer.echo(f"invalid: {problem}", err=True)
    options = Options(jobs_dir=jobs, models=model_list, concurrency=concurrency, grace_s=grace)
    listener = _json_listener(log_file) if log_file else None

    async def main() -> Summary:
        journal = Journal(jobs)
        try:
            async with AsyncExitStack() as stack:
                if server is None:
                    from gibatch.sim.server import one_time_config, running_site

                    data = jobs / STATE_DIR / "site"
                    site = await stack.enter_async_context(running_site(
                        one_time_config(data, model_count=max(model_list))))
                    log.info("embedded GI site at %s", site.url)
                    client = SiteClient(site.url, site.username, site.password,
                                        site_key=f"embedded:{data.resolve()}")
                else:
                    client = SiteClient(server, username or "", secret)
                await stack.enter_async_context(client)
                return await Scheduler(client, sweep, options, journal, listener).execute()
        finally:
            journal.close()

    try:
        summary = anyio.run(main)
    except NoModelAvailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_NO_MODEL) from None
    except GibatchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


@app.command()
def check(jobs: Annotated[Path, typer.Option(help="Folder of job folders.")]) -> None:
    """Validate every job without touching any site; exit 1 if any is broken.

    Example: gibatch check --jobs examples/sweep
    """
    if not jobs.is_dir():
        raise _usage_error(f"--jobs {jobs}: no such folder")
    sweep = load_sweep(jobs)
    for problem in sweep.problems:
        typer.echo(str(problem))
    typer.echo(f"{len(sweep.jobs)} valid, {len(sweep.invalid_jobs)} invalid")
    raise typer.Exit(1 if sweep.problems else 0)


@app.command()
def serve(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1; 0 picks a free one.")] = 8000,
    user: Annotated[str, typer.Option(help="Account name.")] = "student",
    data_dir: Annotated[Path, typer.Option(help="Where results and state live.")] = Path(
        "gi-site-data"),
    model_count: Annotated[int, typer.Option(min=1)] = 4,
    session_lifetime: Annotated[float, typer.Option(help="Seconds a login lasts.")] = 1209600.0,
    error_rate: Annotated[float, typer.Option(help="Fault: share of requests answered 502.")] = 0.0,
    hang_rate: Annotated[float, typer.Option(
        help="Fault: share of requests never answered.")] = 0.0,
    cut_rate: Annotated[float, typer.Option(help="Fault: share of downloads cut midway.")] = 0.0,
    post_502_rate: Annotated[float, typer.Option(
        help="Fault: share of task POSTs accepted but answered 502.")] = 0.0,
) -> None:
    """Run the local GI Simulator site standalone (password from $GIBATCH_PASSWORD).

    Example: GIBATCH_PASSWORD=secret gibatch serve --port 8000 --user student
    """
    import secrets

    from gibatch.sim.app import SiteConfig
    from gibatch.sim.faults import Faults
    from gibatch.sim.server import running_site

    password = os.environ.get(PASSWORD_ENV) or secrets.token_urlsafe(12)
    config = SiteConfig(
        data_dir=data_dir, accounts={user: password}, model_count=model_count,
        session_lifetime_s=session_lifetime,
        faults=Faults(error_rate=error_rate, hang_rate=hang_rate, cut_rate=cut_rate,
                      post_502_rate=post_502_rate),
    )

    async def main() -> None:
        async with running_site(config, port=port) as site:
            typer.echo(f"Serving {site.url}", err=False)
            shown = "from $" + PASSWORD_ENV if os.environ.get(PASSWORD_ENV) else password
            typer.echo(f"Log in at {site.url}/accounts/login/ as {user!r}, password: {shown}")
            sys.stdout.flush()
            await anyio.sleep_forever()

    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(main)


def main() -> None:
    app()
