"""Streamed, resumable, verified downloads of result files.

Each file streams into `NAME.part` beside its final place, resumes with Range after a
drop, must reach the size the site listed (or announced), and only then is renamed
into place: a file under its real name is always whole. The SHA-256 is computed while
the bytes stream (a resumed file hashes its kept prefix once), so no file is read twice.

The bytes go: socket -> aiohttp (at most 2 x READ_BUFFER_BYTES read ahead) -> the event
loop, which gathers aiohttp's chunks as they are (no copy) into batches of about
WRITE_BATCH_BYTES -> one writer thread per download, which hashes and appends each
chunk while the loop reads on (hashlib and the write release the GIL). A download thus
holds at most the read-ahead and BATCHES_QUEUED + 1 batches (about 13 MiB) whatever the
file's size; the loop never waits on the disk, and the writer wakes the loop only when
the loop waits for room, not for every batch. A file of at most one batch skips the
writer: it is gathered, then opened, written and hashed in a single thread hop.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import sys
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import aiohttp
import anyio
import anyio.lowlevel

from gibatch.errors import (
    NetworkError,
    RequestRejected,
    SessionExpired,
    TransferError,
    leaves,
    local_io,
)
from gibatch.site import RemoteFile, SiteClient, number, translate

PART_SUFFIX = ".part"
WRITE_BATCH_BYTES = 1 << 20  # bytes gathered before one write+hash off the event loop
BATCHES_QUEUED = 4  # batches handed to the writer thread and not yet written, at most
READ_BUFFER_BYTES = 4 << 20  # aiohttp stops reading the socket at twice this, unread
MAX_NAME_BYTES = 200  # leaves room for ".part" and a collision suffix under NAME_MAX 255


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


def safe_name(name: str) -> str:
    """A site file name as a local file name: kept as given, apart from what could escape
    or hide. Path separators, NUL and other control characters become `_`; a leading
    `.` (which also covers `.` and `..`) becomes `_`; a name ending in `.part` gets a
    `_` after it, so it is never taken for a partial download (and deleted as one).
    Spaces, colons, accents and the rest stay: students' notebooks open
    `_output_Movie: lastmovie.gif` by name."""
    cleaned = "".join(
        "_" if ch in "/\\" or unicodedata.category(ch) == "Cc" else ch for ch in name
    ).strip()
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    # Cut to length first: a cut may leave `.part` at the end (prune would then delete
    # the file as a partial download, and it would be another file's `.part`).
    while len(cleaned.encode()) > MAX_NAME_BYTES:
        cleaned = cleaned[:-1]
    if not cleaned:
        return "file_"
    if cleaned.endswith(PART_SUFFIX):  # 1 byte: within the room MAX_NAME_BYTES leaves
        cleaned += "_"
    return cleaned


def local_files(files: Iterable[RemoteFile]) -> list[tuple[RemoteFile, str]]:
    """Each listed file of one section with its local name, in listing order: safe and
    pairwise distinct as file systems compare names (case-insensitive, and Unicode-
    normalised as on macOS, where `café` in NFC and in NFD are one file). Names that
    would collide get `~2`, `~3` before the extension, so a file listed twice (two links
    of the same text) is saved twice, never one of them only."""
    out: list[tuple[RemoteFile, str]] = []
    taken: set[str] = set()
    for remote in files:
        base = safe_name(remote.name)
        candidate, n = base, 1
        while _fold(candidate) in taken:
            n += 1
            stem, dot, ext = base.rpartition(".")
            candidate = f"{stem}~{n}.{ext}" if dot and stem else f"{base}~{n}"
        taken.add(_fold(candidate))
        out.append((remote, candidate))
    return out


def _fold(name: str) -> str:
    """`name` as a case-insensitive, normalising file system compares it (Unicode's
    canonical caseless match: NFD, casefold, NFD)."""
    return unicodedata.normalize("NFD", unicodedata.normalize("NFD", name).casefold())


class _Part:
    """The growing `.part` file and the hash of what it holds so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
        self._file: BinaryIO | None = None

    def open(self, at: int) -> None:
        """Open anew (`at` 0), or for appending after the `at` bytes already there, hashed
        once. If the file no longer holds exactly `at` bytes (a job's partial downloads
        are dropped when its tasks are about to run again, maybe between the request
        for byte `at` onwards and this), it is deleted and the file starts over: the
        answer's bytes belong after byte `at`, so appended elsewhere they would make a
        file of another content that could still reach the listed size."""
        with local_io(self.path):
            if at:
                try:
                    self._file = self.path.open("r+b")
                except FileNotFoundError:
                    self._file = None
                if self._file is None or self._file.seek(0, os.SEEK_END) != at:
                    self.close()
                    self.path.unlink(missing_ok=True)
                    raise NetworkError(f"{self.path.name}: the partial file changed while "
                                       "it was resumed; starting the file over")
                self._file.seek(0)
                self.digest = hashlib.sha256()
                while block := self._file.read(WRITE_BATCH_BYTES):
                    self.digest.update(block)
                self.size = self._file.tell()
            else:
                self._file = self.path.open("wb")
                self.digest, self.size = hashlib.sha256(), 0

    def write(self, chunks: Sequence[bytes]) -> None:
        """Append and hash `chunks` (in a worker thread: both release the GIL)."""
        assert self._file is not None
        with local_io(self.path):
            for chunk in chunks:
                self._file.write(chunk)
                self.digest.update(chunk)
                self.size += len(chunk)

    def close(self) -> None:
        if self._file is not None:
            with local_io(self.path):
                self._file.close()
            self._file = None


class _Writer:
    """The worker thread of one download: hashes and appends, in order, the batches the
    event loop hands it while the loop reads the next. At most `BATCHES_QUEUED` wait, so
    memory stays bounded whatever the file's size; the loop is woken only when it waits
    for room, not for every batch."""

    def __init__(self, part: _Part) -> None:
        self._part = part
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the three below, shared by loop and thread
        self._queued = 0  # batches handed over and not yet written
        self._room: anyio.Event | None = None  # the loop waits on it for room
        self._stopped = False

    def run(self) -> None:
        """In the worker thread, until `close()` (or a write fails)."""
        try:
            while (batch := self._queue.get()) is not None:
                self._part.write(batch)
                self._made_room(stopped=False)
        finally:
            self._made_room(stopped=True)

    def _made_room(self, stopped: bool) -> None:
        with self._lock:
            self._queued -= not stopped
            self._stopped = stopped
            room, self._room = self._room, None
        if room is not None:
            anyio.from_thread.run_sync(room.set)

    async def put(self, batch: list[bytes]) -> None:
        """Hand `batch` over, once there is room; BrokenResourceError if the thread ended."""
        while True:
            with self._lock:
                if self._stopped:
                    raise anyio.BrokenResourceError
                if self._queued < BATCHES_QUEUED:
                    self._queued += 1
                    break
                self._room = room = anyio.Event()
            await room.wait()
        self._queue.put(batch)

    def close(self) -> None:
        """No more batches: the thread writes those it has, then ends."""
        self._queue.put(None)


async def _copy(body: aiohttp.StreamReader, part: _Part, expected: int | None, floor: _Floor
                ) -> Exception | None:
    """Stream `body` into `part` through a writer thread of its own (to its end if
    `expected` is None); return what broke the connection, if anything, once all that
    came is written."""
    body.set_read_chunk_size(READ_BUFFER_BYTES)  # aiohttp's default pauses at 128 KiB
    writer = _Writer(part)
    broke: Exception | None = None
    try:
        async with anyio.create_task_group() as tg:
            # A limiter of its own: a long download must not hold one of the shared threads.
            tg.start_soon(partial(anyio.to_thread.run_sync, writer.run,
                                  limiter=anyio.CapacityLimiter(1)))
            try:
                with suppress(anyio.BrokenResourceError):  # the writer failed: its error follows
                    left = sys.maxsize if expected is None else expected - part.size
                    broke = await _read(body, writer.put, left, floor)
            finally:
                writer.close()
    except BaseExceptionGroup as group:  # the writer's error (a full disk) as itself
        raise _sole(group) from None
    return broke


@dataclass
class _Floor:
    """The least a download must bring: `rate` bytes a second, over each `window` s."""

    rate: float
    window: float | None
    began: float = field(default_factory=time.monotonic)
    got: int = 0

    def check(self, size: int) -> None:
        """Count `size` more bytes; NetworkError if a whole window brought too few."""
        self.got += size
        if self.window is None:
            return
        now = time.monotonic()
        if now - self.began >= self.window:
            if self.got < self.rate * (now - self.began):
                raise NetworkError(f"less than {self.rate:g} bytes a second for "
                                   f"{now - self.began:.1f} s: the download has stalled")
            self.began, self.got = now, 0


async def _read(body: aiohttp.StreamReader, put: Callable[[list[bytes]], Awaitable[None]],
                left: int, floor: _Floor) -> Exception | None:
    """Hand `body` on in batches, stopping past `left` bytes; return what broke it (the
    connection, or a trickle below `floor`)."""
    batch: list[bytes] = []
    batched = 0
    broke: Exception | None = None
    try:
        async for chunk, _ in body.iter_chunks():
            batch.append(chunk)
            batched += len(chunk)
            floor.check(len(chunk))
            if batched >= WRITE_BATCH_BYTES or batched > left:
                await put(batch)
                left -= batched
                batch, batched = [], 0
                if left < 0:
                    break  # more than listed: the caller refuses the file
                # anyio cancels a task only while the future it awaits is pending; with
                # data always buffered and room always made, that may never be seen
                # (measured: a cancelled 64 MiB download read to its end), so look.
                await anyio.lowlevel.checkpoint_if_cancelled()
    except anyio.BrokenResourceError:
        raise
    except Exception as exc:  # the connection broke or stalled: keep what came, for Range
        broke = exc
    if batch:
        await put(batch)
    return broke


async def _small(body: aiohttp.StreamReader, part: _Part, start: int, left: int,
                 floor: _Floor) -> Exception | None:
    """A file of at most one batch (most of a job's files: plots, logs, parameters):
    gathered on the loop, then opened, written and hashed in one thread hop, because a
    writer thread and its hand-overs would cost more than the bytes. Memory stays
    bounded: `_read` stops once past `left`. Returns what broke the connection."""
    batches: list[list[bytes]] = []

    async def keep(batch: list[bytes]) -> None:
        batches.append(batch)

    broke = await _read(body, keep, left, floor)

    def store() -> None:
        part.open(start)
        for batch in batches:
            part.write(batch)

    await anyio.to_thread.run_sync(store)
    return broke


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException:
    found = leaves(group)
    return found[0] if len(found) == 1 else group


async def _stream_once(client: SiteClient, remote: RemoteFile, part: _Part) -> int:
    """One attempt: append to the part from where it stops; return the expected total."""
    offset = part.path.stat().st_size if part.path.exists() else 0
    if remote.size is not None and offset > remote.size:
        offset = 0
    async with client.open_file(remote.url, offset) as resp:
        # Only 200 is the whole file; 206 only answers a Range we sent. A 206 to a
        # request for the whole file (a part of it, by its own word), a 204 or a 304
        # would otherwise be saved as the whole file when no size is listed.
        if resp.status != 200 and not (offset and resp.status == 206):
            asked = f"bytes {offset}-" if offset else "the whole file"
            raise TransferError(f"{remote.name}: the site answered {resp.status} to a "
                                f"request for {asked}; not taking it for the file")
        resumed = resp.status == 206  # else the site ignored Range: the whole file
        total = None
        if resumed:
            span = _content_range(resp.headers.get("Content-Range", ""))
            total = span[1] if span else None
            if (span is None or span[0] != offset
                    or (None not in (total, remote.size) and total != remote.size)):
                # Appended at our offset, another offset's bytes (or another version's:
                # the total changed) would leave a file of the right size with a hole
                # in it: start the file over instead.
                part.path.unlink(missing_ok=True)
                raise NetworkError(f"{remote.name}: the site resumed from another offset "
                                   f"than {offset}, or another file; starting the file over")
        start = offset if resumed else 0
        expected = remote.size if remote.size is not None else total
        if expected is None and resp.content_length is not None:
            expected = start + resp.content_length
        # No size at all: only a chunked answer says where it ends (aiohttp raises if the
        # terminating chunk never came); one that ends when the connection closes is
        # whole or cut short alike.
        if expected is None and "chunked" not in resp.headers.get(
                "Transfer-Encoding", "").lower():
            raise TransferError(f"{remote.name}: the site gave no size")
        floor = _Floor(client.timeouts.min_rate_b_s, client.timeouts.read_s)
        try:
            if expected is not None and expected - start <= WRITE_BATCH_BYTES:
                broke = await _small(resp.content, part, start, expected - start, floor)
            else:
                if expected is not None:
                    _room_for(part.path, expected - start, remote.name)
                await anyio.to_thread.run_sync(part.open, start)
                broke = await _copy(resp.content, part, expected, floor)
            if broke is not None:  # the connection broke: what came is kept, for Range
                raise translate(broke) from broke
        finally:
            part.close()  # at once, on the loop: it must happen even when cancelled
    return part.size if expected is None else expected  # chunked to its end: whole


async def fetch(
    client: SiteClient, remote: RemoteFile, folder: Path, limiter: anyio.Semaphore,
    name: str | None = None,
) -> FileRecord:
    """Download `remote` into `folder` (as `name`, default its safe name) whole, or raise.

    A `.part` left by an earlier attempt is resumed; one already whole is only renamed.
    A 416 (the site cannot resume there) restarts the file once; the same wrong size
    twice means the listing is wrong, not the network, and fails with both sizes.
    """
    name = name or safe_name(remote.name)
    final = folder / name
    with local_io(folder):
        folder.mkdir(parents=True, exist_ok=True)
    part = _Part(folder / (name + PART_SUFFIX))
    mismatches: list[tuple[int, int]] = []
    restarted = False

    async def attempt() -> int:
        nonlocal restarted
        generation = client.generation
        try:
            async with limiter:
                return await _stream_once(client, remote, part)
        except SessionExpired:
            await client.login(after_generation=generation)
            raise NetworkError(f"{remote.name}: the session had expired; retrying") from None
        except RequestRejected as exc:
            if exc.status != 416 or restarted:
                raise
            restarted = True
            part.path.unlink(missing_ok=True)
            raise NetworkError(f"{remote.name}: the site cannot resume there; "
                               "starting the file over") from exc

    async def whole() -> int:
        if remote.size is not None and _size(part.path) == remote.size:
            try:
                await anyio.to_thread.run_sync(part.open, remote.size)  # left whole
            finally:
                part.close()
            return remote.size
        expected = await attempt()  # retried with `whole`: one budget for the file
        if part.size == expected:
            return expected
        seen = (part.size, expected)
        if part.size > expected:
            part.path.unlink(missing_ok=True)
        if seen in mismatches:
            raise TransferError(f"{remote.name}: the site serves {part.size} bytes but "
                                f"lists {expected}, twice in a row; the listing is wrong")
        mismatches.append(seen)
        raise NetworkError(f"{remote.name}: got {part.size} of {expected} bytes")

    size = await client.retry.wrap(whole)()
    with local_io(final):
        os.replace(part.path, final)
    return FileRecord(name, size, part.digest.hexdigest())


def _content_range(content_range: str) -> tuple[int, int | None] | None:
    """The first byte and the total (None if `*`) of a 206 answer's `bytes
    START-END/TOTAL`; None if unreadable."""
    unit, _, spec = content_range.strip().partition(" ")
    span, _, total = spec.partition("/")
    first = number(span.partition("-")[0].strip())
    total = total.strip()
    size = None if total == "*" else number(total)
    if unit != "bytes" or first is None or (size is None and total != "*"):
        return None
    return first, size


def _room_for(path: Path, size: int, name: str) -> None:
    """Refuse, for this job alone, a file the disk cannot hold (a listed size is the
    site's word): writing it until the disk is full would stop the whole run."""
    with local_io(path.parent):
        free = shutil.disk_usage(path.parent).free
    if size > free:
        raise TransferError(f"{name}: {size / 1e9:.1f} GB to download, only "
                            f"{free / 1e9:.1f} GB free on {path.parent}")


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
