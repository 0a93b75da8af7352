"""The transfer engine's guarantees, against the real local site's media route: a cut
download resumes with Range and ends byte-identical, a file larger (or smaller) than
listed is refused, a `.part` is never taken for a whole file, a failing disk and a
cancellation leave a resumable `.part`, and a download holds a bounded number of
batches whatever the file's size. No timings: the rates are the benchmark's business
(`python -m tests.benchmarks.transfer`)."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import pytest

from gibatch import transfer
from gibatch.errors import DiskFull, NetworkError, RequestRejected, TransferError, local_io
from gibatch.sim.server import ThreadedSite
from gibatch.site import RemoteFile, RetryPolicy, SiteClient, Timeouts
from gibatch.transfer import PART_SUFFIX, fetch
from tests.conftest import FAST_RETRY

pytestmark = pytest.mark.anyio

MiB = 1 << 20


@pytest.fixture
def site(make_site: Callable[..., ThreadedSite]) -> ThreadedSite:
    return make_site()


def place(site: ThreadedSite, name: str, data: bytes, listed: int | None = None) -> RemoteFile:
    """`data` as a result file of alice's model 1 on `site`, listed with `listed` bytes."""
    folder = site.running.site.media / "alice" / "1" / "7"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return RemoteFile(name, f"{site.running.url}/media/alice/1/7/{name}",
                      len(data) if listed is None else listed)


class Recorder:
    """Each request's Range offset and the status the site answered."""

    def __init__(self, client: SiteClient) -> None:
        self.calls: list[tuple[int, int]] = []
        real = client.open_file

        @asynccontextmanager
        async def open_file(url: str, offset: int) -> AsyncIterator[aiohttp.ClientResponse]:
            async with real(url, offset) as resp:
                self.calls.append((offset, resp.status))
                yield resp

        client.open_file = open_file  # type: ignore[method-assign]


@asynccontextmanager
async def logged_in(site: ThreadedSite, retry: RetryPolicy = FAST_RETRY
                    ) -> AsyncIterator[tuple[SiteClient, Recorder]]:
    async with SiteClient(site.running.url, "alice", "pw", retry=retry,
                          timeouts=Timeouts(read_s=5.0, page_s=10.0)) as client:
        await client.login()
        yield client, Recorder(client)


async def get(client: SiteClient, remote: RemoteFile, folder: Path) -> transfer.FileRecord:
    return await fetch(client, remote, folder, anyio.Semaphore(1))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(params=[3 * MiB + 12345, 300_007], ids=["batches", "one-hop"])
def data(request: pytest.FixtureRequest) -> bytes:
    """Several write batches through the writer thread, or a file small enough for the
    one-hop path (gathered, then written at once); neither a round number."""
    return os.urandom(request.param)


async def test_a_cut_download_resumes_with_range_and_ends_byte_identical(
        site: ThreadedSite, data: bytes, tmp_path: Path) -> None:
    remote = place(site, "movie.gif", data)
    site.running.site.faults.script("cut", "/media/")
    async with logged_in(site) as (client, rec):
        record = await get(client, remote, tmp_path)
    (first, status0), (offset, status1) = rec.calls
    assert (first, status0) == (0, 200)
    assert 0 < offset < len(data) and status1 == 206  # resumed where the cut left it
    assert (tmp_path / "movie.gif").read_bytes() == data
    assert record == transfer.FileRecord("movie.gif", len(data), sha(data))
    assert not (tmp_path / ("movie.gif" + PART_SUFFIX)).exists()


async def test_a_paced_site_serves_ranges_byte_identical(
        make_site: Callable[..., ThreadedSite], data: bytes, tmp_path: Path) -> None:
    """The site's per-stream pace (`stream_rate_mb_s`, for the benchmark) keeps Range:
    a cut download resumes from its offset and ends whole; a start past the end is 416."""
    paced = make_site(stream_rate_mb_s=100.0)
    remote = place(paced, "snapshots.h5", data)
    paced.running.site.faults.script("cut", "/media/")
    async with logged_in(paced) as (client, rec):
        record = await get(client, remote, tmp_path)
        with pytest.raises(RequestRejected) as past_end:
            async with client.open_file(remote.url, len(data)):
                pass
        assert past_end.value.status == 416
    (_, status0), (offset, status1) = rec.calls[:2]
    assert status0 == 200 and 0 < offset < len(data) and status1 == 206
    assert (tmp_path / "snapshots.h5").read_bytes() == data
    assert record == transfer.FileRecord("snapshots.h5", len(data), sha(data))


async def test_a_part_file_left_short_is_resumed_and_its_prefix_hashed(
        site: ThreadedSite, data: bytes, tmp_path: Path) -> None:
    remote = place(site, "a.dat", data)
    kept = len(data) // 3 + 7
    (tmp_path / "a.dat.part").write_bytes(data[:kept])
    async with logged_in(site) as (client, rec):
        record = await get(client, remote, tmp_path)
    assert rec.calls == [(kept, 206)]
    assert (tmp_path / "a.dat").read_bytes() == data and record.sha256 == sha(data)


async def test_a_site_that_ignores_range_restarts_the_part(
        make_site: Callable[..., ThreadedSite], data: bytes, tmp_path: Path) -> None:
    site = make_site(strict=True)  # answers 200 with the whole file whatever Range asks
    remote = place(site, "a.dat", data)
    left = len(data) // 3
    (tmp_path / "a.dat.part").write_bytes(b"\0" * left)  # not the file's bytes: overwritten
    async with logged_in(site) as (client, rec):
        record = await get(client, remote, tmp_path)
    assert rec.calls == [(left, 200)]
    assert (tmp_path / "a.dat").read_bytes() == data and record.sha256 == sha(data)


async def test_a_part_longer_than_listed_starts_over(
        site: ThreadedSite, data: bytes, tmp_path: Path) -> None:
    remote = place(site, "a.dat", data)
    (tmp_path / "a.dat.part").write_bytes(b"x" * (len(data) + 5))
    async with logged_in(site) as (client, rec):
        await get(client, remote, tmp_path)
    assert rec.calls == [(0, 200)]
    assert (tmp_path / "a.dat").read_bytes() == data


async def test_a_file_larger_than_listed_is_refused(
        site: ThreadedSite, data: bytes, tmp_path: Path) -> None:
    remote = place(site, "a.dat", data, listed=len(data) - 1000)
    async with logged_in(site) as (client, _):
        with pytest.raises(TransferError, match=f"{len(data)}.*{len(data) - 1000}"):
            await get(client, remote, tmp_path)
    assert not (tmp_path / "a.dat").exists()
    assert not (tmp_path / "a.dat.part").exists()  # never kept to be taken for whole


async def test_a_file_smaller_than_listed_is_never_taken_whole(
        site: ThreadedSite, data: bytes, tmp_path: Path) -> None:
    remote = place(site, "a.dat", data, listed=len(data) + 1000)
    async with logged_in(site) as (client, _):
        with pytest.raises(TransferError, match="listing is wrong"):
            await get(client, remote, tmp_path)
    assert not (tmp_path / "a.dat").exists()


async def test_a_dropped_download_leaves_only_a_part(
        site: ThreadedSite, data: bytes, tmp_path: Path) -> None:
    remote = place(site, "a.dat", data)
    site.running.site.faults.script("cut", "/media/")
    give_up = RetryPolicy(base_s=0.01, cap_s=0.01, give_up_after_s=0.0)
    async with logged_in(site, retry=give_up) as (client, _):
        with pytest.raises(NetworkError):
            await get(client, remote, tmp_path)
    assert not (tmp_path / "a.dat").exists()
    kept = (tmp_path / "a.dat.part").read_bytes()
    assert 0 < len(kept) < len(data) and data.startswith(kept)


async def test_a_full_disk_is_the_error_raised_not_a_group(
        site: ThreadedSite, data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = place(site, "a.dat", data)
    real_write = transfer._Part.write
    batches = 0

    def write(self: transfer._Part, chunks: list[bytes]) -> None:
        nonlocal batches
        batches += 1
        if batches == (2 if len(data) > transfer.WRITE_BATCH_BYTES else 1):
            with local_io(self.path):
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, chunks)

    monkeypatch.setattr(transfer._Part, "write", write)
    async with logged_in(site) as (client, _):
        with pytest.raises(DiskFull, match=r"a\.dat\.part"):
            await get(client, remote, tmp_path)
    assert not (tmp_path / "a.dat").exists()


@pytest.fixture
def gated_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event,
                                                                    threading.Event]]:
    """Writes after the first wait for `release`; `first` is set once one is written."""
    first, release = threading.Event(), threading.Event()
    real_write = transfer._Part.write

    def write(self: transfer._Part, chunks: list[bytes]) -> None:
        if first.is_set():
            assert release.wait(timeout=60)
        real_write(self, chunks)
        first.set()

    monkeypatch.setattr(transfer._Part, "write", write)
    yield first, release
    release.set()


async def test_cancelled_mid_download_keeps_a_part_that_resumes(
        site: ThreadedSite, tmp_path: Path,
        gated_writes: tuple[threading.Event, threading.Event]) -> None:
    # Far more than can be in flight when the first write is held (the batch written,
    # BATCHES_QUEUED queued, one filling, aiohttp's read-ahead), even when a loaded
    # machine lets chunks grow to the read-ahead's size: the cut cannot hold it all.
    data = os.urandom(64 * MiB)
    remote = place(site, "big.dat", data)
    first, release = gated_writes
    async with logged_in(site) as (client, rec):
        async with anyio.create_task_group() as tg:
            tg.start_soon(get, client, remote, tmp_path)
            await anyio.to_thread.run_sync(first.wait)
            tg.cancel_scope.cancel()
            release.set()  # the writer finishes what it was handed, then ends
        assert not (tmp_path / "big.dat").exists()
        kept = (tmp_path / "big.dat.part").stat().st_size
        assert transfer.WRITE_BATCH_BYTES <= kept < len(data)
        record = await get(client, remote, tmp_path)
    assert rec.calls[-1] == (kept, 206)
    assert (tmp_path / "big.dat").read_bytes() == data and record.sha256 == sha(data)


async def test_a_download_holds_a_bounded_number_of_batches(
        site: ThreadedSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        gated_writes: tuple[threading.Event, threading.Event]) -> None:
    data = os.urandom(24 * MiB)
    remote = place(site, "big.dat", data)
    _, release = gated_writes
    queued: list[int] = []
    sizes: list[int] = []
    real_put = transfer._Writer.put

    async def put(self: transfer._Writer, batch: list[bytes]) -> None:
        queued.append(self._queued)
        sizes.append(sum(map(len, batch)))
        if self._queued >= transfer.BATCHES_QUEUED:
            release.set()  # the reader must now wait for room: let the writer go
        await real_put(self, batch)

    monkeypatch.setattr(transfer._Writer, "put", put)
    async with logged_in(site) as (client, _):
        record = await get(client, remote, tmp_path)
    assert max(queued) == transfer.BATCHES_QUEUED  # reached the bound, never beyond
    assert max(sizes) < 2 * transfer.WRITE_BATCH_BYTES
    assert record.sha256 == sha(data)
