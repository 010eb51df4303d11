"""Every case of the report's section "Deltas and `dmrepl apply`" (D00-D30 of
../shared/reports/bad-input-2026-12.md), table-driven: each row builds its delta directory
`$W/deltas/<id>` with dmrepl.delta's writer (corruptions mutate its bytes as the report
describes), runs `dmrepl apply` in this process, and checks the exit code docs/cli.md gives
the problem, a message naming it, no traceback, and a hash of every file under the scratch
tree `$W` the same before and after. Baselines (valid input) must exit 0, change only their
target, and leave it holding exactly the image their records describe.

Targets are regular files (image files) the size of the delta's device, pre-filled with 0xAA so
a full image that does not zero its target is seen. Devices are 1 MiB here (the report's were
64 MiB); the memory cases D27/D27b/D28 use 32 MiB and fewer records than the report (65536
small records instead of 300000): enough that holding the records in memory would show in
the peak RSS, measured on a subprocess (test_memory_stays_bounded).

A row without a `why` is one the report rated "clear" and we agree with. The report has no
D12 and no D26.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmrepl import applylog
from dmrepl.delta import DeltaDevice, DeltaHeader, DeltaWriter
from dmrepl.errors import ExitCode
from tests.unit.badinput import (
    DELTA_SECTORS,
    ROOT,
    Case,
    check_case,
    header_end,
    public_scratch,
    with_header_crc_fixed,
    with_header_json,
    with_record_fields,
)

ERR = ExitCode
SECTORS = DELTA_SECTORS  # 1 MiB devices
BIG_SECTORS = 1 << 16  # 32 MiB: the memory cases
STALE = 0xAA  # what a target holds before a case

Write = tuple[int, int, bytes]  # device index, offset in sectors, data

FULL_WRITES: list[Write] = [(0, 0, b"\x01" * 4096), (0, 16, b"\x02" * 8192)]
INC2_WRITES: list[Write] = [(0, 8, b"\x03" * 512), (0, 1000, b"\x04" * 1024)]
INC3_WRITES: list[Write] = [(0, 8, b"\x05" * 512)]
OVERLAPPING: list[Write] = [(0, 0, b"\x0a" * 4096), (0, 4, b"\x0b" * 4096)]  # D10: 0..8, 4..12


def many_small() -> Iterator[Write]:
    """D27: a record of 512 B for every sector of a 32 MiB device (made when needed)."""
    return ((0, s, bytes([s % 251 + 1]) * 512) for s in range(BIG_SECTORS))


def max_records() -> Iterator[Write]:
    """D27b: records of the largest size, 1 MiB, over a 32 MiB device."""
    return ((0, i * 2048, bytes([i + 1]) * (1 << 20)) for i in range(BIG_SECTORS // 2048))


KILLED: list[Write] = [(0, i * 8, bytes([i + 1]) * 4096) for i in range(64)]  # D30


def header(
    seq: int = 1,
    base: int | None = None,
    *,
    group: str = "db",
    devices: Sequence[tuple[str, int]] = (("data", SECTORS),),
    eras: tuple[int | None, int] | None = None,
) -> DeltaHeader:
    """A header of a chain in which cut N ends at era 2N-1 (so N+1 starts at era 2N)."""
    base_era, target_era = eras or (None if base is None else 2 * base, 2 * seq - 1)
    return DeltaHeader(
        group,
        seq=seq,
        base_seq=base,
        created=1.7e9,
        devices=tuple(DeltaDevice(n, s, base_era, target_era) for n, s in devices),
    )


def write_delta(path: Path, head: DeltaHeader, writes: Iterable[Write]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb", buffering=1 << 20) as out:
        writer = DeltaWriter(out, head)
        for device, offset, data in writes:
            writer.add(device, offset, data)
        writer.finish()
    return path


def blob(head: DeltaHeader | None = None, writes: Iterable[Write] = FULL_WRITES) -> bytes:
    """The bytes of a delta (default: the full image of cut 1 that most cases damage)."""
    out = io.BytesIO()
    writer = DeltaWriter(out, head or header())
    for device, offset, data in writes:
        writer.add(device, offset, data)
    writer.finish()
    return out.getvalue()


def image(*writes: Iterable[Write], sectors: int = SECTORS) -> bytes:
    """What a zeroed device holds after these writes (device 0), in order: the last one wins."""
    found = bytearray(sectors * 512)
    for batch in writes:
        for _, offset, data in batch:
            found[offset * 512 : offset * 512 + len(data)] = data
    return bytes(found)


FULL = "db.0000000001.full.delta"
INC2 = "db.0000000002.0000000001.delta"
INC3 = "db.0000000003.0000000002.delta"
R0 = header_end(blob())  # where record 0 starts in blob()


def put(d: Path, name: str, data: bytes) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


def damaged_full(change: Callable[[bytes], bytes]) -> Callable[[Path, Path], object]:
    """A builder: the directory holds blob() changed by `change`, named as the full image."""
    return lambda d, w: put(d, FULL, change(blob()))


def flip(position: int, mask: int = 0x01) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        at = position % len(data)
        return data[:at] + bytes([data[at] ^ mask]) + data[at + 1 :]

    return change


def header_text(change: Callable[[str], str]) -> Callable[[bytes], bytes]:
    """Rewrite the header JSON's text (its checksum made right), as the report did."""

    def rewrite(data: bytes) -> bytes:
        text = data[14 : header_end(data) - 4].decode()
        return with_header_json(data, change(text).encode())

    return rewrite


def in_header(old: str, new: str) -> Callable[[Path, Path], object]:
    """A builder: blob() with `old` replaced by `new` in its header JSON (which must hold it)."""

    def change(text: str) -> str:
        assert old in text, text
        return text.replace(old, new)

    return damaged_full(header_text(change))


def full(
    writes: Sequence[Write] = FULL_WRITES,
    *,
    group: str = "db",
    devices: Sequence[tuple[str, int]] = (("data", SECTORS),),
) -> Callable[[Path, Path], object]:
    """A builder: a valid full image of cut 1 (of `group`, for `devices`)."""
    return lambda d, w: write_delta(d / FULL, header(group=group, devices=devices), writes)


def chain(d: Path, w: Path) -> None:
    """D00: the full image of cut 1, then 2 <- 1 and 3 <- 2."""
    write_delta(d / FULL, header(), FULL_WRITES)
    write_delta(d / INC2, header(2, 1), INC2_WRITES)
    write_delta(d / INC3, header(3, 2), INC3_WRITES)


def d13(d: Path, w: Path) -> None:
    write_delta(d / "db.0000000002.full.delta", header(2, 1), [(0, 0, b"\x05" * 4096)])


def d13b(d: Path, w: Path) -> None:
    write_delta(d / FULL, header(), FULL_WRITES)
    write_delta(d / INC2, header(9), [(0, 0, b"\x09" * 4096)])


def d14(d: Path, w: Path) -> None:
    write_delta(d / FULL, header(), FULL_WRITES)
    write_delta(d / INC2, header(7, 6, eras=(2, 13)), INC2_WRITES)


def d15(d: Path, w: Path) -> None:
    write_delta(d / FULL, header(), FULL_WRITES)
    inc = blob(header(2, 1), INC2_WRITES)
    second = header_end(inc) + 18 + 512  # record 1
    put(d, INC2, flip(second + 18 + 100)(inc))


def d16(d: Path, w: Path) -> None:
    write_delta(d / FULL, header(), FULL_WRITES)
    (w / "dev/small").write_bytes(bytes([STALE]) * (SECTORS * 512 - 512))


def d19(d: Path, w: Path) -> None:
    d.mkdir(parents=True)
    os.mkfifo(d / FULL)


def d19b(d: Path, w: Path) -> None:
    (d / FULL).mkdir(parents=True)


def d19c(d: Path, w: Path) -> None:
    """A stand-in for /etc/shadow (root-only), so the case does not depend on the host's."""
    shadow = w / "shadow"
    shadow.write_text("root:*:20000:0:99999:7:::\n")
    shadow.chmod(0o600)
    d.mkdir(parents=True)
    (d / FULL).symlink_to(shadow)


def d08b(d: Path, w: Path) -> None:
    """A record header declaring 1 MiB, then the end of the stream."""
    data = blob()
    put(d, FULL, with_record_fields(data, R0, length=1 << 20, fix_crc=False)[: R0 + 18])


def deep_json(text: str) -> str:
    return text[:-1] + ',"x":' + "[" * 100_000 + "]" * 100_000 + "}"


def big_target(d: Path, w: Path) -> None:
    with open(w / "dev/big", "wb") as f:
        f.truncate(BIG_SECTORS * 512)


def d27(d: Path, w: Path) -> None:
    big_target(d, w)
    write_delta(d / FULL, header(devices=(("data", BIG_SECTORS),)), many_small())


def d27b(d: Path, w: Path) -> None:
    big_target(d, w)
    write_delta(d / FULL, header(devices=(("data", BIG_SECTORS),)), max_records())


def d28(d: Path, w: Path) -> None:
    devices = [(f"d{i}", 1) for i in range(0xFFFF)]
    write_delta(d / FULL, header(devices=devices), [])


def d29(d: Path, w: Path) -> None:
    devices = (("a", SECTORS), ("b", SECTORS))
    write_delta(d / FULL, header(devices=devices), [(0, 0, b"a" * 4096), (1, 0, b"b" * 4096)])


# D30: `dmrepl apply` in a subprocess that kills itself with SIGKILL after some writes (a real
# kill -9 half way, at a point that does not depend on timing).
KILL_AFTER_WRITES = """
import os, sys
from dmrepl import blockio, cli
real, count = blockio.write_at, 0
def write_at(fd, offset, data):
    global count
    count += 1
    if count > 10:
        os.kill(os.getpid(), 9)
    real(fd, offset, data)
blockio.write_at = write_at
sys.argv = ["dmrepl", *sys.argv[1:]]
cli.main()
"""


def d30(d: Path, w: Path) -> None:
    write_delta(d / FULL, header(), KILLED)
    target = w / "dev/target"
    before = target.read_bytes()
    command = [sys.executable, "-c", KILL_AFTER_WRITES, "apply", str(d), "--group", "db"]
    done = subprocess.run(
        [*command, "--to", f"data={target}"],
        capture_output=True,
        cwd=w,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == -9, done.stderr
    half = target.read_bytes()
    assert half not in (before, image(KILLED))  # zeroed, then 10 of 64 records written
    assert half[: 10 * 4096] == image(KILLED)[: 10 * 4096]
    # The kill left a durable record that the rerun (this row's case) reports and clears.
    record = applylog.read({"data": str(target)})
    assert record is not None and (record.held, record.writing) == (None, 1)


@dataclass(frozen=True)
class Row:
    """A report case (`case`), the builder of its `$W/deltas/<id>` (given that path and $W),
    and for a baseline the image its target (a path under $W) must hold afterwards."""

    case: Case
    build: Callable[[Path, Path], object]
    image: Callable[[], bytes] | None = None
    target: str = "dev/target"
    absent: tuple[str, ...] = field(default=())  # must not appear in the output


def row(
    id: str,
    build: Callable[[Path, Path], object],
    code: ExitCode,
    message: str,
    *extra: str,
    to: Sequence[str] = ("data=$W/dev/target",),
    directory: str | None = None,
    group: str = "db",
    why: str = "",
    image: Callable[[], bytes] | None = None,
    target: str = "dev/target",
    absent: tuple[str, ...] = (),
) -> Row:
    """`dmrepl apply $W/deltas/<id> --group db --to data=$W/dev/target EXTRA...`."""
    args = ["apply", directory or f"$W/deltas/{id}", "--group", group]
    for item in to:
        args += ["--to", item]
    writes = (target,) if image is not None else ()
    case = Case(id, (*args, *extra), code, message, why=why, writes=writes)
    return Row(case, build, image, target, absent)


def nothing(d: Path, w: Path) -> None:
    pass


HINT = "nothing was applied from it"
BIG = ("data=$W/dev/big",)

ROWS = [
    row(
        "D00", chain, ERR.OK, "targets hold cut 3 of db (3 deltas",
        image=lambda: image(FULL_WRITES, INC2_WRITES, INC3_WRITES),
        why="baseline: a full image and two incrementals rebuild the image exactly",
    ),
    row("D01", damaged_full(lambda b: b[:-10]), ERR.CORRUPT, "corrupt delta: truncated at byte"),
    row(
        "D01b", damaged_full(lambda b: b[: R0 + 18 + 100]), ERR.CORRUPT,
        f"truncated at byte {R0 + 18 + 100} (in the data of record 0)",
    ),
    row("D02", damaged_full(flip(R0 + 18 + 7)), ERR.CORRUPT, "record 0 checksum mismatch"),
    row("D03", damaged_full(flip(20)), ERR.CORRUPT, "corrupt delta at byte 0: header checksum"),
    row("D04", damaged_full(flip(-22 + 2 + 5)), ERR.CORRUPT, "the trailer counts 1099511627778"),
    row("D04b", damaged_full(flip(-1)), ERR.CORRUPT, "stream checksum mismatch"),
    row(
        "D05", damaged_full(lambda b: b[:6] + b"XX" + b[8:]), ERR.CORRUPT,
        "not a dmrepl delta (it starts with b'DMREPLXX')",
    ),
    row(
        "D05b", lambda d, w: put(d, FULL, b"hello world\n" * 4), ERR.CORRUPT,
        "not a dmrepl delta (it starts with b'hello wo')",
    ),
    row(
        "D06", damaged_full(lambda b: with_header_crc_fixed(b[:8] + b"\x02\x00" + b[10:])),
        ERR.CORRUPT, "delta format version 2; this build reads version 1",
    ),
    row("D07", lambda d, w: put(d, FULL, b""), ERR.CORRUPT, "truncated at byte 0 (in the magic)"),
    row(
        "D08", damaged_full(lambda b: with_record_fields(b, R0, length=0xFFFFFFFF)),
        ERR.CORRUPT, f"corrupt delta at byte {R0}: record 0 has a bad length 4294967295",
    ),
    row("D08b", d08b, ERR.CORRUPT, f"truncated at byte {R0 + 18} (in the data of record 0)"),
    row(
        "D08c", damaged_full(lambda b: b[:10] + b"\xf0\xff\xff\xff" + b[14:]), ERR.CORRUPT,
        "header length 4294967280 is over the limit of 16777216",
    ),
    row(
        "D09", damaged_full(lambda b: with_record_fields(b, R0, offset=SECTORS)), ERR.CORRUPT,
        f"record 0 covers sectors [{SECTORS}, {SECTORS + 8}) beyond the end of device 'data'",
    ),
    row(
        "D09b", damaged_full(lambda b: with_record_fields(b, R0, offset=2**64 - 1)),
        ERR.CORRUPT, f"record 0 covers sectors [{2**64 - 1}, {2**64 + 7}) beyond the end",
        why="offsets are Python integers: no u64 wrap-around can bring the end back in bounds",
    ),
    row(
        "D09c", damaged_full(lambda b: with_record_fields(b, R0, device=0xFFFE)), ERR.CORRUPT,
        "record 0 names device 65534; there are 1",
    ),
    row(
        "D09d", damaged_full(lambda b: with_record_fields(b, R0, length=100)), ERR.CORRUPT,
        "record 0 has a bad length 100",
    ),
    row(
        "D10", full(OVERLAPPING), ERR.OK, "targets hold cut 1 of db (1 deltas",
        image=lambda: image(OVERLAPPING),
        why="baseline: overlapping records are valid (docs/delta-format.md: records apply in "
        "stream order), so the last one wins",
    ),
    row("D11", full(group="other"), ERR.INVALID_INPUT, f"{FULL} belongs to group other, not db"),
    row(
        "D11b", full(devices=(("other", SECTORS),)), ERR.INVALID_INPUT,
        "holds devices other; targets given for data",
    ),
    row(
        "D11c", full(devices=(("data", SECTORS - 1),)), ERR.INVALID_INPUT,
        f"target for data is {SECTORS * 512} bytes; the delta's device is {SECTORS * 512 - 512}",
    ),
    row(
        "D13", d13, ERR.CORRUPT,
        "db.0000000002.full.delta: its name says cut 2 (full image), its header says cut 2 "
        "from cut 1",
        why="was exit 0 with 1 MiB of stale data left: the name and the header disagree, so the "
        "file is refused (exit 16) before anything is written",
    ),
    row(
        "D13b", d13b, ERR.CORRUPT,
        f"{INC2}: its name says cut 2 from cut 1, its header says cut 9 (full image)",
        "--from-cut", "1",
        why="was exit 0, the target zeroed in the middle of a roll-forward: refused like D13",
    ),
    row(
        "D14", d14, ERR.CORRUPT, "its header says cut 7 from cut 6",
        why="was exit 0: the chain follows names, and every name must agree with its header",
    ),
    row(
        "D15", d15, ERR.CORRUPT, f"{INC2}: corrupt delta at", absent=("applying",),
        why="was cut 1 written, then exit 16 saying nothing was applied: now the whole chain is "
        "verified before a byte is written, so the target is untouched and the hint is true",
    ),
    row(
        "D16", d16, ERR.INVALID_INPUT,
        f"target for data is {SECTORS * 512 - 512} bytes; the delta's device is "
        f"{SECTORS * 512} bytes", to=("data=$W/dev/small",),
    ),
    row(
        "D17", nothing, ERR.DEVICE_MISSING, "$W/dev/nonexistent-target does not exist",
        directory="$W/deltas", to=("data=$W/dev/nonexistent-target",),
        why="was a FileNotFoundError traceback: a missing target is exit 11 (docs/cli.md)",
    ),
    row(
        "D17b", nothing, ERR.DEVICE_MISSING, "$W/dev/adir is a directory",
        directory="$W/deltas", to=("data=$W/dev/adir",),
        why="was an IsADirectoryError traceback: a target of the wrong kind is exit 11",
    ),
    row(
        "D17c", nothing, ERR.DEVICE_MISSING, "/dev/null is a character device",
        directory="$W/deltas", to=("data=/dev/null",),
        why="the report saw exit 10 from the size check (0 bytes); a character device is not a "
        "target at all, so it is refused by kind first, with exit 11 as docs/cli.md lists",
    ),
    row("D18", damaged_full(lambda b: b + b"garbage"), ERR.CORRUPT, "data after the trailer"),
    row(
        "D19", d19, ERR.CORRUPT, f"{FULL} is not a regular file (a FIFO)",
        why="used to hang forever opening the FIFO: it is opened without blocking and refused",
    ),
    row(
        "D19b", d19b, ERR.CORRUPT, f"{FULL} is not a regular file (a directory)",
        why="was an IsADirectoryError traceback: refused like any file that cannot be a delta",
    ),
    row(
        "D19c", d19c, ERR.CORRUPT, "not a dmrepl delta (it starts with b'root:*:2')",
        why="a link is followed for reading only (harmless: apply runs as root, who may read "
        "it anyway); what it leads to fails the checks like any other file, nothing written",
    ),
    row(
        "D20", nothing, ERR.INVALID_INPUT, "--to 'data=dev/target' is not DEVICE=/dev/TARGET",
        directory="$W/deltas", to=("data=dev/target",),
    ),
    row(
        "D21", nothing, ERR.INVALID_INPUT, "--to '$W/dev/target' is not DEVICE=/dev/TARGET",
        directory="$W/deltas", to=("$W/dev/target",),
    ),
    row(
        "D21b", nothing, ERR.INVALID_INPUT, "holds devices data; targets given for other",
        directory="$W/deltas", to=("other=$W/dev/target",),
    ),
    row(
        "D21c", nothing, ERR.INVALID_INPUT,
        "--to gives device data twice ($W/dev/target and $W/dev/replica)",
        directory="$W/deltas", to=("data=$W/dev/target", "data=$W/dev/replica"),
        why="the second --to used to replace the first silently (and be written): refused",
    ),
    row(
        "D22", nothing, ERR.INVALID_INPUT, "do not reach cut 99 (stop at 1)", "--cut", "99",
        directory="$W/deltas",
    ),
    row(
        "D22b", nothing, ERR.INVALID_INPUT, "--cut -1 is not a cut", "--cut", "-1",
        directory="$W/deltas",
        why="the report's message (no full image at or before cut -1) was right in effect; a "
        "negative cut is now named as such",
    ),
    row(
        "D22c", nothing, ERR.INVALID_INPUT, "--from-cut -5 is not a cut", "--from-cut", "-5",
        directory="$W/deltas", why="was exit 0, 'targets hold cut -5'",
    ),
    row(
        "D22d", nothing, ERR.INVALID_INPUT,
        f"$W/deltas holds no delta of group db from cut {2**70}", "--from-cut", str(2**70),
        directory="$W/deltas", why=f"was exit 0, 'targets hold cut {2**70}'",
    ),
    row(
        "D23", nothing, ERR.INVALID_INPUT, "$W/deltas/nope does not exist",
        directory="$W/deltas/nope",
        why="said 'holds no delta files': now says what is wrong with the directory",
    ),
    row(
        "D23b", nothing, ERR.INVALID_INPUT, "$W/dev/origin is not a directory",
        directory="$W/dev/origin", why="as D23",
    ),
    row(
        "D24", full(), ERR.INVALID_INPUT, "$W/deltas/D24 holds no delta files of group ../db",
        group="../db",
        why="$W/deltas/db.0000000001.full.delta is one '..' away: file names are matched "
        "whole against the group, so a path in --group reaches nothing",
    ),
    row(
        "D24b", full(), ERR.INVALID_INPUT, "$W/deltas/D24b holds no delta files of group *",
        group="*", why="a glob character matches no file: the group must equal the name's",
    ),
    row(
        "D25", damaged_full(header_text(deep_json)), ERR.CORRUPT,
        "corrupt delta at byte 14: header JSON: nested too deeply",
        why="was a RecursionError traceback (exit 1): now a corrupt header, exit 16",
    ),
    row(
        "D25b",
        in_header(f'"sectors":{SECTORS}', '"sectors":' + "9" * 5000),
        ERR.CORRUPT, "corrupt delta at byte 14: header JSON: Exceeds the limit (4300 digits)",
    ),
    row(
        "D25c", in_header('"created":1700000000.0', '"created":1e400'),
        ERR.CORRUPT, "header JSON: created must be a finite unix time, not inf",
    ),
    row(
        "D25d", damaged_full(header_text(lambda t: '{"group":"db",' + t[1:])), ERR.CORRUPT,
        "header JSON: a key repeats",
    ),
    row(
        "D25e", in_header('"seq":1,', '"seq":-1,'),
        ERR.CORRUPT, "header JSON: seq must be an integer >= 0, not -1",
    ),
    row(
        "D27", d27, ERR.OK, "targets hold cut 1 of db (1 deltas, 32", to=BIG,
        image=lambda: image(many_small(), sectors=BIG_SECTORS), target="dev/big",
        why="baseline: 65536 records of 512 B stream (memory: test_memory_stays_bounded)",
    ),
    row(
        "D27b", d27b, ERR.OK, "targets hold cut 1 of db (1 deltas, 32", to=BIG,
        image=lambda: image(max_records(), sectors=BIG_SECTORS), target="dev/big",
        why="baseline: 32 records of the largest size, 1 MiB (memory: as D27)",
    ),
    row(
        "D28", d28, ERR.INVALID_INPUT,
        f"{FULL} holds devices d0, d1, d2, d3, d4, d5, d6, d7, d8, d9 and 65525 more; targets "
        "given for data", absent=("d10",),
        why="a header of 65535 devices (3.9 MB of JSON, within the 16 MiB limit) is read, then "
        "refused because its devices are not the targets'; the report's message listed all "
        "65535 names (half a megabyte on one line): now the first ten and how many more "
        "(memory: as D27)",
    ),
    row(
        "D29", d29, ERR.INVALID_INPUT,
        "the targets of a and b are the same device ($W/dev/target)",
        to=("a=$W/dev/target", "b=$W/dev/target"),
        why="was exit 0, a's data overwritten by b's: distinct targets are checked first",
    ),
    row(
        "D30", d30, ERR.OK, "targets hold cut 1 of db (1 deltas", image=lambda: image(KILLED),
        why="baseline: after kill -9 half way (the builder does it, and checks the target is "
        "half written) nothing can say what the target holds (docs/cli.md says so); the same "
        "apply again zeroes it and rebuilds the exact image",
    ),
]  # fmt: skip

REPORT_IDS = (
    "D00",
    "D01",
    "D01b",
    "D02",
    "D03",
    "D04",
    "D04b",
    "D05",
    "D05b",
    "D06",
    "D07",
    "D08",
    "D08b",
    "D08c",
    "D09",
    "D09b",
    "D09c",
    "D09d",
    "D10",
    "D11",
    "D11b",
    "D11c",
    "D13",
    "D13b",
    "D14",
    "D15",
    "D16",
    "D17",
    "D17b",
    "D17c",
    "D18",
    "D19",
    "D19b",
    "D19c",
    "D20",
    "D21",
    "D21b",
    "D21c",
    "D22",
    "D22b",
    "D22c",
    "D22d",
    "D23",
    "D23b",
    "D24",
    "D24b",
    "D25",
    "D25b",
    "D25c",
    "D25d",
    "D25e",
    "D27",
    "D28",
    "D27b",
    "D29",
    "D30",
)


@pytest.fixture
def scratch() -> Iterator[Path]:
    """The report's `$W` (tests/unit/badinput.py) with `dev/target`, a device-sized image
    file holding stale bytes."""
    with public_scratch() as w:
        (w / "dev/target").write_bytes(bytes([STALE]) * (SECTORS * 512))
        yield w


def build(r: Row, w: Path) -> None:
    r.build(w / "deltas" / r.case.id, w)


@pytest.mark.timeout(120)  # D19: a FIFO once made apply hang forever
@pytest.mark.parametrize("r", ROWS, ids=[r.case.id for r in ROWS])
def test_report_delta_case(r: Row, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(r, scratch)
    output = check_case(r.case, scratch, monkeypatch)
    if r.image is not None:
        assert (scratch / r.target).read_bytes() == r.image()
    for text in r.absent:
        assert text not in output, output


def test_every_report_case_is_a_row_once() -> None:
    ids = [r.case.id for r in ROWS]
    assert len(ids) == len(set(ids))
    assert sorted(ids) == sorted(REPORT_IDS)


# Peak RSS of `dmrepl apply` in a fresh interpreter that runs it as its only child:
# RUSAGE_CHILDREN's ru_maxrss is the largest of all waited-for children, so measuring from
# pytest itself would report any bigger child run earlier.
PEAK_RSS = (
    "import resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[1:], capture_output=True)\n"
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)

# Over a baseline apply of a 12 KiB delta. Holding D27's or D27b's 32 MiB of records would add
# at least 32 MiB (measured: 45 and 33 MiB; streaming: 1 and 3 MiB). D28's header is bounded by
# the format (16 MiB of JSON at most); parsing its 3.9 MB costs ~35 MiB (the report measured
# 80 MB RSS against 44 MB).
MEMORY_BOUND_MIB = {"D27": 16, "D27b": 16, "D28": 96}


def peak_rss_kib(args: list[str], cwd: Path) -> tuple[int, int]:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "dmrepl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=True,
    )
    code, kib = done.stdout.split()
    return int(code), int(kib)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case_id", sorted(MEMORY_BOUND_MIB))
def test_memory_stays_bounded(case_id: str, scratch: Path) -> None:
    """D27/D27b/D28: apply streams records and reads one bounded header."""
    r = next(r for r in ROWS if r.case.id == case_id)
    build(r, scratch)
    args = [a.replace("$W", str(scratch)) for a in r.case.args]
    small = ["apply", str(scratch / "deltas"), "--group", "db"]
    code, base = peak_rss_kib([*small, "--to", f"data={scratch / 'dev/target'}"], scratch)
    assert code == 0
    code, peak = peak_rss_kib(args, scratch)
    assert code == r.case.code
    assert peak - base < MEMORY_BOUND_MIB[case_id] * 1024, (peak, base)  # ru_maxrss: KiB
