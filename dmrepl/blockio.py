"""Bulk data movement between block devices and files: ranges, records, compare-copy.

Plain `pread`/`pwrite` in 1 MiB chunks on file descriptors; callers own the
descriptors and decide when to fsync.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import xxhash

from dmrepl.ranges import Extent

CHUNK_BYTES = 1 << 20
SECTOR = 512
_ZERO_CHUNK = bytes(CHUNK_BYTES)


def size_bytes(fd: int) -> int:
    """The size of an open block device or file."""
    return os.lseek(fd, 0, os.SEEK_END)


def read_extents(fd: int, extents: Iterable[Extent]) -> Iterator[tuple[int, bytes]]:
    """(sector offset, data) pieces of at most 1 MiB covering sector `extents`."""
    for extent in extents:
        offset = extent.begin * SECTOR
        end = extent.end * SECTOR
        while offset < end:
            want = min(CHUNK_BYTES, end - offset)
            data = os.pread(fd, want, offset)
            if len(data) != want:
                raise OSError(f"short read at byte {offset}: {len(data)} of {want}")
            yield offset // SECTOR, data
            offset += want


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
