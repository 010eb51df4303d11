"""Reading a held dm-era metadata snapshot from the device: the I/O around `dmrepl.erameta`.

The metadata is read with O_DIRECT (the kernel writes it through its own
buffers, so our page cache could hold stale blocks), sorted by block number and
fetched in contiguous runs of up to `RUN_BLOCKS` blocks. Memory stays bounded:
one run buffer, the list of array-block locations, and the pieces of the result
bitmap that hold a changed era block (`erameta.BlockSet`).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from types import TracebackType

from dmrepl import erameta
from dmrepl.erameta import BLOCK_SIZE, MetadataDoubt
from dmrepl.ranges import Extent

RUN_BLOCKS = 256  # 1 MiB a read


class MetadataDevice:
    """Blocks of a metadata device (or image file), read past the page cache."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:  # a file system without O_DIRECT (tmpfs): drop its cache instead
            self.fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.buffer = mmap.mmap(-1, RUN_BLOCKS * BLOCK_SIZE)  # page aligned, as O_DIRECT needs
        self.reads = 0  # system calls made, for tests and benchmarks

    def __enter__(self) -> MetadataDevice:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        os.close(self.fd)
        self.buffer.close()

    def _read_run(self, first: int, count: int) -> memoryview:
        """Blocks first .. first + count - 1 (count <= RUN_BLOCKS), in the shared buffer."""
        if first < 0 or (first + count) * BLOCK_SIZE > self.size:
            raise MetadataDoubt(f"block {first + count - 1} is past the end of {self.path}")
        view = memoryview(self.buffer)[: count * BLOCK_SIZE]
        got = os.preadv(self.fd, [view], first * BLOCK_SIZE)
        self.reads += 1
        if got != count * BLOCK_SIZE:
            raise MetadataDoubt(f"short read of {self.path} at block {first}")
        return view

    def read(self, location: int) -> bytes:
        """One metadata block."""
        return bytes(self._read_run(location, 1))

    def read_many(self, locations: list[int]) -> Iterator[tuple[int, bytes]]:
        """(location, block) for each of `locations`, in block order, read in contiguous runs."""
        ordered = sorted(locations)
        start = 0
        while start < len(ordered):
            end = start + 1
            while (
                end < len(ordered)
                and end - start < RUN_BLOCKS
                and ordered[end] == ordered[end - 1] + 1
            ):
                end += 1
            first = ordered[start]
            view = self._read_run(first, end - start)
            for offset in range(end - start):
                yield first + offset, bytes(view[offset * BLOCK_SIZE : (offset + 1) * BLOCK_SIZE])
            start = end


def snapshot_superblock(device: MetadataDevice) -> erameta.Superblock:
    """The held snapshot's superblock, found through the live one's `metadata_snap`."""
    live = erameta.parse_superblock(device.read(0), 0)
    if not live.metadata_snap:
        raise MetadataDoubt("no metadata snapshot is held")
    return erameta.parse_superblock(device.read(live.metadata_snap), live.metadata_snap)


def written_since(path: str, era: int) -> list[Extent]:
    """Era-block extents written in era `era` or later, read from the snapshot held on `path`.

    Raises `MetadataDoubt` when anything is not as expected (no snapshot, a bad
    checksum, a shape the reader does not know) and `OSError` when reading fails.
    """
    with MetadataDevice(path) as device:
        sb = snapshot_superblock(device)
        return erameta.written_since(sb, device.read, device.read_many, era).extents()
