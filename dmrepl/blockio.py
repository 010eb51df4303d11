"""Bulk data movement between block devices and files: ranges, records, compare-copy.

Plain `pread`/`pwrite` in 1 MiB chunks on file descriptors; callers own the
descriptors and decide when to fsync.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import xxhash

from dmrepl.ranges import Extent

CHUNK_BYTES = 1 << 20
SECTOR = 512
_ZERO_CHUNK = bytes(CHUNK_BYTES)


def size_bytes(fd: int) -> int:
    """The size of an open block device or file."""
    return os.lseek(fd, 0, os.SEEK_END)


class ExtentReader:
    """Reads sector extents of a device in pieces of at most 1 MiB into one reused,
    page-aligned buffer, past the page cache where the device allows it (O_DIRECT).

    A capture reads each block of a `-pit` image once: going through the page cache would
    cost a copy and evict what applications use. A device that refuses direct I/O (or an
    extent not aligned to its logical blocks) is read through the cache instead.
    """

    def __init__(self, path: str):
        self.path = path
        self.direct = True
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self.fd, self.direct = os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
        self._buffer = mmap.mmap(-1, CHUNK_BYTES)

    def pieces(self, extents: Iterable[Extent]) -> Iterator[tuple[int, memoryview]]:
        """(sector offset, data) of each piece; `data` is valid until the next piece."""
        view = memoryview(self._buffer)
        for extent in extents:
            offset = extent.begin * SECTOR
            end = extent.end * SECTOR
            while offset < end:
                want = min(CHUNK_BYTES, end - offset)
                self._read(view[:want], offset)
                yield offset // SECTOR, view[:want]
                offset += want

    def _read(self, into: memoryview, offset: int) -> None:
        done = 0
        while done < len(into):
            try:
                got = os.preadv(self.fd, [into[done:]], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                self._through_cache()
                continue
            if got == 0:
                raise OSError(f"short read at byte {offset}: {done} of {len(into)}")
            done += got

    def _through_cache(self) -> None:
        os.close(self.fd)
        self.fd, self.direct = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC), False

    def close(self) -> None:
        os.close(self.fd)
        with contextlib.suppress(BufferError):  # a piece still refers to it
            self._buffer.close()

    def __enter__(self) -> ExtentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def is_zero(data: bytes | memoryview) -> bool:
    """Whether `data` (at most CHUNK_BYTES) is all zero bytes (one memcmp, not a loop)."""
    return bytes(data) == _ZERO_CHUNK[: len(data)]


class GatherWriter:
    """A write-only stream on a file descriptor for a delta: small writes (record headers)
    wait and go out with the next large one in one `writev`, and large data is written
    from the caller's buffer without being copied (a BufferedWriter copies whatever fits
    its buffer)."""

    SMALL = 64 * 1024

    def __init__(self, fd: int):
        self.fd = fd
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes | memoryview) -> int:
        if len(data) < self.SMALL:
            self._pending.append(bytes(data))
            self._pending_bytes += len(data)
            if self._pending_bytes >= self.SMALL:
                self.flush()
        else:
            self._writev([*self._pending, data])
            self._pending, self._pending_bytes = [], 0
        return len(data)

    def flush(self) -> None:
        if self._pending:
            self._writev(self._pending)
            self._pending, self._pending_bytes = [], 0

    def _writev(self, pieces: Sequence[bytes | memoryview]) -> None:
        views = [memoryview(piece).cast("B") for piece in pieces]
        while views:
            done = os.writev(self.fd, views)
            while views and done >= len(views[0]):
                done -= len(views[0])
                views.pop(0)
            if views and done:
                views[0] = views[0][done:]

    def fileno(self) -> int:
        return self.fd


class DeviceWriter:
    """Writes pieces at sector offsets of a block device, past the page cache where the
    device and the piece allow it (O_DIRECT: a page-aligned buffer, a whole number of the
    device's logical blocks); other pieces, or a device that refuses, go through the cache.
    `fsync` makes both durable. Applying a delta writes each block once: caching it would
    cost a copy, and evict what the host uses."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            self.direct: int | None = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                os.close(self.fd)
                raise
            self.direct = None

    def write_at(self, offset_sectors: int, data: bytes | memoryview) -> None:
        if self.direct is not None and isinstance(data, memoryview):
            try:
                write_at(self.direct, offset_sectors, data)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # not aligned for direct I/O: through the cache
                    raise
        write_at(self.fd, offset_sectors, data)

    def fsync(self) -> None:
        # Both descriptors are the same inode (the block device's): one fsync writes back
        # the cached pieces and flushes the device's cache for the direct ones too.
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        if self.direct is not None:
            os.close(self.direct)


def write_at(fd: int, offset_sectors: int, data: bytes | memoryview) -> None:
    """Write all of `data` at a sector offset (pwrite may write less than asked)."""
    view = memoryview(data)
    position = offset_sectors * SECTOR
    while view:
        done = os.pwrite(fd, view, position)
        view, position = view[done:], position + done


@dataclass
class CopyStats:
    """What a compare-copy did, in bytes."""

    compared: int = 0
    written: int = 0
    equal: int = 0
    zero_skipped: int = 0


def compare_copy(
    source: int,
    target: int,
    length: int,
    *,
    target_zeroed: bool = False,
    progress: Callable[[int], object] | None = None,
) -> CopyStats:
    """Make `target` equal `source` over `length` bytes, writing only chunks that differ.

    Both sides are read chunk by chunk and compared (locally a byte compare is
    the fastest "hash"); with `target_zeroed` the target is known to be zero, so
    the target is not read and all-zero source chunks are skipped.
    """
    stats = CopyStats()
    offset = 0
    while offset < length:
        want = min(CHUNK_BYTES, length - offset)
        data = os.pread(source, want, offset)
        if len(data) != want:
            raise OSError(f"short read of the source at byte {offset}")
        if target_zeroed:
            same = data == _ZERO_CHUNK[:want]
            stats.zero_skipped += want if same else 0
        else:
            same = os.pread(target, want, offset) == data
            stats.equal += want if same else 0
        if not same:
            write_at(target, offset // SECTOR, data)
            stats.written += want
        stats.compared += want
        offset += want
        if progress is not None:
            progress(want)
    return stats


def piece_digests(
    paths: Mapping[str, str], pieces: Iterable[tuple[str, int, int]], *, uncached: bool = False
) -> Iterator[bytes]:
    """The XXH3-64 digest of each piece (device, first sector, sectors) of the devices at
    `paths`, in order. `uncached`: drop each device's page cache first, to hash what is on
    it (a device the kernel wrote below the cache, a mirror leg)."""
    fds: dict[str, int] = {}
    try:
        for device, start, sectors in pieces:
            if device not in fds:
                fds[device] = os.open(paths[device], os.O_RDONLY)
                if uncached:
                    os.posix_fadvise(fds[device], 0, 0, os.POSIX_FADV_DONTNEED)
            yield xxhash.xxh3_64_digest(os.pread(fds[device], sectors * 512, start * 512))
    finally:
        for fd in fds.values():
            os.close(fd)
