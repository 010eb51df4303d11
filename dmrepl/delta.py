"""The delta stream: one versioned, checksummed format for replication deltas.

Spool files, `dir` sites, site journals and (later) the wire all carry deltas in
this one format (DESIGN.md section 5; byte layout in docs/delta-format.md):

    header   magic "DMREPLDT", version u16, JSON length u32, JSON, crc32 u32
    records  device u16, length u32 (bytes), offset u64 (sectors), crc32 u32, data
    trailer  0xFFFF u16, record count u64, data bytes u64, crc32 u32 of the stream

All integers are little-endian. A record's checksum covers its header fields and
its data; the trailer's checksum covers every byte of the stream before it, so a
lost, repeated or reordered record, or a stream cut short at a record boundary,
is caught even though every record on its own is intact.

Reading is streaming and strict: every check that can fail raises CorruptDelta
naming the byte offset. A consumer must not act on records before the trailer
has verified: either `verify` first and read again, or write the records to a
journal that is only committed once `records` has returned.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Generator, Iterable
from contextlib import suppress
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

from isal.isal_zlib import crc32  # zlib's CRC-32 (same values), ~10x faster with PCLMULQDQ

from dmrepl.errors import DmreplError, ExitCode

FORMAT_VERSION = 1
READABLE_VERSIONS = (1,)
MAGIC = b"DMREPLDT"
SECTOR_BYTES = 512
MAX_RECORD_BYTES = 1 << 20
MAX_HEADER_JSON_BYTES = 16 << 20  # room for the largest device table (65535 devices)
MAX_DEVICES = 0xFFFF  # indices 0..0xFFFE; 0xFFFF marks the trailer
TRAILER_MARK = 0xFFFF

_PREAMBLE = struct.Struct("<8sHI")  # magic, version, JSON length
_U32 = struct.Struct("<I")
_RECORD = struct.Struct("<HIQI")  # device, length, offset, crc
_RECORD_FIELDS = struct.Struct("<HIQ")  # the part of a record header its crc covers
_TRAILER = struct.Struct("<HQQI")  # mark, records, data bytes, stream crc
_TRAILER_FIELDS = struct.Struct("<HQQ")
assert _TRAILER_FIELDS.size == _RECORD.size  # the reader tells them apart by the first field

HEADER_FIXED_BYTES = _PREAMBLE.size + _U32.size  # header bytes besides the JSON
RECORD_HEADER_BYTES = _RECORD.size
TRAILER_BYTES = _TRAILER.size
_JSON_OFFSET = _PREAMBLE.size
_VERSION_OFFSET = len(MAGIC)
_LENGTH_OFFSET = _VERSION_OFFSET + 2

_HINT = "nothing was applied from it; capture or ship the delta again, and check the disk it was on"


class CorruptDelta(DmreplError):
    """A delta failed a check: bad magic, unknown version, checksum, bounds or truncation.

    `offset` is the byte offset in the stream: where the stream ended for a
    truncation, the start of the header, record or trailer whose checksum or
    fields are wrong, or the first byte after the trailer for trailing data.
    """

    exit_code = ExitCode.CORRUPT

    def __init__(
        self,
        source: str,
        offset: int,
        problem: str,
        *,
        message: str | None = None,
        hint: str = _HINT,
        context: str | None = None,
    ):
        super().__init__(
            message or f"{source}: corrupt delta at byte {offset}: {problem}",
            hint=hint,
            context=context,
        )
        self.source = source
        self.offset = offset
        self.problem = problem


def _truncated(source: str, offset: int, where: str) -> CorruptDelta:
    return CorruptDelta(
        source,
        offset,
        f"truncated ({where})",
        message=f"{source}: corrupt delta: truncated at byte {offset} ({where})",
    )


@dataclass(frozen=True)
class DeltaDevice:
    """One device of the group as the delta sees it; records name it by index.

    The records of a device hold every block written in eras base_era ..
    target_era: base_era is the `--written-since` era, target_era the last era
    before cut `seq`. base_era None: the delta holds the whole device.
    """

    name: str
    sectors: int  # device size in 512-byte sectors
    base_era: int | None
    target_era: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"device name must be a non-empty string, not {self.name!r}")
        _check_int("sectors", self.sectors, minimum=1)
        if self.base_era is not None:
            _check_int("base_era", self.base_era)
        _check_int("target_era", self.target_era)


@dataclass(frozen=True)
class HeaderFraming:
    """How a header was laid out in the stream it was read from.

    `size` is its length in bytes; `crc` is the stream checksum after it. Set by
    `read_header` so that `records` can go on checking the same stream.
    """

    size: int
    crc: int


@dataclass(frozen=True)
class DeltaHeader:
    """What a delta brings a replica from and to.

    `seq` is the cut the delta brings a replica to; `base_seq` the cut it applies
    on top of, or None for a full image (a seed).
    """

    group: str
    seq: int
    base_seq: int | None
    devices: tuple[DeltaDevice, ...]
    created: float  # unix time
    framing: HeaderFraming | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.group, str) or not self.group:
            raise ValueError(f"group must be a non-empty string, not {self.group!r}")
        _check_int("seq", self.seq)
        if self.base_seq is not None:
            _check_int("base_seq", self.base_seq)
            if self.base_seq >= self.seq:
                raise ValueError(f"base_seq {self.base_seq} is not before seq {self.seq}")
        if not isinstance(self.devices, tuple) or not all(
            isinstance(d, DeltaDevice) for d in self.devices
        ):
            raise ValueError("devices must be a tuple of DeltaDevice")
        if len(self.devices) > MAX_DEVICES:
            raise ValueError(f"{len(self.devices)} devices; a delta holds at most {MAX_DEVICES}")
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError(f"device names repeat: {names}")
        if (
            isinstance(self.created, bool)
            or not isinstance(self.created, int | float)
            or not math.isfinite(self.created)
        ):
            raise ValueError(f"created must be a finite unix time, not {self.created!r}")

    def index(self, device_name: str) -> int:
        """The index records use for the device called `device_name`."""
        for i, device in enumerate(self.devices):
            if device.name == device_name:
                return i
        raise ValueError(f"device {device_name!r} is not in the delta of group {self.group!r}")


@dataclass(frozen=True)
class Record:
    """`data` goes to sectors [offset, offset + len(data) / 512) of device `device`."""

    device: int
    offset: int  # sectors
    data: bytes | memoryview

    @property
    def sectors(self) -> int:
        return len(self.data) // SECTOR_BYTES

    @property
    def end(self) -> int:
        return self.offset + self.sectors


@dataclass(frozen=True)
class DeltaSummary:
    records: int
    data_bytes: int
    stream_bytes: int  # the whole delta, header and trailer included
    # The trailer's crc32 of the stream: names this exact delta (a journal referencing a
    # spool file pins it). Not compared: two summaries are equal when they count the same.
    stream_crc: int = field(default=0, compare=False)


# CRC-32 arithmetic. A record's checksum and the stream's both cover the record's
# data; computing the CRC over it twice would read every byte twice. Instead the
# data's own CRC is computed once and appended to each prefix's CRC:
#     crc32(A + B) == _shift_crc(crc32(A), len(B)) ^ crc32(B)
# _shift_crc multiplies by x^(8 * len(B)) modulo the CRC-32 polynomial, the
# operation behind zlib's crc32_combine (which Python's zlib does not expose). As
# multiplication by a fixed value is linear over GF(2), it is a table lookup per
# 4 bits of the CRC, with the tables built once per length (lengths are multiples
# of 512 up to 1 MiB, so there are at most 2048 of them). Below _SHIFT_MIN_BYTES
# the second crc32 pass is cheaper than the lookups.

_POLY = 0xEDB88320  # CRC-32 (IEEE 802.3) polynomial, bit-reversed as zlib uses it
_SHIFT_MIN_BYTES = 16 << 10


def _multiply_mod_poly(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial, both in zlib's reflected bit order (x^0 = bit 31)."""
    product = 0
    mask = 1 << 31
    while mask:
        if a & mask:
            product ^= b
        mask >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return product


def _x_powers() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial for k = 0..31 (x^1 is bit 30)."""
    powers = [1 << 30]
    for _ in range(31):
        powers.append(_multiply_mod_poly(powers[-1], powers[-1]))
    return tuple(powers)


_X_2K = _x_powers()


@lru_cache(maxsize=2048)
def _shift_table(length: int) -> tuple[int, ...]:
    """Lookup tables for multiplying a CRC by x^(8 * length): 8 rows of 16, one per nibble."""
    factor = 1 << 31  # x^0
    bits, k = length, 3  # x^(8 * length) = product of x^(2^k) for the set bits of length << 3
    while bits:
        if bits & 1:
            factor = _multiply_mod_poly(_X_2K[k % 32], factor)
        bits >>= 1
        k += 1
    images = [0] * 32  # images[j]: factor times the polynomial whose only term is CRC bit j
    value = factor
    for j in range(31, -1, -1):  # bit 31 is x^0, bit 30 is x^1, ...
        images[j] = value
        value = (value >> 1) ^ _POLY if value & 1 else value >> 1
    table = [0] * 128
    for row in range(8):
        for nibble in range(1, 16):
            low = nibble & -nibble
            table[16 * row + nibble] = (
                table[16 * row + (nibble ^ low)] ^ images[4 * row + low.bit_length() - 1]
            )
    return tuple(table)


def _shift_crc(crc: int, length: int) -> int:
    """The CRC of some data A, extended so that crc32(A + B) is it XOR crc32(B); len(B) = length."""
    t = _shift_table(length)
    return (
        t[crc & 15]
        ^ t[16 + (crc >> 4 & 15)]
        ^ t[32 + (crc >> 8 & 15)]
        ^ t[48 + (crc >> 12 & 15)]
        ^ t[64 + (crc >> 16 & 15)]
        ^ t[80 + (crc >> 20 & 15)]
        ^ t[96 + (crc >> 24 & 15)]
        ^ t[112 + (crc >> 28)]
    )


def _check_int(what: str, value: object, *, minimum: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, not {value!r}")


def _encode_header(header: DeltaHeader) -> bytes:
    doc = {
        "group": header.group,
        "seq": header.seq,
        "base_seq": header.base_seq,
        "created": float(header.created),
        "devices": [
            {
                "name": d.name,
                "sectors": d.sectors,
                "base_era": d.base_era,
                "target_era": d.target_era,
            }
            for d in header.devices
        ],
    }
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    body = text.encode("utf-8")
    if len(body) > MAX_HEADER_JSON_BYTES:
        raise ValueError(f"header JSON is {len(body)} bytes; at most {MAX_HEADER_JSON_BYTES}")
    head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    return head + _U32.pack(crc32(head))


def encoded_size(header: DeltaHeader, extent_bytes: Iterable[int]) -> int:
    """The exact size in bytes of a delta with `header` and extents of these lengths.

    Each extent is one `DeltaWriter.add` call (a length in bytes); the result is
    what `finish()` will report as `stream_bytes`. The header's size depends on
    its values (even on `created`), so pass the header that will be written.
    """
    size = len(_encode_header(header)) + TRAILER_BYTES
    for length in extent_bytes:
        _check_length(length)
        size += length + -(-length // MAX_RECORD_BYTES) * RECORD_HEADER_BYTES
    return size


def _check_length(length: int) -> None:
    if length <= 0 or length % SECTOR_BYTES:
        raise ValueError(f"data length {length} is not a positive multiple of {SECTOR_BYTES}")


class DeltaWriter:
    """Writes one delta to a binary stream: the header now, records, then the trailer.

    Nothing is fsynced; the caller decides. Give it a buffered stream (for many
    small records a buffer of 64 KiB or more halves the time). A writer that
    failed while writing refuses further use, so a half-written delta never gets
    a trailer; a delta without its trailer never verifies.
    """

    def __init__(self, out: BinaryIO, header: DeltaHeader) -> None:
        self._out = out
        self._header = header
        self._sectors = tuple(d.sectors for d in header.devices)
        self._records = 0
        self._data_bytes = 0
        self._stream_bytes = 0
        self._crc = 0  # of every byte written so far
        self._state = "writing"
        head = _encode_header(header)
        self._guarded(self._write, head, crc32(head))

    @property
    def header(self) -> DeltaHeader:
        return self._header

    def add(self, device: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write `data` for sectors starting at `offset` of device index `device`.

        Data longer than MAX_RECORD_BYTES becomes several records. Raises
        ValueError (and writes nothing) for an index, offset or length that the
        header's devices cannot hold.
        """
        if self._state != "writing":
            raise RuntimeError(f"delta writer is {self._state}")
        view = memoryview(data).cast("B")
        length = len(view)
        if isinstance(device, bool) or not isinstance(device, int):
            raise ValueError(f"device index must be an integer, not {device!r}")
        if not 0 <= device < len(self._sectors):
            raise ValueError(
                f"device index {device} out of range: the delta has {len(self._sectors)} devices"
            )
        _check_length(length)
        _check_int("offset", offset)
        end = offset + length // SECTOR_BYTES
        if end > self._sectors[device]:
            name = self._header.devices[device].name
            raise ValueError(
                f"sectors [{offset}, {end}) are beyond the end of device {name!r} "
                f"({self._sectors[device]} sectors)"
            )
        if length <= MAX_RECORD_BYTES:
            self._guarded(self._write_record, device, offset, view)
        else:
            for start in range(0, length, MAX_RECORD_BYTES):
                chunk = view[start : start + MAX_RECORD_BYTES]
                self._guarded(self._write_record, device, offset + start // SECTOR_BYTES, chunk)

    def finish(self) -> DeltaSummary:
        """Write the trailer and flush (no fsync); returns what was written."""
        if self._state != "writing":
            raise RuntimeError(f"delta writer is {self._state}")
        fields = _TRAILER_FIELDS.pack(TRAILER_MARK, self._records, self._data_bytes)
        crc = crc32(fields, self._crc)
        self._guarded(self._write, fields + _U32.pack(crc), crc)
        self._guarded(self._out.flush)
        self._state = "finished"
        return DeltaSummary(self._records, self._data_bytes, self._stream_bytes, crc)

    def _guarded(self, write: Callable[..., None], *args: Any) -> None:
        try:
            write(*args)
        except BaseException:
            self._state = "failed"
            raise

    def _write(self, data: bytes, crc_after: int) -> None:
        _write_all(self._out, data)
        self._crc = crc_after
        self._stream_bytes += len(data)

    def _write_record(self, device: int, offset: int, data: memoryview) -> None:
        length = len(data)
        fields = _RECORD_FIELDS.pack(device, length, offset)
        if length < _SHIFT_MIN_BYTES:
            head = fields + _U32.pack(crc32(data, crc32(fields)))
            stream_crc = crc32(data, crc32(head, self._crc))
        else:  # read the data once, not twice (see _shift_crc)
            data_crc = crc32(data)
            head = fields + _U32.pack(_shift_crc(crc32(fields), length) ^ data_crc)
            stream_crc = _shift_crc(crc32(head, self._crc), length) ^ data_crc
        _write_all(self._out, head)
        _write_all(self._out, data)
        self._crc = stream_crc
        self._stream_bytes += RECORD_HEADER_BYTES + length
        self._records += 1
        self._data_bytes += length


def _write_all(out: BinaryIO, data: bytes | memoryview) -> None:
    # Buffered files write everything or raise; raw (unbuffered) ones may write less.
    written = out.write(data)
    while written is not None and written < len(data):
        data = memoryview(data)[written:]
        written = out.write(data)


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    """Up to `size` bytes; fewer only at the end of the stream."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    got = len(data)
    while got < size:
        more = stream.read(size - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def read_header(stream: BinaryIO, source: str) -> DeltaHeader:
    """Read and check the header at the start of `stream`; leaves it at the first record.

    `source` names the stream in errors (a path or a label such as a site).
    """
    preamble = _read_exact(stream, _PREAMBLE.size)
    if preamble[: len(MAGIC)] != MAGIC[: len(preamble)]:
        raise CorruptDelta(
            source,
            0,
            "not a dmrepl delta",
            message=f"{source}: not a dmrepl delta (it starts with {preamble[:8]!r})",
            hint="nothing was applied from it; check that this is the file or site meant",
        )
    if len(preamble) < _PREAMBLE.size:
        where = "in the magic" if len(preamble) < len(MAGIC) else "in the header"
        raise _truncated(source, len(preamble), where)
    _, version, json_length = _PREAMBLE.unpack(preamble)
    if version not in READABLE_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_VERSIONS)
        raise CorruptDelta(
            source,
            _VERSION_OFFSET,
            f"delta format version {version}; this build reads version {readable}",
            hint="nothing was applied from it; a newer dmrepl wrote it: upgrade dmrepl here "
            "(or the header is damaged, if no newer dmrepl exists)",
        )
    if json_length > MAX_HEADER_JSON_BYTES:
        raise CorruptDelta(
            source,
            _LENGTH_OFFSET,
            f"header length {json_length} is over the limit of {MAX_HEADER_JSON_BYTES}",
        )
    rest = bytes(_read_exact(stream, json_length + _U32.size))  # a FileReader's may be a view
    if len(rest) < json_length + _U32.size:
        raise _truncated(source, _PREAMBLE.size + len(rest), "in the header")
    body = rest[:json_length]
    (stored_crc,) = _U32.unpack_from(rest, json_length)
    crc = crc32(body, crc32(preamble))
    if crc != stored_crc:
        raise CorruptDelta(source, 0, "header checksum mismatch")
    try:
        header = _parse_header_json(body)
    except ValueError as exc:
        raise CorruptDelta(source, _JSON_OFFSET, f"header JSON: {exc}") from None
    except RecursionError:  # deep nesting, even in a key this version ignores
        raise CorruptDelta(source, _JSON_OFFSET, "header JSON: nested too deeply") from None
    framing = HeaderFraming(_PREAMBLE.size + len(rest), crc32(rest[json_length:], crc))
    return DeltaHeader(
        header.group, header.seq, header.base_seq, header.devices, header.created, framing
    )


def _parse_header_json(body: bytes) -> DeltaHeader:
    """The header from its JSON; ValueError (incl. JSON/UTF-8 errors) for any bad shape.

    Keys this version does not know are ignored; a change that older readers must
    not ignore needs a new format version.
    """

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        doc = dict(pairs)
        if len(doc) != len(pairs):
            raise ValueError("a key repeats")
        return doc

    doc = json.loads(
        body.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=no_duplicates
    )
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    devices = _get(doc, "devices", list)
    created = _get(doc, "created", (int, float))
    return DeltaHeader(
        group=_get(doc, "group", str),
        seq=_get(doc, "seq", int),
        base_seq=_get(doc, "base_seq", (int, type(None))),
        created=float(created),
        devices=tuple(_parse_device(d) for d in devices),
    )


def _parse_device(doc: object) -> DeltaDevice:
    if not isinstance(doc, dict):
        raise ValueError(f"a device is not an object: {doc!r}")
    return DeltaDevice(
        name=_get(doc, "name", str),
        sectors=_get(doc, "sectors", int),
        base_era=_get(doc, "base_era", (int, type(None))),
        target_era=_get(doc, "target_era", int),
    )


def _get(doc: dict[str, Any], key: str, types: type | tuple[type, ...]) -> Any:
    if key not in doc:
        raise ValueError(f"{key!r} missing")
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ValueError(f"{key!r} has the wrong type: {value!r}")
    return value


def records(
    stream: BinaryIO, header: DeltaHeader, source: str, *, checksums: bool = True
) -> Generator[Record, None, DeltaSummary]:
    """The records after `read_header(stream, ...)`, each checked; returns the summary.

    Checks every record's checksum, length and bounds, then the trailer's counts
    and stream checksum, and that nothing follows it; raises CorruptDelta with
    the byte offset. Records yielded before the end are NOT yet trustworthy as a
    whole: act on them only once the generator has returned.

    `checksums=False` skips the CRCs (every other check stays): for a second pass
    over bytes this process has just verified and that nobody else writes, such
    as a site's journal under the group lock. The CRC pass costs as much as the copy.
    """
    if header.framing is None:
        raise ValueError("records() needs the header that read_header() returned for this stream")
    return _records(stream, header.devices, header.framing, source, checksums)


def _records(
    stream: BinaryIO,
    devices: tuple[DeltaDevice, ...],
    framing: HeaderFraming,
    source: str,
    checksums: bool,
) -> Generator[Record, None, DeltaSummary]:
    pos = framing.size
    crc = framing.crc
    count = 0
    data_bytes = 0
    while True:
        head = _read_exact(stream, RECORD_HEADER_BYTES)
        if len(head) < RECORD_HEADER_BYTES:
            where = (
                f"in the header of record {count}"
                if head
                else f"where record {count} or the trailer should start"
            )
            raise _truncated(source, pos + len(head), where)
        device, length, offset, stored_crc = _RECORD.unpack(head)
        if device == TRAILER_MARK:
            break
        if not 0 < length <= MAX_RECORD_BYTES or length % SECTOR_BYTES:
            raise CorruptDelta(source, pos, f"record {count} has a bad length {length}")
        data = _read_exact(stream, length)
        if len(data) < length:
            raise _truncated(
                source, pos + RECORD_HEADER_BYTES + len(data), f"in the data of record {count}"
            )
        if not checksums:
            record_crc = next_crc = stored_crc
        elif length < _SHIFT_MIN_BYTES:
            record_crc = crc32(data, crc32(head[: _RECORD_FIELDS.size]))
            next_crc = crc32(data, crc32(head, crc))
        else:  # read the data once, not twice (see _shift_crc)
            data_crc = crc32(data)
            record_crc = _shift_crc(crc32(head[: _RECORD_FIELDS.size]), length) ^ data_crc
            next_crc = _shift_crc(crc32(head, crc), length) ^ data_crc
        if record_crc != stored_crc:
            raise CorruptDelta(source, pos, f"record {count} checksum mismatch")
        if device >= len(devices):
            raise CorruptDelta(
                source, pos, f"record {count} names device {device}; there are {len(devices)}"
            )
        end = offset + length // SECTOR_BYTES
        if end > devices[device].sectors:
            raise CorruptDelta(
                source,
                pos,
                f"record {count} covers sectors [{offset}, {end}) beyond the end of device "
                f"{devices[device].name!r} ({devices[device].sectors} sectors)",
            )
        crc = next_crc
        pos += RECORD_HEADER_BYTES + length
        count += 1
        data_bytes += length
        yield Record(device, offset, data)

    # The first RECORD_HEADER_BYTES of the trailer are its counted fields; its crc follows.
    tail = _read_exact(stream, _U32.size)
    if len(tail) < _U32.size:
        raise _truncated(source, pos + RECORD_HEADER_BYTES + len(tail), "in the trailer")
    _, trailer_records, trailer_bytes, stored_crc = _TRAILER.unpack(head + tail)
    if (trailer_records, trailer_bytes) != (count, data_bytes):
        raise CorruptDelta(
            source,
            pos,
            f"the trailer counts {trailer_records} records of {trailer_bytes} bytes; "
            f"the stream holds {count} records of {data_bytes} bytes",
        )
    if checksums and crc32(head, crc) != stored_crc:
        raise CorruptDelta(source, pos, "stream checksum mismatch")
    pos += TRAILER_BYTES
    if stream.read(1):
        raise CorruptDelta(source, pos, "data after the trailer")
    return DeltaSummary(count, data_bytes, pos, stored_crc)


def verify(stream: BinaryIO, source: str) -> tuple[DeltaHeader, DeltaSummary]:
    """Check a whole delta from its start; raises CorruptDelta, else returns what it holds."""
    header = read_header(stream, source)
    checking = records(stream, header, source)
    while True:
        try:
            next(checking)
        except StopIteration as done:
            summary: DeltaSummary = done.value
            return header, summary


def open_verified(path: Path) -> DeltaHeader:
    """Verify the delta file at `path` and return its header.

    To apply it, open the file again and iterate `records`; those checks run
    again, so a file changed in between is still caught (at its end).
    """
    with path.open("rb") as stream:
        header, _ = verify(stream, str(path))
    return header


class FileReader:
    """A reader of a delta stored at [start, start + length) of an open file, shaped for
    `records`: one system call per record and no copy besides the kernel's.

    A read of a record's data (`DATA_READ_BYTES` up to MAX_RECORD_BYTES) lands in one
    reused page-aligned buffer, returned as a memoryview that is valid only until the
    next read, and brings the next record's header along in the same `preadv`. Smaller
    reads (headers, the trailer) return bytes.
    """

    DATA_READ_BYTES = 4096

    def __init__(self, fd: int, start: int, length: int):
        self.fd, self.start, self.length = fd, start, length
        self.pos = 0  # bytes of the region read from the file (the look-ahead included)
        self._ahead = b""  # read from the file, not yet returned
        self._buffer: mmap.mmap | None = None

    def read(self, size: int = -1) -> bytes | memoryview:
        ahead = self._ahead
        if size < 0:
            size = len(ahead) + self.length - self.pos
        if size <= len(ahead):
            self._ahead = ahead[size:]
            return ahead[:size]
        if not self.DATA_READ_BYTES <= size <= MAX_RECORD_BYTES:
            more = self._pread(size - len(ahead))
            self._ahead = b""
            return ahead + more
        if self._buffer is None:
            self._buffer = mmap.mmap(-1, MAX_RECORD_BYTES + RECORD_HEADER_BYTES)
        view = memoryview(self._buffer)
        view[: len(ahead)] = ahead
        filled = len(ahead) + self._preadv(view[len(ahead) : size + RECORD_HEADER_BYTES])
        self._ahead = bytes(view[size:filled]) if filled > size else b""
        return view[: min(size, filled)]

    def _pread(self, size: int) -> bytes:
        want = min(size, self.length - self.pos)
        data = os.pread(self.fd, want, self.start + self.pos) if want > 0 else b""
        self.pos += len(data)
        return data

    def _preadv(self, into: memoryview) -> int:
        """Fill `into` from the file (less only at the region's end); the bytes read."""
        want = min(len(into), self.length - self.pos)
        done = 0
        while done < want:
            got = os.preadv(self.fd, [into[done:want]], self.start + self.pos)
            if got == 0:
                break
            done += got
            self.pos += got
        return done

    def close(self) -> None:
        if self._buffer is not None:
            with suppress(BufferError):  # a record still refers to it: freed with the record
                self._buffer.close()
            self._buffer = None

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Tee:
    """A reader of `source` that copies everything read through it into `sink` (an archive
    keeps the delta it verifies; an ssh site keeps the header it read to name the delta)."""

    def __init__(self, source: BinaryIO, sink: BinaryIO):
        self.source = source
        self.sink = sink

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        if data:
            self.sink.write(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)
