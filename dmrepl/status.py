"""Parse `dmsetup status` lines of the targets dmrepl uses.

Every parser is strict: a shape the kernel source does not print raises `ParseError`.
Formats read from the kernel source (cited per parser) and verified on Debian's 6.1
kernel; fixtures and the capture script are in tests/data/dmsetup and tests/data/capture.sh.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from dmrepl.errors import DmreplError, ParseError

_UINT = r"(0|[1-9][0-9]*)"


class TargetFailed(DmreplError):
    """The target reports that it failed (dm-era prints `Error` when its metadata is unreadable)."""


# dm-era: <metadata block size> <used>/<total metadata blocks> <current era> <held root | ->
# (dm-era-target.c era_status; verified on Debian 6.1, see tests/data/dmsetup/era*.status).
# When reading its metadata fails it prints just `Error`.
_ERA_STATUS = re.compile(rf"{_UINT} {_UINT}/{_UINT} {_UINT} (-|{_UINT})")


@dataclass(frozen=True)
class EraStatus:
    metadata_block_sectors: int
    metadata_used_blocks: int
    metadata_total_blocks: int
    current_era: int
    held_root: int | None  # metadata snapshot root while one is held

    @property
    def snapshot_held(self) -> bool:
        return self.held_root is not None


def parse_era_status(params: str) -> EraStatus:
    """Parse the parameters of an era status line (after `start length era`)."""
    text = params.strip()
    if text == "Error":
        raise TargetFailed(
            "the era target cannot read its metadata (status: Error)",
            hint="check the metadata device and the kernel log",
        )
    match = _ERA_STATUS.fullmatch(text)
    if not match:
        raise ParseError("dm-era status", params)
    block, used, total, era, held = match.group(1, 2, 3, 4, 5)
    return EraStatus(
        int(block), int(used), int(total), int(era), None if held == "-" else int(held)
    )


# --- snapshot ----------------------------------------------------------------------------


class SnapshotState(StrEnum):
    """What a snapshot's status says about it (dm-snap.c snapshot_status, STATUSTYPE_INFO)."""

    ACTIVE = "active"  # valid; usage numbers follow
    INVALID = "Invalid"  # dropped: the COW filled up (origin write) or an I/O error
    MERGE_FAILED = "Merge failed"  # snapshot-merge stopped on an error
    OVERFLOW = "Overflow"  # PO store full: writes to the snapshot fail, reads still work
    UNKNOWN = "Unknown"  # the exception store cannot tell its usage


_SNAPSHOT_USAGE = re.compile(rf"{_UINT}/{_UINT} {_UINT}")


@dataclass(frozen=True)
class SnapshotStatus:
    """`<allocated>/<total> <metadata>` sectors of the COW device, or a state word.

    Allocated counts data and metadata chunks (the persistent store starts with a header
    and a metadata area: 16/16384 16 for a fresh 8 MiB COW with 8-sector chunks); a
    transient (N) store reports metadata 0.
    """

    state: SnapshotState
    allocated_sectors: int | None = None
    total_sectors: int | None = None
    metadata_sectors: int | None = None

    @property
    def valid(self) -> bool:
        """Whether the snapshot still holds the point-in-time image (readable)."""
        return self.state in (SnapshotState.ACTIVE, SnapshotState.OVERFLOW)

    @property
    def full(self) -> bool:
        """Whether the COW ran out of space (Invalid or Overflow)."""
        return self.state in (SnapshotState.INVALID, SnapshotState.OVERFLOW)

    @property
    def free_sectors(self) -> int | None:
        if self.allocated_sectors is None or self.total_sectors is None:
            return None
        return self.total_sectors - self.allocated_sectors


def parse_snapshot_status(params: str) -> SnapshotStatus:
    """Parse the parameters of a snapshot (or snapshot-merge) status line."""
    text = params.strip()
    match = _SNAPSHOT_USAGE.fullmatch(text)
    if match:
        allocated, total, metadata = (int(g) for g in match.groups())
        if allocated > total or metadata > allocated:
            raise ParseError("dm-snapshot status (usage out of range)", params)
        return SnapshotStatus(SnapshotState.ACTIVE, allocated, total, metadata)
    for state in SnapshotState:
        if state is not SnapshotState.ACTIVE and text == state.value:
            return SnapshotStatus(state)
    raise ParseError("dm-snapshot status", params)


# --- mirror ------------------------------------------------------------------------------


class Health(StrEnum):
    """One character per mirror leg or disk log: its most severe error so far.

    Legs (dm-raid1.c device_status_char): A, F, D, S, R, U. Disk log (dm-log.c
    disk_status): A, D (a log write failed), F (a log flush failed).
    """

    ALIVE = "A"  # no failure
    FLUSH_FAILED = "F"  # a flush failed
    WRITE_FAILED = "D"  # dead: a write failed, the leg is out of sync
    SYNC_FAILED = "S"  # resync onto it failed, out of sync
    READ_FAILED = "R"  # a read failed; data unaffected
    UNKNOWN = "U"  # an error of no known type


_LOG_HEALTH = frozenset({Health.ALIVE, Health.WRITE_FAILED, Health.FLUSH_FAILED})


@dataclass(frozen=True)
class MirrorLeg:
    device: str  # MAJOR:MINOR
    health: Health


@dataclass(frozen=True)
class MirrorLogStatus:
    """`1 core` or `3 disk <device> <health>`."""

    kind: str  # "core" or "disk"
    device: str | None = None
    health: Health | None = None

    @property
    def healthy(self) -> bool:
        return self.health in (None, Health.ALIVE)


@dataclass(frozen=True)
class MirrorStatus:
    """`<#legs> <dev>... <in-sync>/<regions> 1 <health chars> <log status>`.

    dm-raid1.c mirror_status (STATUSTYPE_INFO); the log's part from dm-log.c core_status /
    disk_status. A leg marked anything but A stays marked until the table is reloaded.
    """

    legs: tuple[MirrorLeg, ...]
    in_sync_regions: int
    regions: int
    log: MirrorLogStatus

    @property
    def in_sync(self) -> bool:
        return self.in_sync_regions == self.regions

    @property
    def healthy(self) -> bool:
        """Every leg and the log alive (not necessarily in sync)."""
        return all(leg.health is Health.ALIVE for leg in self.legs) and self.log.healthy

    @property
    def failed_legs(self) -> tuple[MirrorLeg, ...]:
        return tuple(leg for leg in self.legs if leg.health is not Health.ALIVE)


_HEALTH = frozenset(h.value for h in Health)
_SYNC = re.compile(rf"{_UINT}/{_UINT}")


def parse_mirror_status(params: str) -> MirrorStatus:
    """Parse the parameters of a mirror status line."""
    tokens = params.split()

    def fail(problem: str) -> ParseError:
        return ParseError(f"dm-mirror status ({problem})", params)

    if not tokens or not re.fullmatch(_UINT, tokens[0]):
        raise fail("no leg count")
    count = int(tokens[0])
    if count < 2 or len(tokens) < count + 4:
        raise fail(f"{count} legs")
    devices = tokens[1 : count + 1]
    sync, nargs, chars, *log = tokens[count + 1 :]
    sync_match = _SYNC.fullmatch(sync)
    if not sync_match:
        raise fail(f"sync count {sync!r}")
    in_sync, regions = (int(g) for g in sync_match.groups())
    if nargs != "1" or len(chars) != count or not set(chars) <= _HEALTH:
        raise fail(f"health {nargs} {chars!r}")
    legs = tuple(
        MirrorLeg(device, Health(char)) for device, char in zip(devices, chars, strict=True)
    )
    if log == ["1", "core"]:
        log_status = MirrorLogStatus("core")
    elif len(log) == 4 and log[:2] == ["3", "disk"] and log[3] in _LOG_HEALTH:
        log_status = MirrorLogStatus("disk", log[2], Health(log[3]))
    else:
        raise fail(f"log status {' '.join(log)!r}")
    return MirrorStatus(legs, in_sync, regions, log_status)


# --- delay -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DelayStatus:
    """I/Os currently held back per class: `<reads> <writes> <flushes>` (dm-delay.c)."""

    reads: int
    writes: int
    flushes: int

    @property
    def in_flight(self) -> int:
        return self.reads + self.writes + self.flushes


_DELAY_STATUS = re.compile(rf"{_UINT} {_UINT} {_UINT}")


def parse_delay_status(params: str) -> DelayStatus:
    match = _DELAY_STATUS.fullmatch(params.strip())
    if not match:
        raise ParseError("dm-delay status", params)
    reads, writes, flushes = (int(g) for g in match.groups())
    return DelayStatus(reads, writes, flushes)


# --- lines -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusLine:
    """One line of `dmsetup status NAME`: start, length, target type, parameters."""

    start: int
    length: int
    target: str
    params: str


_STATUS_LINE = re.compile(rf"{_UINT} {_UINT} ([^ ]+)(?: (.*))?")


def parse_status_line(line: str) -> StatusLine:
    """One status line; `dmsetup` ends a line with a space when the target prints nothing."""
    match = _STATUS_LINE.fullmatch(line.strip())
    if not match:
        raise ParseError("dmsetup status line", line)
    start, length, target, params = match.groups()
    return StatusLine(int(start), int(length), target, params or "")


def parse_status(text: str) -> tuple[StatusLine, ...]:
    """Every line of `dmsetup status NAME` output (a table can have several targets)."""
    return tuple(parse_status_line(line) for line in text.splitlines() if line.strip())


# Targets whose status is always empty (linear, zero, error, snapshot-origin, flakey).
_SILENT = frozenset({"linear", "zero", "error", "snapshot-origin", "flakey"})

TargetStatus = EraStatus | SnapshotStatus | MirrorStatus | DelayStatus | None


def parse_target_status(line: StatusLine) -> TargetStatus:
    """The typed status of one line; None for targets that report nothing."""
    if line.target == "era":
        return parse_era_status(line.params)
    if line.target in ("snapshot", "snapshot-merge"):
        return parse_snapshot_status(line.params)
    if line.target == "mirror":
        return parse_mirror_status(line.params)
    if line.target == "delay":
        return parse_delay_status(line.params)
    if line.target in _SILENT:
        if line.params.strip():
            raise ParseError(f"{line.target} status (expected nothing)", line.params)
        return None
    raise ParseError(f"dmsetup status (unknown target type {line.target!r})", line.params)
