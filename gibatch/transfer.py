"""Streamed, resumable, verified downloads of result files.

Each file streams into `NAME.part` beside its final place, resumes with Range after a
drop, must reach the size the site listed (or announced), and only then is renamed
into place: a file under its real name is always whole. The SHA-256 is computed while
the bytes stream (a resumed file hashes its kept prefix once), so no file is read twice.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import anyio

from gibatch.errors import (
    GibatchError,
    NetworkError,
    RequestRejected,
    SessionExpired,
    TransferError,
    local_io,
)
from gibatch.site import RemoteFile, SiteClient, translate

PART_SUFFIX = ".part"
WRITE_BATCH_BYTES = 1 << 20  # bytes gathered before one write+hash off the event loop
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
    prefix so it is never taken for a partial download. Spaces, colons, accents and
    the rest stay: students' notebooks open `_output_Movie: lastmovie.gif` by name."""
    cleaned = "".join(
        "_" if ch in "/\\" or unicodedata.category(ch) == "Cc" else ch for ch in name
    ).strip()
    if cleaned.startswith("."):
        cleaned = "_" + cleaned[1:]
    if not cleaned or cleaned.endswith(PART_SUFFIX):
        cleaned = f"file_{cleaned}"
    while len(cleaned.encode()) > MAX_NAME_BYTES:
        cleaned = cleaned[:-1]
    return cleaned


def local_names(names: Iterable[str]) -> dict[str, str]:
    """Local names for the remote `names` of one section: safe and pairwise distinct
    (two remote names that neutralise alike get `~2`, `~3` before the extension)."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for name in names:
        if name in out:
            continue
        base = safe_name(name)
        candidate, n = base, 1
        while candidate.casefold() in taken:
            n += 1
            stem, dot, ext = base.rpartition(".")
            candidate = f"{stem}~{n}.{ext}" if dot and stem else f"{base}~{n}"
        taken.add(candidate.casefold())
        out[name] = candidate
    return out


class _Part:
    """The growing `.part` file and the hash of what it holds so far."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest = hashlib.sha256()
        self.size = 0
        self._file: BinaryIO | None = None

    def open(self, keep: bool) -> None:
        """Open for appending after the bytes already there (hashed once), or anew."""
        with local_io(self.path):
            if keep and self.path.exists():
                self._file = self.path.open("r+b")
                self.digest = hashlib.sha256()
                while block := self._file.read(WRITE_BATCH_BYTES):
                    self.digest.update(block)
                self.size = self._file.tell()
            else:
                self._file = self.path.open("wb")
                self.digest, self.size = hashlib.sha256(), 0

    def write(self, data: bytes) -> None:
        assert self._file is not None
        with local_io(self.path):
            self._file.write(data)
        self.digest.update(data)
        self.size += len(data)

    def close(self) -> None:
        if self._file is not None:
            with local_io(self.path):
                self._file.close()
            self._file = None


async def _stream_once(client: SiteClient, remote: RemoteFile, part: _Part) -> int:
    """One attempt: append to the part from where it stops; return the expected total."""
    offset = part.path.stat().st_size if part.path.exists() else 0
    if remote.size is not None and offset > remote.size:
        offset = 0
    async with client.open_file(remote.url, offset) as resp:
        resumed = bool(offset) and resp.status == 206  # else the site ignored Range
        try:
            await anyio.to_thread.run_sync(part.open, resumed)
            expected = remote.size
            if expected is None:
                if resp.content_length is None:
                    raise TransferError(f"{remote.name}: the site gave no size")
                expected = part.size + resp.content_length
            batch = bytearray()
            try:
                async for chunk in resp.content.iter_any():
                    batch += chunk
                    if len(batch) >= WRITE_BATCH_BYTES:
                        await anyio.to_thread.run_sync(part.write, bytes(batch))
                        batch.clear()
                        if part.size > expected:
                            break
            except GibatchError:
                raise
            except Exception as exc:  # the connection broke: keep what came, for Range
                if batch:
                    await anyio.to_thread.run_sync(part.write, bytes(batch))
                raise translate(exc) from exc
            if batch:
                await anyio.to_thread.run_sync(part.write, bytes(batch))
        finally:
            part.close()  # at once, on the loop: it must happen even when cancelled
    return expected


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
                await anyio.to_thread.run_sync(part.open, True)  # left whole: hash, rename
            finally:
                part.close()
            return remote.size
        expected = await client.retry.wrap(attempt)()
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


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
