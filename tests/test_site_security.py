"""The local site under hostile input, over real HTTP on 127.0.0.1.

Media are private and never leave the media folder: another account, no session,
`..` in every spelling, absolute paths, symlinks out of the folder, names the file
system refuses: none of them is ever answered with a file's content. Malformed task
and login bodies of every kind are answered 4xx with a reason, never 500. And no
request here makes the site log a traceback.

Requests go out byte for byte over a plain socket (`Raw`): HTTP clients normalise
`..` and re-encode `%2F`, which would hide what a hostile client actually sends.
"""

from __future__ import annotations

import json
import logging
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp
import anyio
import pytest

from gibatch.sim.app import SiteConfig
from gibatch.sim.server import ThreadedSite
from tests.conftest import read_base
from tests.test_site_protocol import PASSWORD, TINY_GALAXY, csrf, login, post, wait_idle

pytestmark = pytest.mark.timeout(60)

OTHER_PASSWORD = "mallory's own"
SECRET = b"a secret outside the media folder"
MEDIA = "/ast80011/media"
LOGIN = "/ast80011/accounts/login/"


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]  # names lower-cased; a repeated header's values joined by \n
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def error(self) -> str:
        """The reason of a JSON error answer."""
        reason = json.loads(self.body)["error"]
        assert isinstance(reason, str) and reason
        return reason


class Raw:
    """HTTP/1.1 over a plain socket, one request per connection."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname and parts.port
        self.host, self.port = parts.hostname, parts.port

    def request(self, method: str, target: str | bytes, *, cookies: dict[str, str] | None = None,
                headers: dict[str, str | bytes] | None = None, body: bytes = b"") -> Answer:
        target_bytes = target if isinstance(target, bytes) else target.encode("ascii")
        lines = [method.encode() + b" " + target_bytes + b" HTTP/1.1",
                 f"Host: {self.host}:{self.port}".encode(), b"Connection: close",
                 f"Content-Length: {len(body)}".encode()]
        if cookies:
            lines.append(b"Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items()).encode())
        for name, value in (headers or {}).items():
            lines.append(name.encode() + b": " + (value if isinstance(value, bytes)
                                                   else value.encode()))
        with socket.create_connection((self.host, self.port), timeout=30) as conn:
            conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
            data = b""
            while chunk := conn.recv(1 << 16):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        found: dict[str, str] = {}
        for name, value in (line.split(":", 1) for line in header_lines):
            key = name.strip().lower()
            found[key] = f"{found[key]}\n{value.strip()}" if key in found else value.strip()
        if found.get("transfer-encoding") == "chunked":
            payload = _unchunk(payload)
        return Answer(int(status_line.split()[1]), found, payload)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out, data = out + data[:size], data[size + 2:]
    return out


@dataclass(frozen=True)
class Owner:
    """alice, logged in, with one result file and its content."""

    cookies: dict[str, str]
    url: str  # root-relative, as view_data links it
    content: bytes
    folder: Path  # the job's media folder
    secret: Path  # a readable file outside the media folder

    def part(self, n: int) -> str:
        """Path segment n of the file's URL after /media/: 0 user, 1 model, 2 job, 3 name."""
        return self.url.removeprefix(MEDIA + "/").split("/")[n]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


WATCHED_LOGGERS = ("gibatch", "aiohttp", "asyncio")


@pytest.fixture(scope="module")
def log() -> Iterator[Records]:
    """Every record of the site's loggers (aiohttp's server log included), module-wide."""
    records = Records()
    for name in WATCHED_LOGGERS:
        logging.getLogger(name).addHandler(records)
    yield records
    for name in WATCHED_LOGGERS:
        logging.getLogger(name).removeHandler(records)


@pytest.fixture(autouse=True)
def no_traceback_logged(log: Records) -> Iterator[None]:
    before = len(log.records)
    yield
    bad = [r for r in log.records[before:] if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [f"{r.name}: {r.getMessage()}" for r in bad]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, log: Records) -> Iterator[ThreadedSite]:
    config = SiteConfig(data_dir=tmp_path_factory.mktemp("site"), workers=1, model_count=3,
                        accounts={"alice": PASSWORD, "mallory": OTHER_PASSWORD})
    running = ThreadedSite(config)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def raw(site: ThreadedSite) -> Raw:
    return Raw(site.running.url)


@pytest.fixture(scope="module")
def owner(site: ThreadedSite) -> Owner:
    """alice's galaxy on model 1, and in its folder what an attacker would love to plant:
    a symlink to a file outside, a symlinked folder (as job 99) and a symlink loop."""
    base = site.running.url

    async def first_result() -> tuple[dict[str, str], str, bytes]:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            await login(http, base)
            token = await csrf(http, base)
            assert (await post(http, base, "galactic", {**TINY_GALAXY, "model_number": 1},
                               token))[0] == 200
            assert (await wait_idle(http, base, 1))[3] == "Completed"
            async with http.get(f"{base}/gi/view_data/1/") as resp:
                found = re.search(r"<a href='([^']+)'>preview\.png</a>", await resp.text())
            assert found
            async with http.get(f"{base.removesuffix('/ast80011')}{found[1]}") as resp:
                assert resp.status == 200
                content = await resp.read()
            return {c.key: c.value for c in http.cookie_jar}, found[1], content

    cookies, url, content = anyio.run(first_result)
    data = site.running.site.config.data_dir
    secret = data / "secret.txt"
    secret.write_bytes(SECRET)
    folder = data / "media" / Path(url.removeprefix(MEDIA + "/")).parent
    (folder / "evil.txt").symlink_to(secret)
    (folder.parent / "99").symlink_to(data, target_is_directory=True)
    (folder / "loop").symlink_to("loop")
    assert (folder / "evil.txt").read_bytes() == (folder.parent / "99" / "secret.txt"
                                                   ).read_bytes() == SECRET
    return Owner(cookies, url, content, folder, secret)


@pytest.fixture(scope="module")
def intruder(raw: Raw) -> dict[str, str]:
    """mallory's session cookies: another account, properly logged in."""
    token = "t" * 32
    answer = raw.request(
        "POST", LOGIN, cookies={"csrftoken": token},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body=f"csrfmiddlewaretoken={token}&username=mallory&password={quote(OTHER_PASSWORD)}"
        .encode())
    assert answer.status == 302
    session = re.search(r"sessionid=([^;]+)", answer.headers["set-cookie"])
    assert session
    return {"sessionid": session[1]}


# --- media ----------------------------------------------------------------------------------

def test_the_owner_gets_the_file(raw: Raw, owner: Owner) -> None:
    answer = raw.request("GET", owner.url, cookies=owner.cookies)
    assert (answer.status, answer.body) == (200, owner.content)


def test_no_session_gets_no_file(raw: Raw, owner: Owner) -> None:
    answer = raw.request("GET", owner.url)
    # The login page, as Django's login_required answers every protected page: a client
    # whose session expired mid-sweep logs in again (a 404 would read as "result gone").
    assert answer.status == 302, answer
    assert answer.headers["location"].startswith(LOGIN + "?next=")
    assert owner.content not in answer.body


@pytest.mark.parametrize("target", [
    "{url}",
    MEDIA + "/mallory/../{user}/{model}/{job}/{name}",
    MEDIA + "/mallory/%2e%2e/{user}/{model}/{job}/{name}",
    MEDIA + "/mallory%2F..%2F{user}/{model}/{job}/{name}",
], ids=["same-url", "dotdot-from-own-folder", "encoded-dotdot", "encoded-slash"])
def test_another_account_gets_404(raw: Raw, owner: Owner, intruder: dict[str, str],
                                  target: str) -> None:
    answer = raw.request("GET", _fill(target, owner), cookies=intruder)
    assert answer.status == 404
    assert owner.content not in answer.body


PROBES = {  # (target, what it tries)
    "dotdot-user": MEDIA + "/{user}/../{user}/{model}/{job}/{name}",
    "dotdot-name": MEDIA + "/{user}/{model}/{job}/../../../../secret.txt",
    "encoded-dotdot-name": MEDIA + "/{user}/{model}/{job}/%2e%2e%2F%2e%2e%2F%2e%2e%2F%2e%2e"
                                   "%2Fsecret.txt",
    "encoded-slash-name": MEDIA + "/{user}/{model}/{job}/..%2F..%2F..%2F..%2Fsecret.txt",
    "upper-encoded-dotdot": MEDIA + "/{user}/{model}/{job}/%2E%2E%2F%2E%2E%2F%2E%2E%2F%2E%2E"
                                    "%2Fsecret.txt",
    "backslashes": MEDIA + "/{user}/{model}/{job}/..%5C..%5C..%5C..%5Csecret.txt",
    "encoded-dotdot-user": MEDIA + "/%2e%2e/{model}/{job}/{name}",
    "encoded-dotdot-job": MEDIA + "/{user}/{model}/%2e%2e/{name}",
    "absolute-encoded": MEDIA + "/{user}/{model}/{job}/{secret_encoded}",
    "absolute-double-slash": MEDIA + "/{user}/{model}/{job}/{secret}",
    "symlink-to-file-outside": MEDIA + "/{user}/{model}/{job}/evil.txt",
    "symlinked-folder": MEDIA + "/{user}/{model}/99/secret.txt",
    "symlink-loop": MEDIA + "/{user}/{model}/{job}/loop",
    "nul-byte": MEDIA + "/{user}/{model}/{job}/{name}%00",
    "name-too-long": MEDIA + "/{user}/{model}/{job}/" + "a" * 300,
    "non-ascii-digit-model": MEDIA + "/{user}/%C2%B2/{job}/{name}",
    "bad-percent": MEDIA + "/{user}/{model}/{job}/%zz%",
}


@pytest.mark.parametrize("target", list(PROBES.values()), ids=list(PROBES))
def test_owner_cannot_leave_the_media_folder(raw: Raw, owner: Owner, target: str) -> None:
    answer = raw.request("GET", _fill(target, owner), cookies=owner.cookies)
    assert answer.status == 404, answer
    assert SECRET not in answer.body and owner.content not in answer.body


def test_raw_bytes_in_the_url_answer_400_in_one_log_line(raw: Raw, owner: Owner,
                                                         log: Records) -> None:
    before = len(log.records)
    answer = raw.request("GET", MEDIA.encode() + b"/alice/\xc2\xb2/1/x", cookies=owner.cookies)
    assert answer.status == 400
    said = [r for r in log.records[before:] if r.name.startswith("gibatch")]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "\n" not in said[0].getMessage() and "Invalid char in url" in said[0].getMessage()


@pytest.mark.parametrize("cut", [False, True], ids=["whole", "cut-fault"])
@pytest.mark.parametrize("value", [b"bytes=\xc2\xb2-", b"bytes=-", b"bytes=9999999999999999999-",
                                   b"bytes=5-2", b"items=0-1"],
                         ids=["superscript-two", "empty", "huge", "backwards", "other-unit"])
def test_odd_ranges_never_fail(site: ThreadedSite, raw: Raw, owner: Owner, value: bytes,
                               cut: bool) -> None:
    if cut:
        site.running.site.faults.script("cut", "/media/")
    answer = raw.request("GET", owner.url, cookies=owner.cookies, headers={"Range": value})
    assert answer.status in (200, 206, 416), answer


# --- task bodies ----------------------------------------------------------------------------

def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


GALAXY = {**TINY_GALAXY, "model_number": 2}
PLOT = {**read_base()["plot1.json"], "model_number": 2}
DEEP = 100_000
BODIES: dict[str, tuple[str, bytes, str]] = {  # page, body, the reason's first word
    "deeply-nested": ("galactic", b'{"model_number": 2, "disk": ' + b"[" * DEEP + b"]" * DEEP
                      + b"}", "body"),
    "deeply-nested-objects": ("galactic", b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "body"),
    "not-json": ("galactic", b"model_number=2&galaxy_number=1", "body"),
    "empty": ("galactic", b"", "body"),
    "not-utf8": ("galactic", b'{"model_number": 2, "galaxy_number": "\xff\xfe"}', "body"),
    "json-list": ("galactic", b"[1, 2, 3]", "body"),
    "json-string": ("galactic", b'"model_number"', "body"),
    "json-null": ("galactic", b"null", "body"),
    "model-number-string": ("galactic", _body({**GALAXY, "model_number": "2"}), "model_number"),
    "model-number-bool": ("galactic", _body({**GALAXY, "model_number": True}), "model_number"),
    "model-number-float": ("galactic", _body({**GALAXY, "model_number": 2.0}), "model_number"),
    "model-number-huge": ("galactic", _body({**GALAXY, "model_number": 10**30}), "model_number"),
    "model-number-5000-digits": ("galactic", b'{"model_number": ' + b"9" * 5000 + b"}", "body"),
    "model-number-infinite": ("galactic", b'{"model_number": 1e999}', "model_number"),
    "model-number-missing": ("galactic", _body(TINY_GALAXY), "model_number"),
    "nan": ("galactic", json.dumps({**GALAXY, "disk": {"number_of_particles": 20,
                                                       "mass_factor": float("nan")}}).encode(),
            "disk.mass_factor"),
    "unknown-field": ("galactic", _body({**GALAXY, "evil": 1}), "evil"),
    "unknown-field-lone-surrogate": ("galactic", b'{"\\ud800": 1, "model_number": 2}', ""),
    "particles-huge": ("galactic", _body({**GALAXY, "disk": {"number_of_particles": 10**30}}),
                       "disk.number_of_particles"),
    "particles-string": ("galactic", _body({**GALAXY, "disk": {"number_of_particles": "20"}}),
                         "disk.number_of_particles"),
    "plot-number-huge": ("plotgalaxies", _body({**PLOT, "plot_number": 10**30}), "plot_number"),
    "plot-number-string": ("plotgalaxies", _body({**PLOT, "plot_number": "1"}), "plot_number"),
}


@pytest.mark.parametrize("page,body,field", list(BODIES.values()), ids=list(BODIES))
def test_malformed_task_body_answers_400(site: ThreadedSite, raw: Raw, owner: Owner, page: str,
                                         body: bytes, field: str) -> None:
    tasks = site.running.site.store.task_count()
    answer = raw.request("POST", f"/ast80011/gi/{page}", cookies=owner.cookies, body=body,
                         headers={"X-CSRFToken": owner.cookies["csrftoken"],
                                  "Content-Type": "application/json"})
    assert answer.status == 400, answer
    assert answer.error().startswith(field), answer.error()
    assert site.running.site.store.task_count() == tasks  # nothing queued


def test_task_body_over_the_size_limit_answers_413(site: ThreadedSite, raw: Raw,
                                                   owner: Owner) -> None:
    answer = raw.request("POST", "/ast80011/gi/galactic", cookies=owner.cookies,
                         body=b" " * (1 << 20) + b"{}",
                         headers={"X-CSRFToken": owner.cookies["csrftoken"]})
    assert answer.status == 413


# --- login bodies ---------------------------------------------------------------------------

MULTIPART = "multipart/form-data; boundary=xyz"
URLENCODED = "application/x-www-form-urlencoded"
TOKEN = "k" * 32


def _part(headers: str, value: bytes = b"alice") -> bytes:
    return b"--xyz\r\n" + headers.encode() + b"\r\n\r\n" + value + b"\r\n--xyz--\r\n"


LOGINS: dict[str, tuple[str, bytes, int]] = {  # content type, body, status
    "multipart-no-boundary": ("multipart/form-data", b"--xyz\r\n", 400),
    "multipart-garbage": (MULTIPART, b"garbage, not a part", 400),
    "multipart-truncated": (MULTIPART, b'--xyz\r\nContent-Disposition: form-data; name="u"\r\n'
                                       b"\r\nalice", 400),
    "multipart-part-without-name": (MULTIPART, _part("Content-Disposition: form-data"), 400),
    "multipart-no-disposition": (MULTIPART, _part("X-Nothing: here"), 400),
    "multipart-boundary-too-long": ("multipart/form-data; boundary=" + "x" * 100, b"--x", 400),
    "multipart-unknown-charset": (MULTIPART, _part(
        'Content-Disposition: form-data; name="username"\r\n'
        "Content-Type: text/plain; charset=no-such-charset"), 400),
    "multipart-unknown-transfer-encoding": (MULTIPART, _part(
        'Content-Disposition: form-data; name="username"\r\n'
        "Content-Transfer-Encoding: no-such-encoding"), 400),
    "multipart-not-utf8": (MULTIPART, _part(
        'Content-Disposition: form-data; name="username"', b"\xff\xfe"), 400),
    "urlencoded-not-utf8": (URLENCODED, b"csrfmiddlewaretoken=" + TOKEN.encode()
                            + b"&username=\xff\xfe", 400),
    "urlencoded-garbage": (URLENCODED, b"%%%&&&===%zz&\x00", 403),  # no token in it: CSRF
    "json-instead-of-form": ("application/json", b'{"username": "alice"}', 403),
    "no-token": (URLENCODED, f"username=alice&password={quote(PASSWORD)}".encode(), 403),
    # Django's AuthenticationForm shows the form again (200) for missing fields:
    "missing-username-and-password": (URLENCODED, f"csrfmiddlewaretoken={TOKEN}".encode(), 200),
    "missing-password": (URLENCODED, f"csrfmiddlewaretoken={TOKEN}&username=alice".encode(),
                         200),
}


@pytest.mark.parametrize("content_type,body,status", list(LOGINS.values()), ids=list(LOGINS))
def test_malformed_login_never_fails(raw: Raw, content_type: str, body: bytes,
                                     status: int) -> None:
    answer = raw.request("POST", LOGIN, cookies={"csrftoken": TOKEN}, body=body,
                         headers={"Content-Type": content_type})
    assert answer.status == status, answer
    assert "sessionid" not in answer.headers.get("set-cookie", "")
    if status == 400:
        assert re.search(r"Unreadable login form: \S", answer.text), answer.text


def test_login_error_page_escapes_what_it_echoes(raw: Raw) -> None:
    body = _part('Content-Disposition: form-data; name="username"\r\n'
                 'Content-Type: text/plain; charset="<script>alert(1)</script>"')
    answer = raw.request("POST", LOGIN, cookies={"csrftoken": TOKEN}, body=body,
                         headers={"Content-Type": MULTIPART})
    assert answer.status == 400
    assert "<script>" not in answer.text and "&lt;script&gt;" in answer.text


@pytest.mark.parametrize("target", ["//evil.example/ast80011/gi/", "https://evil.example/",
                                    "/ast80011/%0d%0aX-Evil: 1"])
def test_login_redirects_only_within_the_site(raw: Raw, target: str) -> None:
    body = (f"csrfmiddlewaretoken={TOKEN}&username=alice&password={quote(PASSWORD)}"
            f"&next={quote(target)}").encode()
    answer = raw.request("POST", LOGIN, cookies={"csrftoken": TOKEN}, body=body,
                         headers={"Content-Type": URLENCODED})
    assert answer.status == 302
    assert answer.headers["location"].startswith("/ast80011/")
    assert "x-evil" not in answer.headers


def _fill(target: str, owner: Owner) -> str:
    return target.format(
        url=owner.url, user=owner.part(0), model=owner.part(1), job=owner.part(2),
        name=owner.part(3), secret=str(owner.secret),
        secret_encoded=quote(str(owner.secret), safe=""))
