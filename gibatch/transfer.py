"""Streamed, resumable, verified downloads of result files.

Each file streams into `NAME.part` beside its final place, resumes with Range after a
drop, must reach the size the site listed, and only then is renamed into place: a
file under its real name is always whole.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import aiofiles
import anyio

from gibatch.errors import NetworkError, TransferError
from gibatch.site import RemoteFile, SiteClient, translate

CHUNK_BYTES = 1 << 16
PART_SUFFIX = ".part"
_UNSAFE = re.compile(r"[^A-Za-z0-9._+ -]")


@dataclass(frozen=True)
class FileRecord:
    name: str
    size: int
    sha256: str


def safe_name(name: str) -> str:
    """A file name from the site is data: never a path, never hidden, never special."""
    cleaned = _UNSAFE.sub("_", name.replace("/", "_").replace("\\", "_")).strip(" ")
    cleaned = cleaned.lstrip(".")
    if not cleaned or cleaned.endswith(PART_SUFFIX):
        cleaned = f"file_{cleaned}"
    return cleaned


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


async def _stream_once(client: SiteClient, remote: RemoteFile, part: Path) -> int:
    """One attempt: append to `part` from where it stops; return the expected total."""
    offset = part.stat().st_size if part.exists() else 0
    if remote.size is not None and offset > remote.size:
        offset = 0
    async with client.open_file(remote.url, offset) as resp:
        if offset and resp.status != 206:
            offset = 0  # the site ignored Range: start over
        expected = remote.size
        if expected is None:
            if resp.content_length is None:
                raise TransferError(f"{remote.name}: the site gave no size")
            expected = offset + resp.content_length
        async with aiofiles.open(part, "ab" if offset else "wb") as out:
            try:
                async for chunk in resp.content.iter_chunked(CHUNK_BYTES):
                    await out.write(chunk)
            except Exception as exc:
                raise translate(exc) from exc
    got = part.stat().st_size
    if got < expected:
        raise NetworkError(f"{remote.name}: transfer stopped at {got} of {expected} bytes")
    if got > expected:
        part.unlink()
        raise NetworkError(f"{remote.name}: got {got} bytes, {expected} expected; restarting")
    return expected


async def fetch(
    client: SiteClient, remote: RemoteFile, folder: Path, limiter: anyio.Semaphore
) -> FileRecord:
    """Download `remote` into `folder` whole, or raise; resumes a `.part` left earlier."""
    name = safe_name(remote.name)
    final = folder / name
    part = folder / (name + PART_SUFFIX)
    folder.mkdir(parents=True, exist_ok=True)

    async def attempt() -> int:
        async with limiter:
            return await _stream_once(client, remote, part)

    size = await client.retry.wrap(attempt)()
    digest = await anyio.to_thread.run_sync(_sha256, part)
    os.replace(part, final)
    return FileRecord(name, size, digest)
