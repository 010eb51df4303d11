"""A site's journal: the redo log that makes applying a delta to replicas atomic.

Layout (a file that grows as needed, or a block device of fixed size):

    bytes 0-4095      header slot A      \\ two slots, written alternately; the valid one
    bytes 4096-8191   header slot B      / with the higher generation wins, so a torn
    bytes 8192-...    the delta stream     header write loses at most the newest state

A header is: magic, version, generation, state, cut seq, delta length, crc32.
States: IDLE (nothing applied yet), COMMITTED (the delta at 8192 is complete,
verified and must be applied), APPLIED (cut seq is on the replicas).

Apply protocol: write the delta into the data area and fsync; verify it back;
write COMMITTED and fsync; write the records to the replicas and fsync them;
write APPLIED and fsync. A run that dies after COMMITTED is finished by the next
one (`replay`): records carry absolute data, so applying twice is harmless.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO

from dmrepl import delta, safefile
from dmrepl.errors import DmreplError

MAGIC = b"DMREPLJN"
VERSION = 1
SLOT_BYTES = 4096
DATA_OFFSET = 2 * SLOT_BYTES
COPY_CHUNK = 1 << 20
_HEADER = struct.Struct("<8sIQIqQ")  # magic, version, generation, state, seq, length
_CRC = struct.Struct("<I")


class JournalState(IntEnum):
    IDLE = 0
    COMMITTED = 1
    APPLIED = 2


class JournalError(DmreplError):
    """The journal cannot be used (too small, unreadable, or both header slots invalid)."""


class JournalMissing(JournalError):
    """A journal opened without `create` does not exist."""


MISSING_HINT = (
    "attach the journal device the site's `journal` setting names (or fix the setting); "
    "dmrepl creates no journal but the default one in state_dir"
)


@dataclass(frozen=True)
class JournalHeader:
    generation: int
    state: JournalState
    seq: int  # COMMITTED: the cut being applied; APPLIED: the cut on the replicas
    length: int  # bytes of the delta in the data area

    def encode(self) -> bytes:
        body = _HEADER.pack(MAGIC, VERSION, self.generation, int(self.state), self.seq, self.length)
        return (body + _CRC.pack(zlib.crc32(body))).ljust(SLOT_BYTES, b"\0")


def decode_header(slot: bytes) -> JournalHeader | None:
    """The header in one slot, or None if the slot is empty or torn."""
    body = slot[: _HEADER.size]
    if len(slot) < _HEADER.size + _CRC.size:
        return None
    (crc,) = _CRC.unpack_from(slot, _HEADER.size)
    magic, version, generation, state, seq, length = _HEADER.unpack(body)
    if magic != MAGIC or zlib.crc32(body) != crc or version != VERSION:
        return None
    try:
        return JournalHeader(generation, JournalState(state), seq, length)
    except ValueError:
        return None


EMPTY_HEADER = JournalHeader(0, JournalState.IDLE, 0, 0)  # a journal nothing was written to yet


def read_header_slots(fd: int) -> list[JournalHeader]:
    """The valid headers of the journal open as `fd` (zero, one or both slots)."""
    slots = [decode_header(os.pread(fd, SLOT_BYTES, i * SLOT_BYTES)) for i in (0, 1)]
    return [h for h in slots if h is not None]


class Journal:
    """An open journal file or device; `create=False` never creates one (JournalMissing)."""

    def __init__(self, path: Path, *, create: bool = True):
        self.path = path
        try:
            self.fd = safefile.open_own_or_block_device(path, create=create)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not create:
                raise JournalMissing(
                    f"the journal {path} does not exist", hint=MISSING_HINT
                ) from None
            raise JournalError(
                f"cannot open the journal {path}: {exc.strerror}",
                hint="check the site's `journal` setting",
            ) from None
        except safefile.UnsafePath as exc:
            raise JournalError(f"journal: {exc.message}", hint=exc.hint) from None
        self.is_device = stat.S_ISBLK(os.fstat(self.fd).st_mode)
        self.header = self._read_header()

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_header(self) -> JournalHeader:
        valid = read_header_slots(self.fd)
        if valid:
            return max(valid, key=lambda h: h.generation)
        if any(os.pread(self.fd, SLOT_BYTES, 0)):
            raise JournalError(
                f"{self.path}: neither journal header slot is valid (not a dmrepl journal?)",
                hint="if this really is the site's journal device, zero its first 8 KiB "
                "and re-seed the site: `dmrepl seed GROUP --site SITE`",
            )
        return EMPTY_HEADER

    def _write_header(self, state: JournalState, seq: int, length: int) -> None:
        header = JournalHeader(self.header.generation + 1, state, seq, length)
        os.pwrite(self.fd, header.encode(), (header.generation % 2) * SLOT_BYTES)
        os.fsync(self.fd)
        self.header = header

    def capacity(self) -> int | None:
        """Bytes the data area can hold (None: a file, which grows)."""
        if not self.is_device:
            return None
        return os.lseek(self.fd, 0, os.SEEK_END) - DATA_OFFSET

    def stage(self, source: BinaryIO) -> int:
        """Copy a delta stream into the data area and fsync; returns its length.

        A regular file (a spool delta) is copied by the kernel (sendfile), the
        bytes never passing through Python; any other stream is read in chunks.
        Refused while a committed delta is still unapplied (it would be overwritten).
        """
        if self.header.state is JournalState.COMMITTED:
            raise JournalError(f"{self.path}: a committed delta is not applied yet")
        start = _regular_file_position(source)
        if start is None:
            length = self._copy_chunks(source)
        else:
            length = self._copy_file(source.fileno(), start)
        os.fsync(self.fd)
        return length

    def stage_chunks(
        self,
        chunks: Iterable[bytes],
        *,
        start: int = 0,
        checkpoint: Callable[[int], object] = lambda _length: None,
        every: int = 8 * COPY_CHUNK,
    ) -> int:
        """Write a delta stream arriving in chunks into the data area from byte `start` (what
        an interrupted transfer staged durably before); returns the staged length.

        Every `every` bytes the data is fsynced and `checkpoint(length)` told how much is now
        durable, so a transfer cut off later can resume from there.
        """
        if self.header.state is JournalState.COMMITTED:
            raise JournalError(f"{self.path}: a committed delta is not applied yet")
        length, synced = start, start
        for chunk in chunks:
            self._check_fits(length + len(chunk))
            os.pwrite(self.fd, chunk, DATA_OFFSET + length)
            length += len(chunk)
            if length - synced >= every:
                os.fsync(self.fd)
                checkpoint(length)
                synced = length
        os.fsync(self.fd)
        return length

    def _copy_chunks(self, source: BinaryIO) -> int:
        length = 0
        while chunk := source.read(COPY_CHUNK):
            self._check_fits(length + len(chunk))
            os.pwrite(self.fd, chunk, DATA_OFFSET + length)
            length += len(chunk)
        return length

    def _copy_file(self, source_fd: int, start: int) -> int:
        length = os.fstat(source_fd).st_size - start
        self._check_fits(length)
        os.lseek(self.fd, DATA_OFFSET, os.SEEK_SET)  # sendfile writes at the file position
        done = 0
        while done < length:
            sent = os.sendfile(self.fd, source_fd, start + done, length - done)
            if sent == 0:
                raise JournalError(f"{self.path}: the delta shrank while it was being staged")
            done += sent
        return length

    def _check_fits(self, length: int) -> None:
        capacity = self.capacity()
        if capacity is not None and length > capacity:
            raise JournalError(
                f"{self.path}: the delta does not fit the journal device "
                f"({capacity} bytes of data area)",
                hint="give the site a larger journal device (or a file)",
            )

    def staged(self, length: int) -> BinaryIO:
        """A reader over `length` bytes of the data area."""
        return io.BufferedReader(_Region(self.fd, DATA_OFFSET, length), COPY_CHUNK)

    def commit(
        self, length: int, accept: Callable[[delta.DeltaHeader], object]
    ) -> tuple[delta.DeltaHeader, delta.DeltaSummary]:
        """Verify the staged delta end to end, let `accept` refuse it (by raising), then mark
        it COMMITTED durably."""
        header, summary = self.verify_staged(length)
        accept(header)
        self._write_header(JournalState.COMMITTED, header.seq, length)
        return header, summary

    def verify_staged(self, length: int) -> tuple[delta.DeltaHeader, delta.DeltaSummary]:
        """Read the staged delta end to end; raise CorruptDelta if it fails any check."""
        with self.staged(length) as reader:
            return delta.verify(reader, f"{self.path} (journal)")

    def mark_applied(self, seq: int) -> None:
        self._write_header(JournalState.APPLIED, seq, 0)

    def mark_unknown(self) -> None:
        """The replicas hold no cut (they are about to be overwritten by a seed)."""
        if self.header.state is not JournalState.IDLE:
            self._write_header(JournalState.IDLE, 0, 0)


def _regular_file_position(source: BinaryIO) -> int | None:
    """Where a stream backed by a regular file stands (None: not such a stream)."""
    try:
        fd = source.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    return source.tell()


class _Region(io.RawIOBase):
    """A read-only window [start, start + length) of a file descriptor."""

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        want = min(len(view), self.length - self.pos)
        if want <= 0:
            return 0
        data = os.pread(self.fd, want, self.start + self.pos)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)
