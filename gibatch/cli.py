"""The `gibatch` command line (typer)."""

from __future__ import annotations

import contextlib
import gc
import getpass
import ipaddress
import json
import logging
import os
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import anyio
import typer
from rich.console import Console
from rich.live import Live
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gibatch import discovery, match_settings
from gibatch import sweep as sweep_module
from gibatch.display import RunDisplay
from gibatch.errors import GibatchError, NoModelAvailable
from gibatch.jobs import STATE_DIR, Sweep, discover
from gibatch.journal import Journal
from gibatch.run import Listener, Options, Outcome, Scheduler, Summary
from gibatch.sim.physics import Physics
from gibatch.site import SiteClient
from gibatch.text import EscapeArgs, cell, first_line, printable

if TYPE_CHECKING:
    from gibatch import match, search

PASSWORD_ENV = "GIBATCH_PASSWORD"
EXIT_USAGE = 2
EXIT_NO_MODEL = 3
# A password file holds one line; a bound keeps /dev/zero from filling the memory.
_MAX_PASSWORD_FILE_BYTES = 4096

app = typer.Typer(
    help="Unattended, resumable parameter sweeps on the GI Simulator site.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
log = logging.getLogger("gibatch")


# An account has a few model numbers (the course site gives 3, the local one 4 by
# default); each one used is a worker here and a slot on the embedded site. A range
# beyond this is a typo (1-100000000 for 1-10), refused before it is expanded.
MAX_MODEL_NUMBER = 100


def parse_models(text: str) -> list[int]:
    """`1-4`, `1,3`, `2` -> sorted model numbers, each from 1 to MAX_MODEL_NUMBER."""
    out: set[int] = set()
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            first, last = int(lo), int(hi or lo)
            if first < 1 or last < first:
                raise ValueError
            if last > MAX_MODEL_NUMBER:
                raise typer.BadParameter(
                    f"{printable(text)!r}: model numbers go up to {MAX_MODEL_NUMBER} at most "
                    "(an account has a few: the course site gives 3)")
            out.update(range(first, last + 1))
    except ValueError:
        raise typer.BadParameter(
            f"{printable(text)!r} is not a list of model numbers like 1-4 or 1,3") from None
    return sorted(out)


def _fail(message: object, code: int) -> typer.Exit:
    """Print `error: message` and give the exit to raise. Messages carry the site's
    and the files' text: escaped, so that no escape sequence reaches the terminal."""
    typer.echo(f"error: {printable(str(message))}", err=True)
    return typer.Exit(code)


def _usage_error(message: str) -> typer.Exit:
    return _fail(message, EXIT_USAGE)


def _password(password_file: Path | None) -> str:
    """From the environment, a file, or a hidden prompt: never from argv.

    A file loses one trailing newline (`echo` adds it), nothing more: a password may
    end in spaces or even in a second newline.
    """
    if password_file is not None:
        try:
            with password_file.open("rb") as f:
                data = f.read(_MAX_PASSWORD_FILE_BYTES + 1)
        except OSError as exc:
            raise _usage_error(
                f"cannot read --password-file {password_file}: {exc.strerror}") from None
        if len(data) > _MAX_PASSWORD_FILE_BYTES:
            raise _usage_error(f"--password-file {password_file} is larger than "
                               f"{_MAX_PASSWORD_FILE_BYTES} bytes; it holds only the password")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _usage_error(f"--password-file {password_file} is not UTF-8 text") from None
        return text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    if (from_env := _env_password()) is not None:
        return from_env
    if sys.stdin.isatty():
        return getpass.getpass("GI site password: ")
    raise _usage_error(f"no password: set {PASSWORD_ENV}, pass --password-file, "
                       "or run on a terminal to be asked")


def _env_password() -> str | None:
    """$GIBATCH_PASSWORD if set and not empty; a usage error if it is not UTF-8.

    Python keeps undecodable bytes as surrogates, which fail far later, in an
    exception whose message holds the password: checked here, and never echoed.
    """
    value = os.environ.get(PASSWORD_ENV)
    if not value:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _usage_error(f"${PASSWORD_ENV} is not UTF-8 text (set it from a UTF-8 "
                           "file, or pass --password-file)") from None
    return value


def _os_reason(exc: OSError) -> str:
    """`path: reason` of an OSError, as one line (escaped by _fail)."""
    where = exc.filename if exc.filename is not None else ""
    return f"{os.fsdecode(where)}: {exc.strerror or exc}" if where else str(exc.strerror or exc)


def _load_sweep(jobs: Path) -> Sweep:
    """The sweep, through the discovery cache. Its jobs live as long as the command:
    `gc.freeze` spares the cyclic collector walking 100,000 of them again and again
    (a full collection in the middle of a run stalls the event loop for 0.3 s)."""
    sweep = discovery.load_sweep(jobs)
    gc.freeze()
    return sweep


def _jobs_dir(jobs: Path) -> Path:
    """`jobs` if it is a folder gibatch can list; else a clear error, exit 1."""
    if not jobs.is_dir():
        raise _usage_error(f"--jobs {printable(str(jobs))}: "
                           + ("is not a folder" if jobs.exists() else "no such folder"))
    try:
        discover(jobs)
    except OSError as exc:
        typer.echo(f"error: cannot list {printable(str(jobs))}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    state = jobs / STATE_DIR
    if (state.exists() or state.is_symlink()) and not state.is_dir():
        raise _fail(f"{state} is not a folder: gibatch keeps its journal and caches in a "
                    f"folder of that name; move the file away", 1)
    return jobs


def _made(jobs: Path) -> Path:
    """`jobs`, made if missing; a usage error if it cannot be (a file on its path)."""
    if not jobs.is_dir():
        try:
            jobs.mkdir(parents=True)
        except OSError as exc:
            raise _usage_error(f"--jobs: cannot make the folder {_os_reason(exc)}") from None
    return jobs


def _require_job_folders(jobs: Path) -> Path:
    """`jobs` if it holds at least one job folder; else exit 1.

    An empty sweep is almost always a wrong --jobs path: `check` must not call it
    valid, nor `run` report success having done nothing.
    """
    if not discover(_jobs_dir(jobs)):
        typer.echo(f"error: no job folders in {printable(str(jobs))}", err=True)
        raise typer.Exit(1)
    return jobs


def _check_server(server: str | None) -> None:
    """Refuse a --server URL that is not plain http(s)://HOST[:PORT]/PATH.

    Credentials in it are refused, not stripped: the URL keys the journal and the
    completion records, and shows in logs, so a password in it would be stored. The
    URL is never echoed, for the same reason.
    """
    if server is None:
        return
    try:
        parts = urlsplit(server)
        _ = parts.port  # parsed on access: ValueError if not a number in range
    except ValueError:
        raise _usage_error("--server is not a valid URL") from None
    if "@" in parts.netloc:
        raise _usage_error("--server must not hold credentials (user:password@): pass "
                           f"--username, and the password in ${PASSWORD_ENV} or "
                           "--password-file")
    if parts.scheme.lower() not in ("http", "https"):
        raise _usage_error("--server must be an http:// or https:// URL, "
                           "e.g. https://HOST/ast80011")
    if not parts.hostname:
        raise _usage_error("--server has no host, e.g. https://HOST/ast80011")
    if any(c.isspace() or not c.isprintable() for c in server):
        raise _usage_error("--server holds spaces or control characters")
    if "?" in server or "#" in server:  # urljoin would drop the path: /accounts/login/
        raise _usage_error("--server must not hold a query (?...) or a fragment (#...), "
                           "e.g. https://HOST/ast80011")
    if parts.scheme.lower() == "http" and not _is_loopback(parts.hostname):
        typer.echo("warning: --server is plain http:// to another machine: the password "
                   "crosses the network unencrypted; use https:// if the site has it",
                   err=True)


def _is_loopback(host: str) -> bool:
    """Whether `host` is this machine (localhost, 127.0.0.0/8, ::1)."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _embedded_data(jobs: Path) -> tuple[Path, str]:
    """Where the embedded site keeps its data for this sweep, and its site key."""
    data = jobs / STATE_DIR / "site"
    return data, f"embedded:{data.resolve()}"


def _setup_logging(console: Console | None) -> None:
    """Rich log lines on a terminal (above the live display); plain lines otherwise."""
    handler: logging.Handler
    if console is not None:
        from rich.logging import RichHandler

        handler = RichHandler(console=console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    handler.addFilter(EscapeArgs())
    root = logging.getLogger("gibatch")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def _json_listener(path: Path) -> Listener:
    """Events appended to `path` as JSON lines; opened now, so that a path that cannot
    be written is a usage error before any work."""
    try:
        stream = path.open("a", buffering=1)
    except OSError as exc:
        raise _usage_error(f"--log-file: cannot open {_os_reason(exc)}") from None

    def listen(event: str, fields: dict[str, object]) -> None:
        stream.write(json.dumps({"at": time.time(), "event": event, **fields}) + "\n")

    return listen


def _fan_out(listeners: list[Listener]) -> Listener | None:
    if not listeners:
        return None

    def listen(event: str, fields: dict[str, object]) -> None:
        for one in listeners:
            one(event, fields)

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
        typer.echo(f"  {printable(job)}: {first_line(reason)}")


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
    live: Annotated[bool, typer.Option(
        help="Live progress display (default: when stderr is a terminal).")] = True,
    physics: Annotated[Physics, typer.Option(
        help="Physics of the embedded site: restricted (seconds per job) or live "
             "(self-consistent N-body, minutes per job). Ignored with --server.")
    ] = Physics.RESTRICTED,
) -> None:
    """Run every job of a sweep, skipping what each model number already holds.

    Example: gibatch run --jobs examples/sweep --models 1-4 --concurrency 4
    """
    _check_server(server)
    _require_job_folders(jobs)
    model_list = parse_models(models)
    if server is not None and not username:
        raise _usage_error("--server needs --username")
    secret = _password(password_file) if server is not None else ""
    console = Console(stderr=True) if sys.stderr.isatty() else None
    _setup_logging(console)
    sweep = _load_sweep(jobs)
    for problem in sweep.problems:
        typer.echo(f"invalid: {problem}", err=True)
    options = Options(jobs_dir=jobs, models=model_list, concurrency=concurrency, grace_s=grace)
    display = RunDisplay() if console is not None and live else None
    listener = _fan_out([one for one in (_json_listener(log_file) if log_file else None,
                                         display) if one is not None])

    async def main() -> Summary:
        journal = Journal(jobs)
        try:
            async with AsyncExitStack() as stack:
                client = await _site_client(stack, jobs, server, username or "", secret,
                                            max(model_list), physics)
                if display is not None:
                    stack.enter_context(Live(display, console=console, refresh_per_second=4))
                return await Scheduler(client, sweep, options, journal, listener).execute()
        finally:
            journal.close()

    try:
        summary = anyio.run(main)
    except NoModelAvailable as exc:
        raise _fail(exc, EXIT_NO_MODEL) from None
    except GibatchError as exc:
        raise _fail(exc, 1) from None
    _print_summary(summary)
    raise typer.Exit(summary.exit_code)


@app.command()
def check(jobs: Annotated[Path, typer.Option(help="Folder of job folders.")]) -> None:
    """Validate every job without touching any site; exit 1 if any is broken.

    Example: gibatch check --jobs examples/sweep
    """
    sweep = _load_sweep(_require_job_folders(jobs))
    for problem in sweep.problems:
        typer.echo(str(problem))
    typer.echo(f"{len(sweep.jobs)} valid, {len(sweep.invalid_jobs)} invalid")
    raise typer.Exit(1 if sweep.problems else 0)


@app.command()
def plan(
    jobs: Annotated[Path, typer.Option(help="Folder of job folders.")],
    models: Annotated[str, typer.Option(help="Model numbers to use, e.g. 1-4 or 1,3.")] = "1-4",
    server: Annotated[str | None, typer.Option(
        help="Also read what the model numbers of this site hold now.")] = None,
    username: Annotated[str | None, typer.Option(help="Account on --server.")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help=f"File holding the password (else ${PASSWORD_ENV}, else a prompt).")] = None,
) -> None:
    """Dry run: which job each model number takes, which steps run or are skipped,
    how many tasks and how long. Sends no task; offline unless --server is given.

    Example: gibatch plan --jobs examples/sweep --models 1-4
    """
    from gibatch.commands import show_plan

    _check_server(server)
    _jobs_dir(jobs)
    model_list = parse_models(models)
    if server is not None and not username:
        raise _usage_error("--server needs --username")
    client = SiteClient(server, username or "", _password(password_file)) if server else None
    key = client.site_key if client else _embedded_data(jobs)[1]
    try:
        show_plan(Console(), _load_sweep(jobs), model_list, key, client)
    except GibatchError as exc:
        raise _fail(exc, 1) from None


@app.command()
def status(
    jobs: Annotated[Path, typer.Option(help="Folder of job folders.")],
    events: Annotated[int, typer.Option(min=0, help="How many recent events to show.")] = 10,
) -> None:
    """Where a sweep stands: done, failed (why), running and pending per model number,
    elapsed time and ETA, the last events. Safe while a run is going on.

    Example: gibatch status --jobs examples/sweep
    """
    from gibatch.commands import show_status

    show_status(Console(), _load_sweep(_jobs_dir(jobs)), events)


@app.command(name="sweep")
def make_sweep(
    base_job: Annotated[Path, typer.Argument(help="A valid job folder to start from.")],
    out: Annotated[Path, typer.Option(help="Folder to write the job folders into.")],
    vary: Annotated[list[str], typer.Option(
        help="FILE.KEY=VALUES: a,b,c or low:high:step (inclusive); repeatable. "
             "orbit.distance/speed/azimuth/elevation/approach set galaxy 2's orbit.")],
    zip_: Annotated[bool, typer.Option("--zip", help="Pair the k-th values, not a grid.")
                    ] = False,
    random_count: Annotated[int | None, typer.Option(
        "--random", min=1, help="Draw N random points within the ranges instead.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for --random.")] = 0,
    force: Annotated[bool, typer.Option(help="Replace existing job folders.")] = False,
) -> None:
    """Write job folders from a base job and variations of its keys, plus sweep.json.

    Example: gibatch sweep examples/base_job --out jobs \\
    --vary merge.theta_galaxy_2=0:90:15 --vary interact.mass_2=1,1.5,2
    """
    from gibatch import sweep as sw

    try:
        varies = [sw.parse_vary(v) for v in vary]
        if random_count is not None:
            base = sw.read_base(base_job)
            points, mode = sw.random_points(varies, random_count, seed, base), "random"
        elif zip_:
            points, mode = sw.zipped(varies), "zip"
        else:
            points, mode = sw.grid(varies), "grid"
        how = {"mode": mode, "vary": [v.text for v in varies],
               **({"seed": seed} if mode == "random" else {})}
        written = sw.write_sweep(base_job, out, points, how=how, overwrite=force)
    except sw.SweepError as exc:
        raise _fail(exc, EXIT_USAGE) from None
    except OSError as exc:
        raise _fail(f"cannot write the sweep: {_os_reason(exc)}", 1) from None
    typer.echo(f"wrote {len(written)} jobs to {out} ({mode}); how: {out / sw.SWEEP_FILE}")


@app.command()
def report(
    jobs: Annotated[Path, typer.Option(help="Folder of job folders.")],
    out: Annotated[Path | None, typer.Option(
        help="HTML file to write (default JOBS/report.html).")] = None,
) -> None:
    """A static HTML page of the sweep (sortable, filterable, thumbnails that open the
    animation; works from file://) and a contact sheet PNG of the final frames.

    Example: gibatch report --jobs examples/sweep && xdg-open examples/sweep/report.html
    """
    from gibatch.report import ReportError, build_report
    from gibatch.status import sweep_status

    sweep = _load_sweep(_jobs_dir(jobs))
    journal = Journal(jobs)
    try:
        result = build_report(sweep, sweep_status(sweep, journal), out)
    except ReportError as exc:
        raise _fail(exc, 1) from None
    except OSError as exc:  # --out in a folder that is a file, or cannot be written
        raise _fail(f"cannot write the report: {_os_reason(exc)}", 1) from None
    finally:
        journal.close()
    typer.echo(f"{printable(str(result.page))}: {result.rows} jobs, {result.thumbnails} "
               "thumbnails"
               + (f"; contact sheet {printable(str(result.sheet))}" if result.sheet else ""))


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
    lost_rate: Annotated[float, typer.Option(
        help="Fault: share of task POSTs answered as accepted whose task the site then "
             "loses (never listed, never run).")] = 0.0,
    stuck_rate: Annotated[float, typer.Option(
        help="Fault: share of tasks that start and never end (a dead worker on the site), "
             "holding their model number.")] = 0.0,
    browser_rate: Annotated[float, typer.Option(
        help="Fault: share of requests after which someone starts a task in the browser "
             "on the model number concerned, as soon as it is free.")] = 0.0,
    strict: Annotated[bool, typer.Option(
        help="Only what the real site is known to do, and the worst it may: view_jobs "
             "newest first, HTML answers to task POSTs, no sizes, no plot_number, no Range."
    )] = False,
    one_row: Annotated[bool, typer.Option(
        help="view_jobs lists only each model number's newest task.")] = False,
    queue: Annotated[bool, typer.Option(
        help="A task POSTed for a busy model number waits its turn (Queued) instead of "
             "being refused with 409, as behind a task queue.")] = False,
    physics: Annotated[Physics, typer.Option(
        help="restricted: test stars in two galaxies' smooth fields (seconds per job); "
             "live: self-consistent N-body tree code (minutes per job).")
    ] = Physics.RESTRICTED,
    stream_rate: Annotated[float, typer.Option(
        min=0.0, help="MB/s at most per file download, as one stream from a remote "
                      "server goes (0: no limit).")] = 0.0,
) -> None:
    """Run the local GI Simulator site standalone (password from $GIBATCH_PASSWORD).

    Example: GIBATCH_PASSWORD=secret gibatch serve --port 8000 --user student
    """
    import secrets

    from gibatch.sim.app import SiteConfig
    from gibatch.sim.faults import Faults
    from gibatch.sim.server import running_site, until_stopped

    from_env = _env_password()
    password = from_env or secrets.token_urlsafe(12)
    config = SiteConfig(
        data_dir=data_dir, accounts={user: password}, model_count=model_count,
        session_lifetime_s=session_lifetime, strict=strict, physics=physics,
        stream_rate_mb_s=stream_rate, warm=True, one_row=one_row, queue=queue,
        faults=Faults(error_rate=error_rate, hang_rate=hang_rate, cut_rate=cut_rate,
                      post_502_rate=post_502_rate, lost_rate=lost_rate, stuck_rate=stuck_rate,
                      browser_rate=browser_rate),
    )

    started = False

    async def main() -> None:
        nonlocal started
        async with running_site(config, port=port) as site:
            started = True
            typer.echo(f"Serving {site.url}", err=False)
            shown = "from $" + PASSWORD_ENV if from_env else password
            typer.echo(f"Log in at {site.url}/accounts/login/ as {user!r}, password: {shown}")
            sys.stdout.flush()
            await until_stopped()  # Ctrl-C or SIGTERM: the site closes, exit 0

    try:
        with contextlib.suppress(KeyboardInterrupt):
            anyio.run(main)
    except OSError as exc:  # the port in use, a --data-dir that cannot be made
        if started:
            raise
        raise _fail(f"cannot start the site on 127.0.0.1:{port}: {_os_reason(exc)}",
                    1) from None


# -- matching a sweep to an observed pair, and searching for one


MAX_VIEWS = 1000


def _match_target(target: Path, centres: str, blur: float, views: int) -> match.Target:
    """The target, or exit 2 with the reason (never a traceback)."""
    if not 0 <= views <= MAX_VIEWS:  # each view renders every frame of every job
        raise _usage_error(f"--views {views}: must be 0 (the plots' axes) to {MAX_VIEWS}")
    from gibatch import match  # scipy and h5py: only for the commands that score

    try:
        return match.load_target(target, match_settings.parse_centres(centres), blur)
    except match_settings.MatchError as exc:
        raise _usage_error(str(exc)) from None


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True),
                    disable=not sys.stderr.isatty())



# Options `match` and `search` share, so that both say the same.
_Target = Annotated[Path, typer.Option(
    help="Image of the observed pair (PNG, JPEG, ..., or FITS).")]
_Centres = Annotated[str, typer.Option(
    help="Pixel centres X1,Y1,X2,Y2 of galaxy 1 and galaxy 2 (x right, y down; FITS: "
         "1-based, y up, as ds9 shows them).")]
_Views = Annotated[int, typer.Option(
    help="0: the plots' own axes; N: N directions spread over the sphere.")]
_Blur = Annotated[float, typer.Option(help="Blur of the renders, in target pixels.")]
_Scale = Annotated[str | None, typer.Option(
    "--kpc-per-px", help="LOW,HIGH: kpc one target pixel may span (when the pair's "
    "distance is known); frames that would need another scale are not scored.")]
_Coarse = Annotated[int, typer.Option(
    min=0, help="Frames scored first, spread over each run, before refining around "
    "the best (0: score every frame).")]


def _settings(views: int, metric: match_settings.Metric, kpc_per_px: str | None,
              coarse_frames: int) -> match_settings.Settings:
    """How `match` and `search` score, or exit 2 with the reason."""
    try:
        scale = None if kpc_per_px is None else match_settings.parse_scale(kpc_per_px)
    except match_settings.MatchError as exc:
        raise _usage_error(str(exc)) from None
    return match_settings.Settings(views=views, metric=metric, kpc_per_px=scale,
                                   coarse_frames=coarse_frames)


@app.command("match")
def match_command(
    jobs: Annotated[Path, typer.Option(help="Folder of job folders.")],
    target: _Target,
    centres: _Centres,
    metric: Annotated[match_settings.Metric, typer.Option(help="The score that ranks.")]
    = match_settings.Metric.SSIM,
    views: _Views = 0,
    blur: _Blur = match_settings.DEFAULT_BLUR_PX,
    kpc_per_px: _Scale = None,
    coarse_frames: _Coarse = match_settings.DEFAULT_COARSE_FRAMES,
    top: Annotated[int, typer.Option(min=1, help="Rows of the table shown.")] = 20,
    workers: Annotated[int | None, typer.Option(
        min=1, help="Scoring processes (default: every core).")] = None,
) -> None:
    """Rank the complete jobs of a sweep by how well any frame, seen from any view (or
    its mirror), matches an observed pair. Scores are cached; the ranking is also
    written to JOBS/.gibatch/match/ranking.csv and shown by `gibatch report`.

    Example: gibatch match --jobs jobs --target arp240.png --centres 120,88,301,140
    """
    from gibatch import match

    sweep = _load_sweep(_require_job_folders(jobs))
    goal = _match_target(target, centres, blur, views)
    settings = _settings(views, metric, kpc_per_px, coarse_frames)
    try:
        with _progress_bar() as bar:
            task = bar.add_task("scoring jobs", total=len(sweep.jobs))
            results = match.match_jobs(jobs, sweep.jobs, goal, settings, workers,
                                       lambda done, total: bar.update(task, completed=done))
        csv_path = match.write_results(jobs, results, goal, settings)
    except OSError as exc:  # JOBS/.gibatch/match a file, or a sweep shared read-only
        raise _fail(f"cannot keep the match in {printable(str(match_settings.match_dir(jobs)))}"
                    f": {_os_reason(exc)}", 1) from None
    table = Table(title=f"best {metric.value} per job (ranked by {metric.value})")
    for column in ("rank", "job", "ssim", "iou", "nmi", "t (Gyr)", "view", "mirror",
                   "kpc/px", "rot (deg)"):
        table.add_column(column, style="bold" if column == metric.value else None)
    scored = [r for r in results if r.best is not None]
    for rank, r in enumerate(scored[:top], start=1):
        b = r.best
        assert b is not None
        table.add_row(str(rank), cell(r.job), f"{b.ssim:.4f}",
                      f"{b.iou:.3f}", f"{b.nmi:.3f}", f"{b.time_gyr:.3f}", cell(b.view),
                      "yes" if b.mirror else "", f"{b.kpc_per_px:.3g}",
                      f"{b.rotation_deg:.1f}")
    Console().print(table)
    unscored = len(results) - len(scored)
    typer.echo(f"{len(scored)} jobs scored" + (f", {unscored} not (incomplete or no usable "
                                                 "frame)" if unscored else "")
               + f"; ranking in {printable(str(csv_path))}")
    raise typer.Exit(0 if scored else 1)


async def _site_client(stack: AsyncExitStack, jobs: Path, server: str | None, username: str,
                       secret: str, model_count: int,
                       physics: Physics = Physics.RESTRICTED) -> SiteClient:
    """A logged-out client of --server, or of the embedded site started on `stack`."""
    if server is not None:
        client = SiteClient(server, username, secret)
    else:
        from gibatch.sim.server import one_time_config, running_site

        data, key = _embedded_data(jobs)
        site = await stack.enter_async_context(running_site(
            one_time_config(data, model_count=model_count, physics=physics,
                            warm=True)))
        log.info("embedded GI site at %s", site.url)
        client = SiteClient(site.url, site.username, site.password, site_key=key)
    await stack.enter_async_context(client)
    return client


def _search_line(progress: search.Progress, metric: match_settings.Metric) -> str:
    """One line of the search's progress, escaped: keys come from the user's space file
    and categorical values may be any text."""
    best = (f"best {metric.value} {progress.best_value:.4f} ({progress.best_job}: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in progress.best_params.items()) + ")"
            if progress.best_value is not None else "no score yet")
    return printable(f"trials told {progress.told}/{progress.budget} (asked "
                     f"{progress.asked}, failed {progress.failed}); {best}")


@app.command("search")
def search_command(
    jobs: Annotated[Path, typer.Option(help="Folder for the trials' job folders.")],
    base: Annotated[Path, typer.Option(help="The job folder every trial starts from.")],
    space: Annotated[Path, typer.Option(help="TOML file: job keys and their ranges.")],
    target: _Target,
    centres: _Centres,
    budget: Annotated[int, typer.Option(help="How many trials to run in all.")],
    models: Annotated[str, typer.Option(help="Model numbers to use, e.g. 1-4 or 1,3.")] = "1-4",
    metric: Annotated[match_settings.Metric, typer.Option(help="The score to maximise.")]
    = match_settings.Metric.SSIM,
    views: _Views = 0,
    blur: _Blur = match_settings.DEFAULT_BLUR_PX,
    kpc_per_px: _Scale = None,
    coarse_frames: _Coarse = match_settings.DEFAULT_COARSE_FRAMES,
    seed: Annotated[int | None, typer.Option(help="Seed of Optuna's sampler.")] = None,
    server: Annotated[str | None, typer.Option(
        help="Base URL of a GI site, e.g. https://HOST/ast80011. Default: the embedded one.")
    ] = None,
    username: Annotated[str | None, typer.Option(help="Account on --server.")] = None,
    password_file: Annotated[Path | None, typer.Option(
        help=f"File holding the password (else ${PASSWORD_ENV}, else a prompt).")] = None,
) -> None:
    """Search the space for the encounter that best matches the target: Optuna asks for
    a trial whenever a model number is free, gibatch runs it as an ordinary job folder,
    and tells its match score. Rerun the same command to resume the same study.

    Example: gibatch search --jobs found --base examples/base_job --space space.toml
    --target arp240.png --centres 120,88,301,140 --budget 60 --models 1-4
    """
    from gibatch import search

    _check_server(server)
    if budget < 1:
        raise _usage_error(f"--budget {budget}: must be at least 1")
    model_list = parse_models(models)
    if server is not None and not username:
        raise _usage_error("--server needs --username")
    try:
        base_files = sweep_module.read_base(base)
        dims = search.load_space(space, base_files)
    except (sweep_module.SweepError, search.SearchError) as exc:
        raise _usage_error(str(exc)) from None
    goal = _match_target(target, centres, blur, views)
    settings = _settings(views, metric, kpc_per_px, coarse_frames)
    _jobs_dir(_made(jobs))
    secret = _password(password_file) if server is not None else ""
    console = Console(stderr=True) if sys.stderr.isatty() else None
    _setup_logging(console)
    shown = search.Progress(budget=budget)

    def show(progress: search.Progress) -> None:
        nonlocal shown
        shown = progress
        if console is None:
            log.info("%s", _search_line(progress, metric))

    try:
        finder = search.Search(jobs, base_files, dims, goal, settings, budget, seed, show)
    except search.SearchError as exc:
        raise _usage_error(str(exc)) from None

    async def main() -> None:
        journal = Journal(jobs)
        try:
            async with AsyncExitStack() as stack:
                client = await _site_client(stack, jobs, server, username or "", secret,
                                            max(model_list))
                if console is not None:
                    stack.enter_context(Live(get_renderable=lambda: cell(_search_line(
                        shown, metric)), console=console, refresh_per_second=4))
                told = await anyio.to_thread.run_sync(finder.tell_existing)
                if told:
                    log.info("told the study %d complete jobs already in %s", told, jobs)
                scheduler = Scheduler(client, Sweep(jobs, [], []),
                                      Options(jobs_dir=jobs, models=model_list), journal,
                                      finder.notify)
                await search.run_search(finder, scheduler, len(model_list))
        finally:
            journal.close()

    try:
        anyio.run(main)
    except NoModelAvailable as exc:
        raise _fail(exc, EXIT_NO_MODEL) from None
    except (GibatchError, search.SearchError) as exc:
        raise _fail(exc, 1) from None
    finally:
        finder.close()
    typer.echo(_search_line(shown, metric))
    raise typer.Exit(0 if shown.best_value is not None else 1)


def main() -> None:
    app()
