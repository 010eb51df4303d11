"""The data path's readers and writers: direct I/O where the file allows it, the page cache
where it does not, and the same bytes either way."""

from __future__ import annotations

import errno
import fcntl
import io
import mmap
import os
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from dmrepl import blockio, delta
from dmrepl.ranges import Extent

MiB = 1 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "image"
    path.write_bytes(os.urandom(3 * MiB))
    return path


def test_an_extent_reader_reads_what_pread_reads(image: Path) -> None:
    extents = [Extent(1, 3), Extent(8, 8 + 2 * MiB // 512 + 1), Extent(6000, 6001)]
    data = image.read_bytes()
    expected = []
    for extent in extents:  # pieces of at most 1 MiB, in order
        for start in range(extent.begin * 512, extent.end * 512, MiB):
            end = min(start + MiB, extent.end * 512)
            expected.append((start // 512, data[start:end]))
    with blockio.ExtentReader(str(image)) as reader:
        got = [(offset, bytes(piece)) for offset, piece in reader.pieces(extents)]
    assert got == expected


def test_an_extent_reader_falls_back_to_the_cache(
    image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_preadv = os.preadv

    def refusing(fd: int, buffers: list[memoryview], offset: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", refusing)
    with blockio.ExtentReader(str(image)) as reader:
        (piece,) = [bytes(p) for _, p in reader.pieces([Extent(0, 1)])]
        assert not reader.direct
    assert piece == image.read_bytes()[:512]


def test_a_short_image_is_an_error(image: Path) -> None:
    with blockio.ExtentReader(str(image)) as reader, pytest.raises(OSError, match="short read"):
        list(reader.pieces([Extent(6143, 6145)]))


def test_a_delta_gathered_into_writev_is_the_delta_a_buffer_writes(tmp_path: Path) -> None:
    header = delta.DeltaHeader("g", 2, 1, (delta.DeltaDevice("d", 8192, 2, 2),), 1.0)
    writes = [(0, os.urandom(512)), (1, os.urandom(4096)), (16, os.urandom(MiB + 4096))]
    writes += [(4000, os.urandom(128 * 1024))]
    buffered = io.BytesIO()
    expected = delta.DeltaWriter(buffered, header)
    for offset, data in writes:
        expected.add(0, offset, data)
    expected.finish()
    path = tmp_path / "gathered.delta"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        writer = delta.DeltaWriter(cast(BinaryIO, blockio.GatherWriter(fd)), header)
        for offset, data in writes:
            writer.add(0, offset, memoryview(data))
        summary = writer.finish()
    finally:
        os.close(fd)
    assert path.read_bytes() == buffered.getvalue()
    assert summary.stream_crc == int.from_bytes(buffered.getvalue()[-4:], "little")


def test_a_device_writer_writes_aligned_and_unaligned_pieces(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(bytes(2 * MiB))
    aligned = mmap.mmap(-1, 8192)  # page-aligned, as the readers' buffers are
    buffer = memoryview(aligned)
    buffer[:] = b"A" * 8192
    writer = blockio.DeviceWriter(str(target))
    try:
        writer.write_at(8, buffer[:8192])  # direct I/O where the file system has it
        writer.write_at(100, b"b" * 512)  # bytes: through the cache
        writer.write_at(200, buffer[1:513])  # not aligned: refused by direct I/O, cached
        writer.fsync()
    finally:
        writer.close()
        buffer.release()
        aligned.close()
    data = target.read_bytes()
    assert data[4096 : 4096 + 8192] == b"A" * 8192
    assert data[51200 : 51200 + 512] == b"b" * 512
    assert data[102400 : 102400 + 512] == b"A" * 512
    assert data.count(0) == len(data) - 8192 - 1024
