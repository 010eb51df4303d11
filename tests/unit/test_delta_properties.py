"""Property tests (hypothesis) of the delta reader and `apply` against damaged deltas (issue 13).

Whatever is done to a valid delta (bits flipped, cut short, bytes inserted, header fields
rewritten under a correct checksum), the reader raises nothing but CorruptDelta, and `apply`
writes no byte of a delta it refuses.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmrepl import delta
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.rebuild import apply_dir

SECTORS = 64  # 32 KiB devices keep each example fast
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    database=None,  # no .hypothesis directory in the checkout
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def valid_deltas(draw: st.DrawFn) -> tuple[delta.DeltaHeader, bytes]:
    """A valid delta: a full image or an incremental, 1-3 devices, 0-6 records."""
    count = draw(st.integers(1, 3))
    full = draw(st.booleans())
    seq = draw(st.integers(2, 1000))
    devices = tuple(
        delta.DeltaDevice(f"dev{i}", SECTORS, None if full else 5, 9) for i in range(count)
    )
    header = delta.DeltaHeader("g", seq, None if full else seq - 1, devices, 1.7e9)
    out = io.BytesIO()
    writer = delta.DeltaWriter(out, header)
    for _ in range(draw(st.integers(0, 6))):
        device = draw(st.integers(0, count - 1))
        sectors = draw(st.integers(1, 8))
        offset = draw(st.integers(0, SECTORS - sectors))
        writer.add(device, offset, draw(st.binary(min_size=1, max_size=1)) * (sectors * 512))
    writer.finish()
    return header, out.getvalue()


def json_span(blob: bytes) -> tuple[int, int]:
    (length,) = struct.unpack_from("<I", blob, 10)
    return 14, 14 + length


def with_header_json(blob: bytes, body: bytes) -> bytes:
    """`blob` with header JSON `body`, header and stream checksums made right again."""
    _, end = json_span(blob)
    head = blob[:8] + struct.pack("<HI", 1, len(body)) + body
    head += struct.pack("<I", zlib.crc32(head))
    stream = head + blob[end + 4 : -4]
    return stream + struct.pack("<I", zlib.crc32(stream))


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
# Values that often make a header valid again, with another meaning (the dangerous case).
PLAUSIBLE_VALUES = st.one_of(st.none(), st.integers(0, 1200), st.sampled_from(["g", "dev1"]))
HEADER_KEYS = st.sampled_from(
    ["seq", "base_seq"] * 4  # the fields a file name also states: the dangerous edits
    + ["group", "created", "devices", "future"]
    + [f"devices.{key}" for key in ("name", "sectors", "base_era", "target_era")]
)


@st.composite
def damaged(draw: st.DrawFn) -> tuple[str, bytes, bytes]:
    """(kind of damage, the valid delta, the damaged one); never equal to the valid one."""
    _, blob = draw(valid_deltas())
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "header", "nest"]))
    if kind == "flip":
        bad = bytearray(blob)
        positions = st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4, unique=True)
        for position in draw(positions):
            bad[position] ^= draw(st.integers(1, 255))
        result = bytes(bad)
    elif kind == "truncate":
        result = blob[: draw(st.integers(0, len(blob) - 1))]
    elif kind == "insert":
        at = draw(st.integers(0, len(blob)))
        result = blob[:at] + draw(st.binary(min_size=1, max_size=32)) + blob[at:]
    elif kind == "nest":  # deep nesting in a key readers ignore (report case D25)
        start, end = json_span(blob)
        depth = draw(st.sampled_from([10, 1000, 100_000]))
        body = b'{"deep":' + b"[" * depth + b"]" * depth + b"," + blob[start + 1 : end]
        result = with_header_json(blob, body)
        kind = "header"
    else:
        start, end = json_span(blob)
        doc: dict[str, Any] = json.loads(blob[start:end])
        key = draw(HEADER_KEYS)
        if key.startswith("devices."):
            index = draw(st.integers(0, len(doc["devices"]) - 1))
            doc["devices"][index][key.split(".", 1)[1]] = draw(PLAUSIBLE_VALUES | JSON_VALUES)
        else:
            doc[key] = draw(PLAUSIBLE_VALUES | JSON_VALUES)
        result = with_header_json(blob, json.dumps(doc).encode())
    return kind, blob, result


@SETTINGS
@given(damaged())
def test_the_reader_raises_only_corrupt_delta(case: tuple[str, bytes, bytes]) -> None:
    kind, _, blob = case
    try:
        delta.verify(io.BytesIO(blob), "damaged")
    except delta.CorruptDelta as error:
        assert error.exit_code == ExitCode.CORRUPT
        assert error.message.startswith("damaged")
        return
    # Only a header rewritten under a right checksum may still be a valid delta.
    assert kind == "header", "a damaged delta verified"


@SETTINGS
@given(damaged())
def test_apply_writes_nothing_from_a_damaged_delta(case: tuple[str, bytes, bytes]) -> None:
    kind, original, blob = case
    header = delta.verify(io.BytesIO(original), "valid")[0]
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "vault").mkdir()
        (root / "vault" / delta_file_name("g", header.seq, header.base_seq)).write_bytes(blob)
        targets = {}
        for device in header.devices:
            path = root / device.name
            path.write_bytes(b"\xa5" * SECTORS * 512)
            targets[device.name] = str(path)
        before = {n: hashlib.sha256(Path(p).read_bytes()).digest() for n, p in targets.items()}
        try:
            apply_dir(
                root / "vault", "g", targets,
                from_cut=header.base_seq, say=lambda _: None,
            )  # fmt: skip
        except DmreplError as error:
            if kind != "header":
                assert isinstance(error, delta.CorruptDelta), error.message
            assert error.exit_code in (ExitCode.CORRUPT, ExitCode.INVALID_INPUT), error.message
            after = {n: hashlib.sha256(Path(p).read_bytes()).digest() for n, p in targets.items()}
            assert after == before, f"{error.message}: a target changed"
            return
        assert kind == "header", "a damaged delta was applied"
        # Eras only link files together; what a lone file must keep is what its name says.
        applied = delta.verify(io.BytesIO(blob), "applied")[0]
        assert identity(applied) == identity(header), "a delta unlike its name was applied"


def identity(header: delta.DeltaHeader) -> tuple[object, ...]:
    devices = tuple((d.name, d.sectors, d.base_era is None) for d in header.devices)
    return (header.group, header.seq, header.base_seq, devices)


@given(st.binary(max_size=70000), st.integers(min_value=0, max_value=2**32 - 1))
def test_the_fast_crc32_is_zlibs(data: bytes, start: int) -> None:
    """Deltas are checksummed with ISA-L's CRC-32: the very values zlib computes."""
    assert delta.crc32(data, start) == zlib.crc32(data, start)
    assert delta.crc32(memoryview(data)) == zlib.crc32(data)
