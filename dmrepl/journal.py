"""A site's journal: the redo log that makes applying a delta to replicas atomic.

Layout (a file that grows as needed, or a block device of fixed size):

    bytes 0-4095      header slot A      \\ two slots, written alternately; the valid one
    bytes 4096-8191   header slot B      / with the higher generation wins, so a torn
    bytes 8192-...    the delta stream     header write loses at most the newest state

A header is: magic, version, generation, state, cut seq, delta length, and (version 2)
the checksum and file name of a referenced payload, then a crc32 of all of it.
States: IDLE (nothing applied yet), COMMITTED (the delta is complete, verified and
must be applied), APPLIED (cut seq is on the replicas).

A COMMITTED delta is either inline (in the data area at 8192) or, when the header
names a payload, the file of that name beside the journal: a hard link to the spool
file the delta was captured into, so the bytes are written once and no spool
deletion can take them away before they are applied. The header pins the payload's
length and stream checksum (the delta trailer's crc32); a replay verifies the file
end to end against both before applying a byte of it.

Apply protocol: write the delta into the data area (or link the payload and fsync
it and the directory); verify it; write COMMITTED and fsync; write the records to
the replicas and fsync them; write APPLIED and fsync (then unlink the payload).
A run that dies after COMMITTED is finished by the next one (`replay`): records
carry absolute data, so applying twice is harmless.

Version 1 headers (inline deltas only, written before payloads existed) are still
read; every header written now is version 2.
"""

from __future__ import annotations

import errno
import io
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import BinaryIO, cast

from dmrepl import delta, deltafiles, safefile
from dmrepl.errors import DmreplError

MAGIC = b"DMREPLJN"
VERSION = 2
READABLE_VERSIONS = (1, 2)
SLOT_BYTES = 4096
DATA_OFFSET = 2 * SLOT_BYTES
COPY_CHUNK = 1 << 20
_HEADER = struct.Struct("<8sIQIqQ")  # magic, version, generation, state, seq, length
_PAYLOAD = struct.Struct("<IH")  # version 2: the payload's stream crc, its name's length
_CRC = struct.Struct("<I")
MAX_PAYLOAD_NAME = 255


class JournalState(IntEnum):
    IDLE = 0
    COMMITTED = 1
    APPLIED = 2


class JournalError(DmreplError):
    """The journal cannot be used (too small, unreadable, or both header slots invalid)."""


class JournalMissing(JournalError):
    """A journal opened without `create` does not exist."""


PAYLOAD_HINT = (
    "nothing of it was applied by this run; the replicas may be between two cuts: "
    "re-seed the site (`dmrepl seed GROUP --site SITE`, compare mode writes only what differs)"
)
# A hard link cannot be made here: another file system, or one without links.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP})

MISSING_HINT = (
    "attach the journal device the site's `journal` setting names (or fix the setting); "
    "dmrepl creates no journal but the default one in state_dir"
)


@dataclass(frozen=True)
class Payload:
    """A committed delta held in a file beside the journal instead of in its data area."""

    name: str  # a file name in the journal's directory
    crc: int  # the delta's stream checksum (its trailer's crc32)


@dataclass(frozen=True)
class JournalHeader:
    generation: int
    state: JournalState
    seq: int  # COMMITTED: the cut being applied; APPLIED: the cut on the replicas
    length: int  # bytes of the committed delta (in the data area, or the payload's size)
    payload: Payload | None = None  # COMMITTED only: the delta is this file

    def encode(self) -> bytes:
        name = b"" if self.payload is None else self.payload.name.encode()
        crc = 0 if self.payload is None else self.payload.crc
        body = _HEADER.pack(
            MAGIC, VERSION, self.generation, int(self.state), self.seq, self.length
        ) + _PAYLOAD.pack(crc, len(name)) + name  # fmt: skip
        return (body + _CRC.pack(zlib.crc32(body))).ljust(SLOT_BYTES, b"\0")


def decode_header(slot: bytes) -> JournalHeader | None:
    """The header in one slot (version 1 or 2), or None if the slot is empty or torn."""
    if len(slot) < _HEADER.size + _CRC.size:
        return None
    magic, version, generation, state, seq, length = _HEADER.unpack_from(slot)
    if magic != MAGIC or version not in READABLE_VERSIONS:
        return None
    payload = None
    end = _HEADER.size
    if version >= 2:
        if len(slot) < end + _PAYLOAD.size + _CRC.size:
            return None
        crc, size = _PAYLOAD.unpack_from(slot, end)
        end += _PAYLOAD.size + size
        if size > MAX_PAYLOAD_NAME or len(slot) < end + _CRC.size:
            return None
        if size:
            try:
                payload = Payload(slot[end - size : end].decode(), crc)
            except UnicodeDecodeError:
                return None
    (stored,) = _CRC.unpack_from(slot, end)
    if zlib.crc32(slot[:end]) != stored:
        return None
    if payload is not None and (not _plain_name(payload.name) or state != JournalState.COMMITTED):
        return None
    try:
        return JournalHeader(generation, JournalState(state), seq, length, payload)
    except ValueError:
        return None


def _plain_name(name: str) -> bool:
    """A file name without a directory part (a payload lives beside its journal)."""
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


EMPTY_HEADER = JournalHeader(0, JournalState.IDLE, 0, 0)  # a journal nothing was written to yet


def payload_path(journal: Path) -> Path:
    """Where a journal's payload is linked: beside it, named after it."""
    return journal.with_name(journal.stem + ".payload")


def read_header_slots(fd: int) -> list[JournalHeader]:
    """The valid headers of the journal open as `fd` (zero, one or both slots)."""
    slots = [decode_header(os.pread(fd, SLOT_BYTES, i * SLOT_BYTES)) for i in (0, 1)]
    return [h for h in slots if h is not None]


class Journal:
    """An open journal file or device; `create=False` never creates one (JournalMissing).

    `payloads`: the journal may link a delta file beside it as its payload (only a journal
    in dmrepl's own directory: beside a configured one nothing is dmrepl's to write)."""

    def __init__(self, path: Path, *, create: bool = True, payloads: bool = False):
        self.path = path
        self.payloads = payloads
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

    def _write_header(
        self, state: JournalState, seq: int, length: int, payload: Payload | None = None
    ) -> None:
        header = JournalHeader(self.header.generation + 1, state, seq, length, payload)
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
        return cast(BinaryIO, delta.FileReader(self.fd, DATA_OFFSET, length))

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
        self.drop_payload()

    def mark_unknown(self) -> None:
        """The replicas hold no cut (they are about to be overwritten by a seed)."""
        if self.header.state is not JournalState.IDLE:
            self._write_header(JournalState.IDLE, 0, 0)
        self.drop_payload()

    # -- a committed delta held in a payload file instead of the data area

    @property
    def payload_path(self) -> Path:
        return payload_path(self.path)

    def drop_payload(self) -> None:
        """Unlink the payload unless a commit names it (one a run killed before its commit,
        or after APPLIED, left behind)."""
        if self.payloads and self.header.payload is None:
            self.payload_path.unlink(missing_ok=True)

    def link_payload(self, source: Path) -> bool:
        """Hard-link the delta file `source` as the payload (replacing a stale one); False
        when this journal takes no payloads, or the file system cannot link it there (the
        delta must then be copied in)."""
        if self.header.state is JournalState.COMMITTED:
            raise JournalError(f"{self.path}: a committed delta is not applied yet")
        if not self.payloads:
            return False
        self.payload_path.unlink(missing_ok=True)
        try:
            os.link(source, self.payload_path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in _NO_LINK:
                return False
            raise
        return True

    def commit_payload(self, seq: int, length: int, crc: int) -> None:
        """Mark the linked payload COMMITTED: the delta of cut `seq`, `length` bytes, whose
        trailer checksum is `crc`.

        The payload's bytes and its directory entry are made durable first, so that after
        a crash a COMMITTED header never names a file that was lost or is incomplete."""
        fd = self._open_payload(
            length, hint="the spool file changed while it was delivered; the next sync sends it"
        )
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        deltafiles.fsync_directory(self.payload_path.parent)
        self._write_header(
            JournalState.COMMITTED, seq, length, Payload(self.payload_path.name, crc)
        )

    @contextmanager
    def committed(self) -> Iterator[BinaryIO]:
        """A reader over the committed delta, inline or in its payload; JournalError if the
        payload is gone or is not the length the journal recorded."""
        header = self.header
        if header.payload is None:
            with self.staged(header.length) as reader:
                yield reader
            return
        fd = self._open_payload(header.length)
        try:
            os.posix_fadvise(fd, 0, header.length, os.POSIX_FADV_SEQUENTIAL)
            with delta.FileReader(fd, 0, header.length) as reader:
                yield cast(BinaryIO, reader)
        finally:
            os.close(fd)

    def committed_source(self) -> str:
        """The committed delta's name in messages."""
        if self.header.payload is None:
            return f"{self.path} (journal)"
        return f"{self.payload_path} (the journal's payload)"

    def verify_committed(self) -> tuple[delta.DeltaHeader, delta.DeltaSummary]:
        """Read the committed delta end to end, and check that a payload is the very delta
        the journal committed; raise CorruptDelta (or JournalError) if not."""
        source = self.committed_source()
        with self.committed() as reader:
            header, summary = delta.verify(reader, source)
        payload = self.header.payload
        if payload is not None and summary.stream_crc != payload.crc:
            raise delta.CorruptDelta(
                source,
                summary.stream_bytes - delta.TRAILER_BYTES,
                f"it is not the delta the journal committed (stream checksum "
                f"{summary.stream_crc:08x}, committed {payload.crc:08x})",
            )
        return header, summary

    def _open_payload(self, length: int, hint: str = PAYLOAD_HINT) -> int:
        path = self.payload_path
        try:
            # O_NONBLOCK: something else planted there (a FIFO) must not hang the cycle
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise JournalError(
                f"{self.path}: the committed delta's payload {path} is missing",
                hint=PAYLOAD_HINT,
            ) from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise JournalError(f"{self.path}: the payload {path} is not a file", hint=hint)
        size = info.st_size
        if size != length:
            os.close(fd)
            raise JournalError(
                f"{self.path}: the committed delta's payload {path} is {size} bytes, "
                f"the journal committed {length}",
                hint=hint,
            )
        return fd


def _regular_file_position(source: BinaryIO) -> int | None:
    """Where a stream backed by a regular file stands (None: not such a stream)."""
    try:
        fd = source.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    return source.tell()
