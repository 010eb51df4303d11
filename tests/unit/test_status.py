"""Status parsers against `dmsetup status` output captured from a real kernel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmrepl.errors import ParseError
from dmrepl.status import (
    DelayStatus,
    EraStatus,
    Health,
    MirrorLeg,
    MirrorLogStatus,
    MirrorStatus,
    SnapshotState,
    SnapshotStatus,
    StatusLine,
    TargetFailed,
    parse_era_status,
    parse_mirror_status,
    parse_snapshot_status,
    parse_status,
    parse_status_line,
    parse_target_status,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "dmsetup"
STATUSES = sorted(p.stem for p in DATA.glob("*.status"))


def status(case: str) -> object:
    (line,) = parse_status((DATA / f"{case}.status").read_text())
    return parse_target_status(line)


def test_fixtures_are_there() -> None:
    assert len(STATUSES) >= 40


@pytest.mark.parametrize("case", STATUSES)
def test_every_captured_status_parses(case: str) -> None:
    lines = parse_status((DATA / f"{case}.status").read_text())
    assert lines
    for line in lines:
        parse_target_status(line)


def test_era() -> None:
    assert status("era") == EraStatus(8, 9, 1024, 1, None)
    held = status("era-held")
    assert held == EraStatus(8, 12, 1024, 2, 28)
    assert isinstance(held, EraStatus) and held.snapshot_held


def test_era_error_is_a_failure_not_a_parse_problem() -> None:
    with pytest.raises(TargetFailed):
        parse_era_status("Error")


def test_snapshots() -> None:
    fresh = status("snapshot-fresh")
    assert fresh == SnapshotStatus(SnapshotState.ACTIVE, 16, 16384, 16)
    used = status("snapshot")
    assert used == SnapshotStatus(SnapshotState.ACTIVE, 4128, 16384, 32)
    assert isinstance(used, SnapshotStatus) and used.valid and used.free_sectors == 12256
    assert status("snapshot-transient") == SnapshotStatus(SnapshotState.ACTIVE, 4096, 32768, 0)
    invalid = status("snapshot-invalid")
    assert isinstance(invalid, SnapshotStatus)
    assert invalid.state is SnapshotState.INVALID and invalid.full and not invalid.valid
    overflow = status("snapshot-overflow")
    assert isinstance(overflow, SnapshotStatus)
    assert overflow.state is SnapshotState.OVERFLOW and overflow.full and overflow.valid
    # A PO snapshot that overflowed is invalidated by a later origin write it cannot hold.
    after = status("snapshot-overflow-then-origin-write")
    assert isinstance(after, SnapshotStatus) and after.state is SnapshotState.INVALID


@pytest.mark.parametrize("word", ["Invalid", "Overflow", "Merge failed", "Unknown"])
def test_snapshot_state_words(word: str) -> None:
    assert parse_snapshot_status(word).state.value == word


def legs(*pairs: tuple[str, str]) -> tuple[MirrorLeg, ...]:
    return tuple(MirrorLeg(device, Health(char)) for device, char in pairs)


def test_mirrors() -> None:
    core = status("mirror-core")
    assert core == MirrorStatus(legs(("7:1", "A"), ("7:2", "A")), 32, 32, MirrorLogStatus("core"))
    assert isinstance(core, MirrorStatus) and core.in_sync and core.healthy
    resyncing = status("mirror-core-resyncing")
    assert isinstance(resyncing, MirrorStatus)
    assert not resyncing.in_sync and resyncing.healthy and resyncing.in_sync_regions < 32
    assert status("mirror-disk") == MirrorStatus(
        legs(("7:1", "A"), ("7:2", "A")), 32, 32, MirrorLogStatus("disk", "254:0", Health.ALIVE)
    )
    three = status("mirror-core-3legs")
    assert isinstance(three, MirrorStatus) and len(three.legs) == 3 and three.regions == 16


@pytest.mark.parametrize(
    ("case", "health", "in_sync"),
    [
        ("mirror-leg-dead", "AD", 30),  # error target under leg 2, then a write
        ("mirror-leg-dead-handled", "AF", 30),  # flakey (all I/O fails): the flush failed first
        ("mirror-leg-read-error", "RA", 32),  # default leg fails reads
        ("mirror-leg-sync-error-handled", "AS", 0),  # resync onto a failing leg
        # Without handle_errors resync errors are ignored: the dead leg looks alive and synced.
        ("mirror-leg-sync-error", "AA", 32),
    ],
)
def test_mirror_leg_failures(case: str, health: str, in_sync: int) -> None:
    found = status(case)
    assert isinstance(found, MirrorStatus)
    assert "".join(leg.health.value for leg in found.legs) == health
    assert found.in_sync_regions == in_sync and found.regions == 32
    assert found.healthy is (health == "AA")
    assert [leg.device for leg in found.failed_legs] == [
        leg.device for leg in found.legs if leg.health is not Health.ALIVE
    ]


def test_mirror_disk_log_failure() -> None:
    found = status("mirror-disklog-dead")
    assert isinstance(found, MirrorStatus)
    assert found.log == MirrorLogStatus("disk", "254:3", Health.WRITE_FAILED)
    assert not found.healthy and not found.log.healthy


def test_delay() -> None:
    assert status("delay") == DelayStatus(0, 0, 0)
    busy = status("delay-busy")
    assert busy == DelayStatus(0, 1, 0)
    assert isinstance(busy, DelayStatus) and busy.in_flight == 1


@pytest.mark.parametrize(
    "case", ["linear", "zero", "error", "snapshot-origin", "flakey", "flakey-always-down"]
)
def test_silent_targets(case: str) -> None:
    assert status(case) is None


def test_multi_line_status() -> None:
    lines = parse_status((DATA / "linear-multi.status").read_text())
    assert lines == (
        StatusLine(0, 1024, "linear", ""),
        StatusLine(1024, 2048, "linear", ""),
        StatusLine(3072, 1024, "zero", ""),
        StatusLine(4096, 1024, "error", ""),
    )


# --- malformed variants of captured statuses ----------------------------------------------

CAPTURED = [
    line
    for case in STATUSES
    for line in parse_status((DATA / f"{case}.status").read_text())
    if line.params
]
NUMBER = re.compile(r"\d+")


@pytest.mark.parametrize("line", CAPTURED, ids=lambda line: f"{line.target}:{line.params}")
def test_mutated_statuses_are_refused(line: StatusLine) -> None:
    tokens = line.params.split()
    variants = [
        line.params + " extra",
        " ".join(tokens[:-1]),
        NUMBER.sub("x", line.params, count=1),
        NUMBER.sub("-1", line.params, count=1),
    ]
    for variant in variants:
        if variant == line.params:
            continue
        with pytest.raises(ParseError):
            parse_target_status(StatusLine(line.start, line.length, line.target, variant))


@pytest.mark.parametrize(
    "params",
    [
        "2 7:1 7:2 32/32 1 A 1 core",  # one health char for two legs
        "2 7:1 7:2 32/32 1 AZ 1 core",  # unknown health
        "2 7:1 7:2 32/32 2 AA 1 core",  # status arg count
        "2 7:1 7:2 32 1 AA 1 core",  # no region count
        "2 7:1 7:2 32/32 1 AA 2 core",
        "2 7:1 7:2 32/32 1 AA 3 disk 254:0 S",  # log health is A, D or F
        "2 7:1 7:2 32/32 1 AA 3 disk 254:0",
        "2 7:1 7:2 32/32 1 AA 3 userspace x y",
        "1 7:1 32/32 1 A 1 core",  # a mirror has at least two legs
        "",
    ],
)
def test_malformed_mirror_status(params: str) -> None:
    with pytest.raises(ParseError):
        parse_mirror_status(params)


@pytest.mark.parametrize(
    "params", ["Invalid snapshot", "invalid", "12/10 1", "10/12 11", "1/2", "Merge", ""]
)
def test_malformed_snapshot_status(params: str) -> None:
    with pytest.raises(ParseError):
        parse_snapshot_status(params)


@pytest.mark.parametrize(
    "line",
    [
        StatusLine(0, 8, "linear", "1"),
        StatusLine(0, 8, "flakey", "0 0"),
        StatusLine(0, 8, "thin-pool", "1 2/3"),
        StatusLine(0, 8, "delay", "0 0"),
        StatusLine(0, 8, "era", "8 9/1024 1"),
    ],
)
def test_unexpected_statuses(line: StatusLine) -> None:
    with pytest.raises(ParseError):
        parse_target_status(line)


@pytest.mark.parametrize("raw", ["", "0", "0 8", "x 8 linear", "0 -8 linear"])
def test_malformed_status_lines(raw: str) -> None:
    with pytest.raises(ParseError):
        parse_status_line(raw)
