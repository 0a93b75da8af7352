"""The GI Simulator site protocol client: the only module that knows its URLs and HTML.

It relies on what is known of the real course site (site-protocol.md, section 1) and
tolerates the variations of section 3; section 2's conveniences are never required.
Everything above it speaks in steps, model numbers, task rows and result sections.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import json
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from html import unescape as html_unescape
from html.parser import HTMLParser
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
import anyio
import backoff

from gibatch.errors import (
    AmbiguousSubmit,
    GibatchError,
    LoginFailed,
    ModelBusy,
    NetworkError,
    ProtocolError,
    RequestRejected,
    ResultVanished,
    ServerError,
    SessionExpired,
    TransientError,
)
from gibatch.steps import Stage, Step

T = TypeVar("T")

_TASK_PAGE = {
    Stage.GALAXY: "gi/galactic",
    Stage.MERGE: "gi/galacticsmerge",
    Stage.INTERACT: "gi/interactgalaxies",
    Stage.PLOT: "gi/plotgalaxies",
}
_CSRF_IN_PAGE = re.compile(r"""window\.CSRF_TOKEN\s*=\s*["']([^"']+)["']""")
_CSRF_IN_FORM = re.compile(
    r"""<input[^>]*name=["']csrfmiddlewaretoken["'][^>]*value=["']([^"']+)["']"""
    r"""|<input[^>]*value=["']([^"']+)["'][^>]*name=["']csrfmiddlewaretoken["']"""
)
_LOGIN_PATH = "/accounts/login/"
MAX_LOGIN_REDIRECTS = 5
# A page (view_jobs grows with the account's history: ~200 bytes a task) larger than
# this is no page of the site: refused, not read into memory until the page timeout.
MAX_PAGE_BYTES = 64 << 20
_GONE = (404, 410)
_REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class Timeouts:
    """Per-phase limits in seconds; None means no limit (distinct from a default)."""

    connect_s: float | None = 10.0
    read_s: float | None = 60.0  # longest silence within one answer
    page_s: float | None = 90.0  # a whole page or POST answer
    download_s: float | None = None  # a whole file: unlimited, silence is what matters
    # ... and a trickle: a download that brings less than this many bytes a second,
    # over each read_s, has stalled (a byte just inside read_s would hold it forever).
    min_rate_b_s: float = 1024.0


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for transient failures."""

    base_s: float = 0.5
    cap_s: float = 30.0
    give_up_after_s: float = 1800.0  # a proxy outage of half an hour is survivable
    # An accepted task shows in view_jobs at once on the real site (queued as Pending);
    # one still missing after this long was lost by the site and is posted again.
    listing_grace_s: float = 120.0
    # A task still queued or running after this long holds its model number for good (a
    # dead worker on the site): the model is set aside for the run, its job goes on
    # elsewhere. Far beyond any task the course site runs (minutes).
    stuck_after_s: float = 7200.0

    def wrap(self, fn: Callable[[], Awaitable[T]]) -> Callable[[], Awaitable[T]]:
        """`fn` retried on TransientError until it succeeds or the policy gives up."""
        return backoff.on_exception(
            backoff.expo,
            TransientError,
            max_time=self.give_up_after_s,
            factor=self.base_s,
            max_value=self.cap_s,
            jitter=backoff.full_jitter,
            logger=None,
        )(fn)


class TaskState(StrEnum):
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"


def task_state(status: str) -> TaskState:
    """Only `Completed` is done; `Failed`/`Error` failed; any other word is still running."""
    word = status.strip().lower()
    if word == "completed":
        return TaskState.COMPLETED
    if word.startswith(("failed", "error")):
        return TaskState.FAILED
    return TaskState.ACTIVE


@dataclass(frozen=True)
class TaskRow:
    job_id: int
    job_type: str
    model: int
    status: str

    @property
    def state(self) -> TaskState:
        return task_state(self.status)


@dataclass(frozen=True)
class RemoteFile:
    name: str  # as the site shows it: data, never a path to follow
    url: str
    size: int | None


@dataclass(frozen=True)
class Section:
    name: str
    status: str | None
    files: tuple[RemoteFile, ...]

    @property
    def state(self) -> TaskState:
        return TaskState.COMPLETED if self.status is None else task_state(self.status)


# --- HTML reading ---------------------------------------------------------------------------

@dataclass
class _Cell:
    text: str = ""
    links: list[tuple[str, str]] = field(default_factory=list)  # (href, text)
    header: bool = False


class _Tables(HTMLParser):
    """Collects, in document order, <h3> texts and <table>s as rows of cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.items: list[tuple[str, Any]] = []  # ("h3", text) | ("table", rows)
        self.fed = 0  # characters fed so far
        self._h3: list[str] | None = None
        self._rows: list[list[_Cell]] | None = None
        self._cell: _Cell | None = None
        self._link: tuple[str, list[str]] | None = None

    def feed(self, data: str) -> None:
        self.fed += len(data)
        super().feed(data)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "h3":
            self._h3 = []
        elif tag == "table":
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append([])
        elif tag in ("td", "th") and self._rows is not None:
            if not self._rows:
                self._rows.append([])
            self._cell = _Cell(header=tag == "th")
            self._rows[-1].append(self._cell)
        elif tag == "a":
            self._link = (dict(attrs).get("href") or "", [])

    def handle_endtag(self, tag: str) -> None:
        if tag == "h3" and self._h3 is not None:
            self.items.append(("h3", " ".join("".join(self._h3).split())))
            self._h3 = None
        elif tag == "table" and self._rows is not None:
            self.items.append(("table", self._rows))
            self._rows = None
        elif tag in ("td", "th"):
            self._cell = None
        elif tag == "a" and self._link is not None:
            href, text = self._link
            if self._cell is not None and href:
                self._cell.links.append((href, "".join(text).strip()))
            self._link = None

    def handle_data(self, data: str) -> None:
        if self._h3 is not None:
            self._h3.append(data)
        if self._cell is not None:
            self._cell.text += data
        if self._link is not None:
            self._link[1].append(data)


# A task id, model number or size of the site's: at most 18 digits, below 2**63, what
# SQLite stores as an INTEGER. A job id in a POST answer is bounded alike: one outside
# what the listing reads could never be matched to its row.
_DIGITS = 18
MAX_NUMBER = 10**_DIGITS - 1


def number(text: str) -> int | None:
    """A number of the site's pages: ASCII digits only (`'²'.isdigit()` is True, but
    int('²') fails), at most _DIGITS of them; None otherwise."""
    return int(text) if len(text) <= _DIGITS and text.isascii() and text.isdigit() else None


def parse_task_rows(html: str) -> list[TaskRow]:
    """view_jobs: the table whose header has `Job Type`; columns 0-3 by position."""
    table = _plain_task_table(html)
    if table is None:
        table = _task_table(html)
    out = []
    for raw_id, job_type, raw_model, status in table:
        job_id, model = number(raw_id), number(raw_model)
        if job_id is not None and model is not None:
            out.append(TaskRow(job_id, job_type, model, status))
    return sorted(out, key=lambda r: r.job_id)  # oldest first, whatever the page did


_Cells4 = tuple[str, str, str, str]


def _task_table(html: str) -> list[_Cells4]:
    """The first four cells' texts of each body row of at least four cells, in the
    first table whose header has `Job Type`."""
    parser = _Tables()
    parser.feed(html)
    for kind, rows in parser.items:
        if kind == "table" and _lists_tasks(rows):
            return [(row[0].text.strip(), row[1].text.strip(), row[2].text.strip(),
                     row[3].text.strip()) for row in rows[1:] if len(row) >= 4]
    raise ProtocolError("view_jobs page has no table with a 'Job Type' column")


def _lists_tasks(rows: list[list[_Cell]]) -> bool:
    return bool(rows) and "Job Type" in [c.text.strip() for c in rows[0] if c.header]


# The task list read at C speed when its table is plain (the site's own: a Django
# template's), giving what `_task_table` gives: rows of cells holding text and inline
# tags only. Anything else in the table (a comment, a script, a `/` or `<` in a tag, any
# other tag) and the page goes to html.parser instead, which costs about 0.5 s a MB:
# view_jobs grows with the account's history, and 100,000 tasks are 11 MB.
# Possessive quantifiers (*+): each piece starts with its own tag, there is nothing to
# backtrack into, and checking the table costs a third.
_SP = "[\t\n\r\f ]"  # what ends a tag's name for html.parser
# Attributes: quoted values without `<>` in them, and no other `/` (`/>` closes the tag).
_ATTRS = f"""(?:{_SP}(?:[^<>"'/\\x00]|"[^"<>]*+"|'[^'<>]*+')*+)?>"""
_INLINE = f"</?(?:a|abbr|b|br|code|em|font|i|small|span|strong|time){_ATTRS}"
_CONTENT = f"[^<]*+(?:{_INLINE}[^<]*+)*+"  # a cell's
# Tag names are ASCII (html.parser's start with [a-zA-Z]): a case-insensitive match must
# not fold `ı` to `i` or `ſ` to `s`, or text like `<ſpan>` would be read as a tag.
_NOCASE = re.I | re.A
_ANY_CELL = f"<t[dh]{_ATTRS}{_CONTENT}</t[dh]{_SP}*+>\\s*+"
_CELL = f"<t[dh]{_ATTRS}({_CONTENT})</t[dh]{_SP}*+>\\s*+"  # its content as a group
_GROUP = f"(?:</t(?:head|body){_SP}*+>\\s*+)?(?:<t(?:head|body){_ATTRS}\\s*+)?"
_ROWS = f"(?:<tr{_ATTRS}\\s*+(?:{_ANY_CELL})*+(?:</tr{_SP}*+>\\s*+)?{_GROUP})*+"
_PLAIN_TABLE = re.compile(f"\\s*+{_GROUP}{_ROWS}", _NOCASE)  # between the table's tags
_PLAIN_MORE = re.compile(_ROWS, _NOCASE)  # from a row on
_FIRST_ROW = re.compile(f"\\s*+{_GROUP}<tr{_ATTRS}\\s*+((?:{_ANY_CELL})*+)", _NOCASE)
_HEADER_CELL = re.compile(f"<th{_ATTRS}({_CONTENT})</t[dh]", _NOCASE)
_ROW4 = re.compile(f"<tr{_ATTRS}\\s*+{_CELL * 4}", _NOCASE)  # a row's first four cells
_INLINE_TAG = re.compile(_INLINE, _NOCASE)
_TR = re.compile(f"<tr{_ATTRS}", _NOCASE)
_TABLE_OPEN = re.compile("<table", _NOCASE)
_TABLE_TAG = re.compile(f"<table{_ATTRS}", _NOCASE)
_TABLE_END = re.compile(f"</table{_SP}*>", _NOCASE)
_TABLES_BEFORE_TASKS = 8
# The table is read in pieces of about this many characters, whole rows each: a regex
# holds the GIL throughout, and an 11 MB table at once would stall the event loop.
_PIECE_CHARS = 1 << 17


def _plain_task_table(html: str) -> list[_Cells4] | None:
    """`_task_table(html)` if the page's task table is a plain one, else None."""
    # The page up to each table's tag, as html.parser reads it: the tag must open a table
    # there (and not sit in a comment, a script or an attribute's value). A few tables
    # at most (each feed may read again what an open comment holds).
    before = _Tables()
    for opening in itertools.islice(_TABLE_OPEN.finditer(html), _TABLES_BEFORE_TASKS):
        if opening.start() < before.fed:
            continue  # inside a table already read
        tag = _TABLE_TAG.match(html, opening.start())
        if not tag:
            return None
        before.feed(html[before.fed:tag.end()])
        if before._rows is None or before.rawdata:  # not a tag here: read on
            continue
        if before._rows or any(kind == "table" and _lists_tasks(rows)
                               for kind, rows in before.items):
            return None  # a table in a table, or a task table already read
        end = _TABLE_END.search(html, tag.end())
        if not end:
            return None
        table = html[tag.end():end.start()]
        pieces = _pieces(table)
        if pieces is None:
            return None
        header = _FIRST_ROW.match(table)
        if header and "Job Type" in [_text(t) for t in _HEADER_CELL.findall(header.group(1))]:
            rows = [row for start, stop in pieces
                    for row in _ROW4.findall(table, max(start, header.end()), stop)]
            if "&" in table or "<" in "".join(itertools.chain.from_iterable(rows)):
                return [(_text(a), _text(b), _text(c), _text(d)) for a, b, c, d in rows]
            return [(a.strip(), b.strip(), c.strip(), d.strip()) for a, b, c, d in rows]
        before.feed(html[tag.end():end.end()])  # a plain table of something else
    return None


def _pieces(table: str) -> list[tuple[int, int]] | None:
    """`table` cut before a row every _PIECE_CHARS or so, if it is a plain table."""
    out: list[tuple[int, int]] = []
    start, pattern = 0, _PLAIN_TABLE
    while start < len(table):
        cut = _TR.search(table, start + _PIECE_CHARS)
        stop = cut.start() if cut else len(table)
        if not pattern.fullmatch(table, start, stop):
            return None
        out.append((start, stop))
        start, pattern = stop, _PLAIN_MORE
    return out


def _text(raw: str) -> str:
    """A cell's content as html.parser gives its text: each run of text between tags
    unescaped on its own, the tags dropped."""
    runs = _INLINE_TAG.split(raw) if "<" in raw else [raw]
    return "".join(html_unescape(run) if "&" in run else run for run in runs).strip()


def parse_sections(html: str, page_url: str) -> list[Section]:
    """view_data: each <h3> `name - Status: X` and the <table> after it."""
    parser = _Tables()
    parser.feed(html)
    out: list[Section] = []
    heading: str | None = None
    for kind, value in parser.items:
        if kind == "h3":
            heading = value
            continue
        if heading is None:
            continue
        name, status = heading, None
        if " - Status:" in heading:
            name, _, status = heading.partition(" - Status:")
            name, status = name.strip(), status.strip()
        files = []
        for row in value:
            linked = [c for c in row if c.links]
            if not linked:
                continue
            href, text = linked[0].links[0]
            sizes = [n for c in row if not c.links and (n := number(c.text.strip())) is not None]
            size = sizes[0] if sizes else None
            try:
                url = urljoin(page_url, href)
            except ValueError:  # malformed: kept, so its download fails naming it
                url = href
            files.append(RemoteFile(text, url, size))
        out.append(Section(name, status, tuple(files)))
        heading = None
    return out


# --- the client -----------------------------------------------------------------------------

def origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port: what decides where the site's cookies and token may go."""
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (an unclosed IPv6 bracket): no origin at all
        return "", "", None
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    try:
        port = parts.port or default
    except ValueError:
        port = None
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def translate(exc: BaseException) -> GibatchError:
    """Map an aiohttp/OS/timeout exception to our tree (the caller chains it)."""
    if isinstance(exc, GibatchError):
        return exc
    if isinstance(exc, aiohttp.InvalidURL):  # no retry can make it requestable
        return ProtocolError(f"the site links an invalid URL: {exc}")
    if isinstance(exc, aiohttp.ClientResponseError) and exc.status >= 500:
        return ServerError(exc.status)
    if isinstance(exc, aiohttp.ClientResponseError):
        return RequestRejected(exc.status, exc.message)
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return NetworkError("the site did not answer in time")
    return NetworkError(f"{type(exc).__name__}: {exc}")


_NETWORK_EXCEPTIONS = (aiohttp.ClientError, OSError, TimeoutError)


async def page_text(resp: aiohttp.ClientResponse) -> str:
    """The body of a page, at most MAX_PAGE_BYTES, as text whatever its bytes are: the
    protocol reads ASCII markers and digits, so an undecodable byte is replaced rather
    than failing every job that waits on the listing."""
    if (resp.content_length or 0) > MAX_PAGE_BYTES:
        raise _too_large(resp)
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > MAX_PAGE_BYTES:
            raise _too_large(resp)
        chunks.append(chunk)
    return decode_page(b"".join(chunks), resp.charset)


def decode_page(body: bytes, charset: str | None) -> str:
    """`body` as text in `charset` if that names a text encoding, else as UTF-8; never
    an error. A site's charset is data: `base64`, `rot13` or `zlib` pass codecs.lookup
    but are no text encodings (bytes.decode raises LookupError), and `idna` or
    `undefined` raise UnicodeError even with errors="replace"."""
    encoding = charset or "utf-8"
    try:
        if not codecs.lookup(encoding)._is_text_encoding:
            encoding = "utf-8"
        return body.decode(encoding, errors="replace")
    except (LookupError, UnicodeError, ValueError):
        return body.decode("utf-8", errors="replace")


def _too_large(resp: aiohttp.ClientResponse) -> ProtocolError:
    return ProtocolError(f"{resp.url.path} is larger than {MAX_PAGE_BYTES >> 20} MiB: "
                         "no page of the site is; not reading it")


class SiteClient:
    """A logged-in conversation with one GI site account.

    Reads retry transient failures with backoff; an expired session is renewed
    transparently, one login at a time. Task POSTs are never retried here: a failure
    after sending is reported as AmbiguousSubmit for the caller to reconcile.
    """

    def __init__(
        self,
        base_url: str,
        username: str,
        password: str,
        *,
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        site_key: str | None = None,
    ) -> None:
        self.base = base_url.rstrip("/") + "/"
        self._site_key = site_key
        self.username = username
        self._password = password
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.requests: Counter[str] = Counter()  # by kind, for benchmarks and status
        self._session: aiohttp.ClientSession | None = None
        self._elsewhere: aiohttp.ClientSession | None = None  # other origins: no cookies
        self._login_lock = asyncio.Lock()
        self._generation = 0  # bumped at each login
        self._csrf: str | None = None

    def __repr__(self) -> str:
        return f"SiteClient({self.base!r}, user={self.username!r})"

    async def __aenter__(self) -> SiteClient:
        t = self.timeouts
        self._session = aiohttp.ClientSession(
            cookie_jar=aiohttp.CookieJar(unsafe=True),  # loopback sites are IP hosts
            timeout=aiohttp.ClientTimeout(
                total=t.page_s, sock_connect=t.connect_s, sock_read=t.read_s
            ),
            headers={"User-Agent": "gibatch"},
        )
        # Files the site links on another origin (a separate file host) are fetched
        # without the site's cookies, CSRF token or Referer: a jar that keeps nothing.
        self._elsewhere = aiohttp.ClientSession(
            cookie_jar=aiohttp.DummyCookieJar(), headers={"User-Agent": "gibatch"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        for session in (self._session, self._elsewhere):
            if session is not None:
                await session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use SiteClient as an async context manager")
        return self._session

    def url(self, path: str) -> str:
        return urljoin(self.base, path)

    @property
    def generation(self) -> int:
        """Bumped at each login: pass it back to `login(after_generation=...)`."""
        return self._generation

    @property
    def site_key(self) -> str:
        """Identifies (site, account) for locks and the journal: no secret in it."""
        if self._site_key:
            return self._site_key
        parts = urlsplit(self.base)
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}|{self.username}"

    # -- plumbing

    async def _get_page(self, path: str, kind: str) -> tuple[str, str]:
        """GET a page that needs login; returns (html, final url). Retries and re-logs in."""

        async def once() -> tuple[str, str]:
            generation = self._generation
            try:
                return await self._get_once(path, kind)
            except SessionExpired:
                await self.login(after_generation=generation)
                return await self._get_once(path, kind)

        return await self.retry.wrap(once)()

    async def _get_once(self, path: str, kind: str) -> tuple[str, str]:
        url = self.url(path)
        self.requests[kind] += 1
        try:
            async with self.session.get(url, allow_redirects=False) as resp:
                self._raise_for(resp)
                return await page_text(resp), str(resp.url)
        except _NETWORK_EXCEPTIONS as exc:
            raise translate(exc) from exc

    def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status in _REDIRECTS:
            if _LOGIN_PATH in resp.headers.get("Location", ""):
                raise SessionExpired("the site asked to log in again")
            raise ProtocolError(f"unexpected redirect to {resp.headers.get('Location')}")
        if resp.status >= 500:
            raise ServerError(resp.status)
        if resp.status >= 400:
            raise RequestRejected(resp.status, resp.reason or "")

    # -- authentication

    async def login(self, after_generation: int | None = None) -> None:
        """Log in (again). Concurrent callers that saw the same expiry share one login."""
        async with self._login_lock:
            if after_generation is not None and self._generation != after_generation:
                return  # someone renewed the session meanwhile
            try:
                await self.retry.wrap(self._login_once)()
            except GibatchError:
                raise
            except Exception as exc:
                # Its message may hold what the login sent (aiohttp's FormData puts a value
                # it cannot send in its TypeError): only its type, and no chained context.
                raise LoginFailed(f"the login of {self.username!r} failed: "
                                  f"{type(exc).__name__}") from None
            self._generation += 1
            self._csrf = None  # Django rotates the CSRF token at login

    async def _login_once(self) -> None:
        for what, value in (("user name", self.username), ("password", self._password)):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # bytes of another encoding, from the environment
                raise LoginFailed(f"the {what} is not UTF-8 text; the site's form takes "
                                  "only that") from None
        url = self.url("accounts/login/")
        self.requests["login"] += 1
        try:
            # Redirects followed by hand, on the site's origin only: the jar holds the
            # session at a re-login, and cookies are scoped by host, not port or scheme.
            async with self.session.get(url, allow_redirects=False) as resp:
                form = await self._follow_same_origin(resp, form_url=url)
            match = _CSRF_IN_FORM.search(form)
            token = (match.group(1) or match.group(2)) if match else None
            token = token or self._cookie("csrftoken")
            if not token:
                raise ProtocolError(f"the login page {url} has no csrfmiddlewaretoken")
            data = aiohttp.FormData(default_to_multipart=True)  # as the course site's form
            for key, value in (("csrfmiddlewaretoken", token), ("username", self.username),
                               ("password", self._password)):
                data.add_field(key, value)
            self.requests["login"] += 1
            async with self.session.post(
                url, data=data, headers={"Referer": url}, allow_redirects=False
            ) as resp:
                body = await self._follow_same_origin(resp)
        except _NETWORK_EXCEPTIONS as exc:
            raise translate(exc) from exc
        # 200 alone means nothing: a wrong password also answers 200 with the form.
        if not self._cookie("sessionid") or "csrfmiddlewaretoken" in body:
            raise LoginFailed(f"the site did not accept the login of {self.username!r}")

    async def _follow_same_origin(self, resp: aiohttp.ClientResponse,
                                  form_url: str | None = None) -> str:
        """Follow the login pages' redirects by hand: same origin only, a bounded number;
        the final page's text. `form_url`: the login form's address, which must be found
        (a 4xx there is a wrong --server, not a wrong password)."""
        status, location, url = resp.status, resp.headers.get("Location", ""), str(resp.url)
        body = await page_text(resp)
        for _ in range(MAX_LOGIN_REDIRECTS):
            if status not in _REDIRECTS:
                break
            try:
                target = urljoin(url, location)
            except ValueError:
                raise ProtocolError("the login redirected to an invalid URL") from None
            if origin(target) != origin(self.base):
                raise ProtocolError(f"the login redirected to another origin ({target}); "
                                    "not following it with the site's cookies")
            self.requests["login"] += 1
            async with self.session.get(target, allow_redirects=False) as page:
                status, location, url = page.status, page.headers.get("Location", ""), target
                body = await page_text(page)
        if status >= 500:
            raise ServerError(status)
        if form_url is not None and 400 <= status < 500:
            raise ProtocolError(
                f"the login page {form_url} answered {status}: is --server the site's base "
                f"address, the one its pages are under (e.g. https://HOST/ast80011)?")
        if status in _REDIRECTS:
            raise ProtocolError(f"the login kept redirecting (more than {MAX_LOGIN_REDIRECTS} "
                                "redirects): a redirect loop on the site")
        return body

    def _cookie(self, name: str) -> str | None:
        for cookie in self.session.cookie_jar:
            if cookie.key == name and cookie.value:
                return cookie.value
        return None

    # -- tasks

    async def _csrf_token(self, stage: Stage) -> str:
        if self._csrf is None:
            html, _ = await self._get_page(_TASK_PAGE[stage], "task_page")
            match = _CSRF_IN_PAGE.search(html)
            if not match:
                raise ProtocolError(f"{_TASK_PAGE[stage]} does not embed window.CSRF_TOKEN")
            self._csrf = match.group(1)
        return self._csrf

    async def submit(self, step: Step, model: int, payload: dict[str, Any]) -> int | None:
        """POST one task. Returns the job id if the answer carried one (a convenience).

        Raises RequestRejected (4xx), ModelBusy (409) or AmbiguousSubmit: after an
        AmbiguousSubmit the caller must look at view_jobs before posting again.
        """
        body = {**payload, "model_number": model}
        for attempt in range(3):
            token = await self._csrf_token(step.stage)
            generation = self._generation
            self.requests["submit"] += 1
            try:
                async with self.session.post(
                    self.url(_TASK_PAGE[step.stage]), json=body, allow_redirects=False,
                    headers={"X-CSRFToken": token, "Referer": self.url(_TASK_PAGE[step.stage])},
                ) as resp:
                    status, location = resp.status, resp.headers.get("Location", "")
                    try:
                        text = await page_text(resp)
                    except (ProtocolError, *_NETWORK_EXCEPTIONS):
                        # The status alone decides acceptance (a 200 was accepted, whatever
                        # follows it); the body only helps.
                        text = ""
            except _NETWORK_EXCEPTIONS as exc:
                raise AmbiguousSubmit(f"task POST failed: {translate(exc)}", model=model) from exc
            if 200 <= status < 300:  # 200 on the course site; 201, 202, 204 say the same
                return _job_id_of(text)
            if status in _REDIRECTS and _LOGIN_PATH in location:
                await self.login(after_generation=generation)  # not accepted: safe to repeat
                continue
            if status == 403 and attempt == 0:
                self._csrf = None  # stale token: fetch a fresh one once
                continue
            if status == 409:
                raise ModelBusy(f"model {model} is busy", model=model)
            if status >= 500 or 300 <= status < 400:
                # A proxy's 5xx may come after the site took the task; a redirect
                # elsewhere may be a form's "posted, now see the list": the task list tells.
                raise AmbiguousSubmit(f"task POST answered {status}", model=model)
            raise RequestRejected(status, _error_of(text))
        raise ProtocolError("the site kept refusing the task POST's session or token")

    async def tasks(self) -> list[TaskRow]:
        html, _ = await self._get_page("gi/view_jobs/", "view_jobs")
        return await _off_the_loop(parse_task_rows, html)

    async def sections(self, model: int) -> list[Section]:
        html, url = await self._get_page(f"gi/view_data/{model}/", "view_data")
        return await _off_the_loop(parse_sections, html, url)

    @asynccontextmanager
    async def open_file(self, url: str, offset: int) -> AsyncIterator[aiohttp.ClientResponse]:
        """A streaming GET of a result file from `offset` (Range); the caller reads it.

        On the site's own origin the session goes along; on another origin (a file
        host) nothing of the site's does. Only http(s), and never https -> http.
        Raises ResultVanished on 404/410: the result was replaced or deleted.
        """
        scheme, _, _ = origin(url)
        if scheme not in ("http", "https"):
            raise ProtocolError(f"refusing a file link that is not http(s): {url}")
        if scheme == "http" and origin(self.base)[0] == "https":
            raise ProtocolError(f"refusing a plain-http file link from an https site: {url}")
        own = origin(url) == origin(self.base)
        session = self.session if own else self._elsewhere
        assert session is not None
        # The stored bytes must be the file as listed: no compression asked for (aiohttp
        # asks for gzip by default, and a proxy compressing on the fly then sends no
        # length), and none undone (a `.gz` labelled `Content-Encoding: gzip` would be
        # inflated to other bytes than the listed file's).
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        timeout = aiohttp.ClientTimeout(
            total=self.timeouts.download_s, sock_connect=self.timeouts.connect_s,
            sock_read=self.timeouts.read_s,
        )
        self.requests["download"] += 1
        try:
            async with session.get(
                url, headers=headers, timeout=timeout, allow_redirects=False,
                auto_decompress=False,
            ) as resp:
                if resp.status in _GONE:
                    raise ResultVanished(f"{url} answered {resp.status}: the result is gone")
                if not own and resp.status in _REDIRECTS:
                    raise ProtocolError(f"the file host redirected {url}; not following it")
                self._raise_for(resp)
                yield resp
        except _NETWORK_EXCEPTIONS as exc:
            raise translate(exc) from exc


# A POST answer worth reading as JSON is small (`{"job_id": 123}`, `{"error": "..."}`):
# a larger one is not parsed, on the loop, at all.
MAX_ANSWER_JSON_CHARS = 4096


def _answer_json(text: str) -> dict[str, Any] | None:
    """The POST answer as a JSON object, or None (too long, not JSON, nested too deep)."""
    if len(text) > MAX_ANSWER_JSON_CHARS:
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# A page at most this long is parsed on the event loop (a thread hop costs more); a
# longer one (view_jobs grows with the account's history: 100,000 tasks are 11 MB, seconds
# of parsing) in a worker thread, so downloads, timers and other polls go on meanwhile.
PARSE_ON_LOOP_CHARS = 64 << 10


async def _off_the_loop(parse: Callable[..., T], html: str, *args: Any) -> T:
    if len(html) <= PARSE_ON_LOOP_CHARS:
        return parse(html, *args)
    return await anyio.to_thread.run_sync(parse, html, *args)


def _job_id_of(text: str) -> int | None:
    value = (_answer_json(text) or {}).get("job_id")
    # `true` is no job id (bool is an int in Python, and True == 1 is task 1).
    return value if type(value) is int and 0 < value <= MAX_NUMBER else None


def _error_of(text: str) -> str:
    error = (_answer_json(text) or {}).get("error")
    return " ".join(str(error or text[:200]).split())[:200]
