"""The delta stream format: round trips, writer bounds, and detection of every damage."""

from __future__ import annotations

import io
import json
import random
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from dmrepl.delta import (
    FORMAT_VERSION,
    MAX_RECORD_BYTES,
    RECORD_HEADER_BYTES,
    TRAILER_BYTES,
    CorruptDelta,
    DeltaDevice,
    DeltaHeader,
    DeltaSummary,
    DeltaWriter,
    Record,
    encoded_size,
    open_verified,
    read_header,
    records,
    verify,
)
from dmrepl.errors import ExitCode

MiB = 1 << 20
Extent = tuple[int, int, bytes]  # device index, offset in sectors, data


def make_header(
    *, base_seq: int | None = 4, sectors: tuple[int, ...] = (8192, 4096, 1 << 21)
) -> DeltaHeader:
    devices = tuple(
        DeltaDevice(
            name=f"dev{i}",
            sectors=size,
            base_era=None if base_seq is None else 10 + i,
            target_era=20 + i,
        )
        for i, size in enumerate(sectors)
    )
    return DeltaHeader("group-a", seq=5, base_seq=base_seq, devices=devices, created=1.7e9 + 0.25)


def pattern(length: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(length)


def write(header: DeltaHeader, extents: Iterable[Extent]) -> tuple[bytes, DeltaSummary]:
    out = io.BytesIO()
    writer = DeltaWriter(out, header)
    for device, offset, data in extents:
        writer.add(device, offset, data)
    summary = writer.finish()
    return out.getvalue(), summary


def read_all(
    blob: bytes, source: str = "test", *, checksums: bool = True
) -> tuple[DeltaHeader, list[Record], DeltaSummary]:
    stream = io.BytesIO(blob)
    header = read_header(stream, source)
    found: list[Record] = []
    reading = records(stream, header, source, checksums=checksums)
    while True:
        try:
            found.append(next(reading))
        except StopIteration as done:
            return header, found, done.value


def reference_decode(blob: bytes) -> tuple[dict[str, Any], list[Extent], tuple[int, int]]:
    """An independent decoder written from docs/delta-format.md with plain zlib.crc32."""
    assert blob[:8] == b"DMREPLDT"
    version, json_length = struct.unpack_from("<HI", blob, 8)
    assert version == 1
    doc = json.loads(blob[14 : 14 + json_length])
    assert struct.unpack_from("<I", blob, 14 + json_length)[0] == zlib.crc32(
        blob[: 14 + json_length]
    )
    pos = 18 + json_length
    found: list[Extent] = []
    while struct.unpack_from("<H", blob, pos)[0] != 0xFFFF:
        device, length, offset, crc = struct.unpack_from("<HIQI", blob, pos)
        data = blob[pos + 18 : pos + 18 + length]
        assert len(data) == length
        assert crc == zlib.crc32(blob[pos : pos + 14] + data)
        found.append((device, offset, data))
        pos += 18 + length
    _, count, data_bytes, crc = struct.unpack_from("<HQQI", blob, pos)
    assert crc == zlib.crc32(blob[: pos + 18])
    assert pos + 22 == len(blob)
    return doc, found, (count, data_bytes)


def corrupt(blob: bytes) -> CorruptDelta:
    with pytest.raises(CorruptDelta) as caught:
        verify(io.BytesIO(blob), "test")
    return caught.value


def flipped(blob: bytes, position: int, mask: int = 0xFF) -> bytes:
    damaged = bytearray(blob)
    damaged[position] ^= mask
    return bytes(damaged)


def json_length(blob: bytes) -> int:
    length: int = struct.unpack_from("<I", blob, 10)[0]
    return length


def header_bytes(blob: bytes) -> int:
    return 18 + json_length(blob)


def record_starts(blob: bytes) -> list[int]:
    """Byte offsets of every record, then of the trailer."""
    pos = header_bytes(blob)
    starts = []
    while True:
        starts.append(pos)
        device, length = struct.unpack_from("<HI", blob, pos)
        if device == 0xFFFF:
            return starts
        pos += RECORD_HEADER_BYTES + length


# A delta with records on several devices, a record of each crc path (below and
# above 16 KiB), and more than 600 KiB after the first record so that a damaged
# length in the first record header still finds data to read.
FIRST = (0, 0, pattern(4096, 1))
MIXED: list[Extent] = [
    FIRST,
    (1, 8, pattern(512, 2)),
    (2, 2048, pattern(64 << 10, 3)),
    (0, 100, pattern(3 * 512, 4)),
    (2, 4096, pattern(640 << 10, 5)),
    (1, 4000, pattern(96 * 512, 6)),
]


@pytest.fixture(scope="module")
def mixed() -> bytes:
    blob, _ = write(make_header(), MIXED)
    return blob


# --- round trips ---------------------------------------------------------------------------


def test_round_trip_several_devices(mixed: bytes) -> None:
    header = make_header()
    blob, summary = write(header, MIXED)
    assert blob == mixed
    read, found, read_summary = read_all(blob)
    assert read == header
    assert [(r.device, r.offset, bytes(r.data)) for r in found] == MIXED
    assert (
        summary
        == read_summary
        == DeltaSummary(len(MIXED), sum(len(d) for *_, d in MIXED), len(blob))
    )
    assert encoded_size(header, [len(d) for *_, d in MIXED]) == len(blob)
    assert verify(io.BytesIO(blob), "test") == (header, summary)


def test_writer_output_matches_the_documented_layout(mixed: bytes) -> None:
    doc, found, counts = reference_decode(mixed)
    assert doc == {
        "group": "group-a",
        "seq": 5,
        "base_seq": 4,
        "created": 1.7e9 + 0.25,
        "devices": [
            {"name": "dev0", "sectors": 8192, "base_era": 10, "target_era": 20},
            {"name": "dev1", "sectors": 4096, "base_era": 11, "target_era": 21},
            {"name": "dev2", "sectors": 1 << 21, "base_era": 12, "target_era": 22},
        ],
    }
    assert found == MIXED
    assert counts == (len(MIXED), sum(len(d) for *_, d in MIXED))


def test_data_over_one_mib_is_split_into_records() -> None:
    header = make_header()
    data = pattern(2 * MiB + 3 * 512, 7)
    blob, summary = write(header, [(2, 16, data), (2, 50_000, pattern(MiB, 8))])
    _, found, _ = read_all(blob)
    assert [(r.device, r.offset, len(r.data)) for r in found] == [
        (2, 16, MiB),
        (2, 16 + 2048, MiB),
        (2, 16 + 4096, 3 * 512),
        (2, 50_000, MiB),  # exactly MAX_RECORD_BYTES stays one record
    ]
    assert b"".join(r.data for r in found[:3]) == data
    assert found[1].sectors == 2048 and found[1].end == 16 + 4096
    assert summary.records == 4
    assert encoded_size(header, [len(data), MiB]) == len(blob)
    reference_decode(blob)


def test_empty_delta() -> None:
    header = make_header()
    blob, summary = write(header, [])
    assert summary == DeltaSummary(0, 0, len(blob))
    assert len(blob) == header_bytes(blob) + TRAILER_BYTES == encoded_size(header, [])
    assert read_all(blob)[1:] == ([], summary)


def test_seed_delta_without_base() -> None:
    header = make_header(base_seq=None)
    assert all(d.base_era is None for d in header.devices)
    blob, _ = write(header, [(0, 0, pattern(8192 * 512, 9))])  # the whole of dev0
    read, found, summary = read_all(blob)
    assert read.base_seq is None and read == header
    assert [(r.device, r.offset, r.sectors) for r in found] == [
        (0, 0, 2048),
        (0, 2048, 2048),
        (0, 4096, 2048),
        (0, 6144, 2048),
    ]
    assert summary.data_bytes == 8192 * 512


def test_writer_accepts_memoryviews_and_bytearrays() -> None:
    source = bytearray(pattern(3 * MiB, 10))
    blob, _ = write(
        make_header(), [(2, 0, memoryview(source)[512 : 512 + 2 * MiB]), (0, 8, bytearray(1024))]
    )
    _, found, _ = read_all(blob)
    assert b"".join(r.data for r in found[:2]) == source[512 : 512 + 2 * MiB]
    assert found[2].data == bytes(1024)


class Trickle(io.RawIOBase):
    """A raw stream that moves at most 1000 bytes per call, as pipes and sockets may."""

    def __init__(self, data: bytes = b"") -> None:
        self.buffer = bytearray(data)
        self.pos = 0

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        part = bytes(memoryview(data)[:1000])
        self.buffer += part
        return len(part)

    def readinto(self, target: Any) -> int:
        part = self.buffer[self.pos : self.pos + min(1000, len(target))]
        memoryview(target)[: len(part)] = part
        self.pos += len(part)
        return len(part)


def test_short_writes_and_reads_are_completed(mixed: bytes) -> None:
    out = Trickle()
    writer = DeltaWriter(out, make_header())  # type: ignore[arg-type]
    for extent in MIXED:
        writer.add(*extent)
    writer.finish()
    assert bytes(out.buffer) == mixed
    _, summary = verify(Trickle(mixed), "pipe")  # type: ignore[arg-type]
    assert summary.stream_bytes == len(mixed)


def test_file_round_trip_and_open_verified(tmp_path: Path, mixed: bytes) -> None:
    path = tmp_path / "5.delta"
    with path.open("wb") as out:
        writer = DeltaWriter(out, make_header())
        for extent in MIXED:
            writer.add(*extent)
        writer.finish()
    assert path.read_bytes() == mixed
    assert open_verified(path) == make_header()
    path.write_bytes(flipped(mixed, len(mixed) - 100))
    with pytest.raises(CorruptDelta) as caught:
        open_verified(path)
    assert caught.value.source == str(path)
    assert str(caught.value).startswith(f"{path}: corrupt delta at byte ")


# --- header and writer checks -------------------------------------------------------------


def test_header_index_and_equality() -> None:
    header = make_header()
    assert header.index("dev2") == 2
    with pytest.raises(ValueError, match="not in the delta"):
        header.index("nope")
    blob, _ = write(header, [])
    read = read_header(io.BytesIO(blob), "test")
    assert read == header and read.framing is not None and header.framing is None


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"group": ""}, "group"),
        ({"seq": -1}, "seq"),
        ({"base_seq": 5}, "not before seq"),
        ({"base_seq": True}, "base_seq"),
        ({"created": float("nan")}, "created"),
        ({"devices": (DeltaDevice("a", 8, None, 1), DeltaDevice("a", 8, None, 1))}, "repeat"),
        ({"devices": [DeltaDevice("a", 8, None, 1)]}, "tuple"),
    ],
)
def test_header_rejects_bad_values(change: dict[str, Any], problem: str) -> None:
    values: dict[str, Any] = {"group": "g", "seq": 5, "base_seq": 4, "devices": (), "created": 0.0}
    with pytest.raises(ValueError, match=problem):
        DeltaHeader(**(values | change))


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        (("", 8, None, 1), "name"),
        (("a", 0, None, 1), "sectors"),
        (("a", 8, -1, 1), "base_era"),
        (("a", 8, None, 1.5), "target_era"),
    ],
)
def test_device_rejects_bad_values(values: tuple[Any, ...], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        DeltaDevice(*values)


@pytest.mark.parametrize(
    ("device", "offset", "length", "problem"),
    [
        (3, 0, 512, "out of range"),
        (-1, 0, 512, "out of range"),
        (True, 0, 512, "integer"),
        (0, -8, 512, "offset"),
        (0, 0, 0, "positive multiple of 512"),
        (0, 0, 511, "positive multiple of 512"),
        (0, 0, 1000, "positive multiple of 512"),
        (0, 8191, 1024, "beyond the end of device 'dev0'"),
        (1, 0, 4097 * 512, "beyond the end of device 'dev1'"),
    ],
)
def test_writer_rejects_out_of_bounds(device: Any, offset: int, length: int, problem: str) -> None:
    out = io.BytesIO()
    writer = DeltaWriter(out, make_header())
    before = out.getvalue()
    with pytest.raises(ValueError, match=problem):
        writer.add(device, offset, bytes(length))
    assert out.getvalue() == before  # nothing written
    writer.add(0, 8191, bytes(512))  # the last sector: still usable afterwards
    writer.finish()
    assert read_all(out.getvalue())[2].records == 1


def test_writer_is_closed_after_finish() -> None:
    writer = DeltaWriter(io.BytesIO(), make_header())
    writer.finish()
    with pytest.raises(RuntimeError, match="finished"):
        writer.add(0, 0, bytes(512))
    with pytest.raises(RuntimeError, match="finished"):
        writer.finish()


class FailingStream(io.BytesIO):
    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def write(self, data: Any) -> int:
        if self.tell() + len(memoryview(data).cast("B")) > self.fail_after:
            raise OSError(28, "No space left on device")
        return super().write(data)


def test_writer_that_failed_refuses_to_finish() -> None:
    out = FailingStream(fail_after=3000)
    writer = DeltaWriter(out, make_header())
    with pytest.raises(OSError, match="No space"):
        writer.add(0, 0, bytes(4096))
    with pytest.raises(RuntimeError, match="failed"):
        writer.finish()
    assert isinstance(corrupt(out.getvalue()), CorruptDelta)


def test_encoded_size_rejects_bad_lengths() -> None:
    with pytest.raises(ValueError, match="multiple of 512"):
        encoded_size(make_header(), [512, 100])


# --- damage ---------------------------------------------------------------------------------


def test_corrupt_delta_error_shape(mixed: bytes) -> None:
    error = corrupt(flipped(mixed, len(mixed) - 1))
    assert error.exit_code == ExitCode.CORRUPT == 16
    assert error.source == "test"
    assert error.hint is not None and error.hint.startswith("nothing was applied from it; ")


def test_wrong_magic() -> None:
    for blob in (b"PK\x03\x04" + bytes(100), b"DMREPLDX" + bytes(100), b"hello"):
        error = corrupt(blob)
        assert error.offset == 0
        assert "not a dmrepl delta" in str(error)


def test_future_version(mixed: bytes) -> None:
    length = json_length(mixed)
    head = bytearray(mixed[: 14 + length])
    struct.pack_into("<H", head, 8, FORMAT_VERSION + 1)
    blob = bytes(head) + struct.pack("<I", zlib.crc32(head)) + mixed[18 + length :]
    error = corrupt(blob)
    assert error.offset == 8
    assert "version 2; this build reads version 1" in str(error)
    assert error.hint is not None and "upgrade" in error.hint


def test_damaged_header(mixed: bytes) -> None:
    length = json_length(mixed)
    for position in range(header_bytes(mixed)):
        for mask in (0x01, 0x80, 0xFF):
            error = corrupt(flipped(mixed, position, mask))
            message = str(error)
            if position < 8:
                assert (error.offset, "not a dmrepl delta") == (0, error.problem), position
            elif position < 10:
                assert error.offset == 8 and "version" in message, position
            elif position < 14:  # the JSON length: wrong checksum, over the limit or truncated
                assert (
                    (error.offset == 0 and "header checksum mismatch" in message)
                    or (error.offset == 10 and "over the limit" in message)
                    or (error.offset == len(mixed) and "truncated" in message)
                ), (position, message)
            else:
                assert error.offset == 0, (position, message)
                assert "header checksum mismatch" in message
    assert length > 100  # the JSON was covered


def test_damaged_record_header(mixed: bytes) -> None:
    start = header_bytes(mixed)
    for position in range(start, start + RECORD_HEADER_BYTES):
        for bit in range(8):
            error = corrupt(flipped(mixed, position, 1 << bit))
            assert error.offset == start, (position, bit, str(error))
            assert "record 0 " in str(error)


@pytest.mark.parametrize("record", range(len(MIXED)))
def test_damaged_record_data(mixed: bytes, record: int) -> None:
    start = record_starts(mixed)[record]
    length = len(MIXED[record][2])
    for position in (0, length // 2, length - 1):
        error = corrupt(flipped(mixed, start + RECORD_HEADER_BYTES + position, 0x10))
        assert error.offset == start
        assert (
            str(error) == f"test: corrupt delta at byte {start}: record {record} checksum mismatch"
        )


def test_damaged_trailer(mixed: bytes) -> None:
    start = len(mixed) - TRAILER_BYTES
    assert record_starts(mixed)[-1] == start
    for position in range(start, len(mixed)):
        for mask in (0x01, 0x40, 0xFF):
            error = corrupt(flipped(mixed, position, mask))
            assert error.offset == start, (position, mask, str(error))


def test_swapped_records_are_caught_by_the_stream_checksum(mixed: bytes) -> None:
    starts = record_starts(mixed)
    first, second, third = (mixed[starts[i] : starts[i + 1]] for i in range(3))
    blob = mixed[: starts[0]] + second + first + third + mixed[starts[3] :]
    error = corrupt(blob)
    assert error.offset == len(mixed) - TRAILER_BYTES
    assert "stream checksum mismatch" in str(error)


def test_dropped_record_is_caught_by_the_trailer_counts(mixed: bytes) -> None:
    starts = record_starts(mixed)
    blob = mixed[: starts[1]] + mixed[starts[2] :]
    error = corrupt(blob)
    assert "the trailer counts 6 records" in str(error)
    assert error.offset == len(blob) - TRAILER_BYTES


def test_truncated_at_every_offset() -> None:
    blob, _ = write(
        make_header(),
        [(0, 0, pattern(1024, 11)), (1, 64, pattern(512, 12)), (0, 9, pattern(2048, 13))],
    )
    for end in range(len(blob)):
        error = corrupt(blob[:end])
        assert error.offset == end
        assert f"truncated at byte {end} " in str(error), str(error)


def test_truncated_inside_large_records(mixed: bytes) -> None:
    for start in record_starts(mixed):
        for end in (
            start,
            start + 1,
            start + RECORD_HEADER_BYTES,
            start + RECORD_HEADER_BYTES + 70_000,
        ):
            if end < len(mixed):
                error = corrupt(mixed[:end])
                assert error.offset == end and "truncated" in error.problem


def test_bytes_after_the_trailer(mixed: bytes) -> None:
    for extra in (b"\0", b"x" * 5000, mixed):
        error = corrupt(mixed + extra)
        assert error.offset == len(mixed)
        assert "data after the trailer" in str(error)


def test_records_yields_before_the_trailer_is_checked(mixed: bytes) -> None:
    # Why consumers must not act before `records` returned: the damage is at the end.
    stream = io.BytesIO(flipped(mixed, len(mixed) - 1))
    header = read_header(stream, "test")
    seen = []
    with pytest.raises(CorruptDelta, match="stream checksum mismatch"):
        for record in records(stream, header, "test"):
            seen.append(record)
    assert len(seen) == len(MIXED)


def test_records_needs_a_header_read_from_the_stream(mixed: bytes) -> None:
    stream = io.BytesIO(mixed)
    read_header(stream, "test")
    with pytest.raises(ValueError, match="read_header"):
        records(stream, make_header(), "test")


def rewrite_json(blob: bytes, doc: Any) -> bytes:
    """The delta with another header JSON under a correct header checksum."""
    return rewrite_json_text(blob, json.dumps(doc).encode())


def rewrite_json_text(blob: bytes, body: bytes) -> bytes:
    """The delta with header JSON `body` (any bytes) under a correct header checksum."""
    head = b"DMREPLDT" + struct.pack("<HI", 1, len(body)) + body
    head += struct.pack("<I", zlib.crc32(head))
    rest = blob[header_bytes(blob) :]
    # The trailer's stream checksum covers the header too: recompute it.
    stream = head + rest[:-4]
    return stream + struct.pack("<I", zlib.crc32(stream))


def test_header_json_is_checked_after_its_checksum(mixed: bytes) -> None:
    doc = json.loads(mixed[14 : 14 + json_length(mixed)])
    assert verify(io.BytesIO(rewrite_json(mixed, doc)), "t")[0] == make_header()
    assert verify(io.BytesIO(rewrite_json(mixed, doc | {"future": 1})), "t")[0] == make_header()
    bad = [
        {k: v for k, v in doc.items() if k != "seq"},
        doc | {"seq": "5"},
        doc | {"created": None},
        doc | {"devices": [1]},
        doc | {"devices": doc["devices"][:2]},  # records name device 2: checked per record
        [doc],
    ]
    for value in bad[:4] + bad[5:]:
        error = corrupt(rewrite_json(mixed, value))
        assert error.offset == 14 and "header JSON" in str(error), str(error)
    error = corrupt(rewrite_json(mixed, bad[4]))
    assert "record 2 names device 2; there are 2" in str(error)


def test_deeply_nested_header_json_is_corrupt_not_a_crash(mixed: bytes) -> None:
    """Report case D25: a RecursionError escaped the ValueError handler (exit 1, a traceback)."""
    doc = json.loads(mixed[14 : 14 + json_length(mixed)])
    depth = 100_000
    body = b'{"deep":' + b"[" * depth + b"]" * depth + b"," + json.dumps(doc).encode()[1:]
    error = corrupt(rewrite_json_text(mixed, body))
    assert (error.offset, error.exit_code) == (14, 16)
    assert "header JSON: nested too deeply" in str(error)


def test_record_beyond_its_device_is_caught(mixed: bytes) -> None:
    doc = json.loads(mixed[14 : 14 + json_length(mixed)])
    doc["devices"][2]["sectors"] = 4096  # record 4 covers [4096, 5376)
    blob = rewrite_json(mixed, doc)
    error = corrupt(blob)
    assert error.offset == record_starts(blob)[4]
    assert "beyond the end of device 'dev2' (4096 sectors)" in str(error)


# --- random deltas --------------------------------------------------------------------------


def random_delta(rng: random.Random) -> tuple[DeltaHeader, list[Extent]]:
    sectors = tuple(rng.choice([8, 64, 4096, 1 << 22]) for _ in range(rng.randint(1, 5)))
    header = make_header(base_seq=rng.choice([None, 1]), sectors=sectors)
    extents = []
    for _ in range(rng.randint(0, 12)):
        device = rng.randrange(len(sectors))
        length = rng.choice([1, 2, 7, 8, 64, 2048, 2049, 4100]) * 512
        length = min(length, sectors[device] * 512)
        offset = rng.randint(0, sectors[device] - length // 512)
        extents.append((device, offset, rng.randbytes(length)))
    return header, extents


def test_random_deltas_round_trip_and_every_damage_is_caught() -> None:
    rng = random.Random(20240611)
    for _ in range(40):
        header, extents = random_delta(rng)
        blob, summary = write(header, extents)
        assert (
            summary.stream_bytes == len(blob) == encoded_size(header, [len(d) for *_, d in extents])
        )
        _, found, _ = reference_decode(blob)
        read, got, _ = read_all(blob)
        assert read == header
        assert (
            b"".join(r.data for r in got)
            == b"".join(d for *_, d in extents)
            == b"".join(d for *_, d in found)
        )
        for _ in range(25):
            position = rng.randrange(len(blob))
            corrupt(flipped(blob, position, rng.randrange(1, 256)))
            end = rng.randrange(len(blob))
            assert corrupt(blob[:end]).offset == end


def test_checksums_match_zlib_for_every_record_length() -> None:
    # The writer and reader extend CRCs arithmetically for long records; check them
    # against plain zlib for lengths around the switch and at the largest record.
    lengths = [512 * n for n in (1, 31, 32, 33, 63, 64, 65, 2047, 2048)]
    header = make_header()
    blob, _ = write(header, [(2, 0, pattern(n, n)) for n in lengths])
    _, found, _ = reference_decode(blob)
    assert [len(d) for *_, d in found] == lengths
    assert MAX_RECORD_BYTES == 2048 * 512


# --- a second pass without checksums --------------------------------------------------------


def test_without_checksums_records_still_get_every_structural_check(mixed: bytes) -> None:
    first_data = record_starts(mixed)[0] + RECORD_HEADER_BYTES
    _, found, _ = read_all(flipped(mixed, first_data), checksums=False)
    assert len(found) == len(MIXED)  # a CRC pass would refuse it:
    with pytest.raises(CorruptDelta, match="checksum"):
        read_all(flipped(mixed, first_data))
    trailer = record_starts(mixed)[-1]
    with pytest.raises(CorruptDelta, match="trailer counts"):
        read_all(flipped(mixed, trailer + 2), checksums=False)  # the record count
    with pytest.raises(CorruptDelta, match="in the data of record"):
        read_all(mixed[: first_data + 10], checksums=False)
