"""Read-only observation of block devices: sysfs, /proc, and the dm-era superblock.

Nothing here runs a command or changes anything.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from dmrepl.errors import DmreplError, ExitCode
from dmrepl.policy import WriteCounters

SYS_DEV_BLOCK = Path("/sys/dev/block")


class DeviceProblem(DmreplError):
    """A device named in the configuration is unusable or unsafe to touch."""

    exit_code = ExitCode.UNSAFE


class DeviceMissing(DmreplError):
    """A device path (configured, or given to `size`) is missing or not a block device."""

    exit_code = ExitCode.DEVICE_MISSING


@dataclass(frozen=True)
class BlockDevice:
    """What the kernel says about one block device node."""

    path: str
    dev_id: str  # "MAJOR:MINOR"
    size_sectors: int
    holders: tuple[str, ...]  # kernel names of devices stacked on it (e.g. dm-3)
    mountpoints: tuple[str, ...]
    disk_id: str  # "MAJOR:MINOR" of the whole disk it belongs to (itself when whole)
    start_sector: int  # where it starts on that disk (0 for a whole disk)

    def overlaps(self, other: BlockDevice, mine: tuple[int, int], theirs: tuple[int, int]) -> bool:
        """Whether sector range `mine` of this device and `theirs` of `other` share disk sectors."""
        if self.disk_id != other.disk_id:
            return False
        a = (self.start_sector + mine[0], self.start_sector + mine[1])
        b = (other.start_sector + theirs[0], other.start_sector + theirs[1])
        return a[0] < b[1] and b[0] < a[1]


def read_small(path: Path) -> str:
    """A small sysfs or procfs file, in three system calls (`Path.read_text` makes about ten,
    each of which costs some 60 µs in user-mode Linux, where they are traced)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


def dev_id_of(path: str) -> str | None:
    """ "MAJOR:MINOR" of a block device node, or None if it is missing or not a block device."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


REPLICA_VIEW_PREFIX = "dmrepl-replica-"  # read-only views of replicas (dmrepl.replica)


def replica_views(holders: tuple[str, ...], sys_block: Path = Path("/sys/block")) -> list[str]:
    """The read-only replica views (`dmrepl replica open`) among a device's holders."""
    views = []
    for holder in holders:
        try:
            name = (sys_block / holder / "dm" / "name").read_text().strip()
        except OSError:
            continue
        if name.startswith(REPLICA_VIEW_PREFIX):
            views.append(name)
    return views


def write_counters(path: str, sys_dev_block: Path = SYS_DEV_BLOCK) -> WriteCounters | None:
    """The block layer's count of completed writes and sectors written to `path` since the
    device was created (fields 5 and 7 of its sysfs `stat`); None if it cannot be read."""
    fd = open_write_counters(path, sys_dev_block)
    if fd is None:
        return None
    try:
        return read_write_counters(fd)
    finally:
        os.close(fd)


def open_write_counters(path: str, sys_dev_block: Path = SYS_DEV_BLOCK) -> int | None:
    """An open descriptor of `path`'s sysfs `stat`, for `read_write_counters` (None: none)."""
    dev_id = dev_id_of(path)
    if dev_id is None:
        return None
    try:
        return os.open(sys_dev_block / dev_id / "stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def read_write_counters(fd: int) -> WriteCounters | None:
    """The counters now, in one system call: a sysfs file read at offset 0 is made anew."""
    try:
        fields = os.pread(fd, 4096, 0).split()
        return WriteCounters(int(fields[4]), int(fields[6]))
    except (OSError, IndexError, ValueError):
        return None


def probe_block_device(path: str, *, role: str) -> BlockDevice:
    """Facts about the block device at `path`; `role` names it in errors (e.g. "origin")."""
    if not os.path.exists(path):
        raise DeviceProblem(f"{role} {path} does not exist", hint="check the path in the config")
    dev_id = dev_id_of(path)
    if dev_id is None:
        raise DeviceProblem(
            f"{role} {path} is not a block device", hint="give a disk, partition, LV or loop device"
        )
    sysfs = SYS_DEV_BLOCK / dev_id  # a link the kernel follows on open
    size = int(read_small(sysfs / "size"))
    try:
        holders = tuple(sorted(os.listdir(sysfs / "holders")))
    except FileNotFoundError:
        holders = ()
    if (sysfs / "partition").exists():
        start = int(read_small(sysfs / "start"))
        disk_id = read_small(sysfs.resolve().parent / "dev").strip()
    else:
        start, disk_id = 0, dev_id
    return BlockDevice(
        path=path,
        dev_id=dev_id,
        size_sectors=size,
        holders=holders,
        mountpoints=tuple(mounts().get(dev_id, ())),
        disk_id=disk_id,
        start_sector=start,
    )


def mounts(mountinfo: Path = Path("/proc/self/mountinfo")) -> dict[str, list[str]]:
    """Mount points by "MAJOR:MINOR" of the mounted device."""
    found: dict[str, list[str]] = {}
    for line in read_small(mountinfo).splitlines():
        fields = line.split()
        found.setdefault(fields[2], []).append(fields[4])
    return found


def swaps(path: Path = Path("/proc/swaps")) -> set[str]:
    """Device ids of active swap devices."""
    ids = set()
    for line in path.read_text().splitlines()[1:]:
        dev = dev_id_of(line.split()[0])
        if dev:
            ids.add(dev)
    return ids


# dm-era superblock (drivers/md/dm-era-target.c, struct superblock_disk, little endian):
# csum u32 @0, flags u32 @4, blocknr u64 @8, uuid[16] @16, magic u64 @32, version u32 @40,
# space map root[128] @44, data_block_size u32 @172, metadata_block_size u32 @176,
# nr_blocks u32 @180, current_era u32 @184, writeset {nr_bits u32, root u64} @188,
# writeset_tree_root u64 @200, era_array_root u64 @208, metadata_snap u64 @216.
ERA_SUPERBLOCK_MAGIC = 2126579579
_SUPERBLOCK = struct.Struct("<32xQI128xIIII24xQ")


class MetadataKind(Enum):
    EMPTY = "empty"  # all zeros: dm-era formats it on first load
    ERA = "era"  # an existing dm-era superblock
    FOREIGN = "foreign"  # anything else: someone's data


@dataclass(frozen=True)
class MetadataHeader:
    kind: MetadataKind
    block_sectors: int = 0
    era_blocks: int = 0
    current_era: int = 0
    snapshot_held: bool = False


def parse_metadata_header(block: bytes) -> MetadataHeader:
    """Classify the first 4 KiB of a metadata area."""
    if not block.strip(b"\0"):
        return MetadataHeader(MetadataKind.EMPTY)
    magic, _version, block_size, _md_block, nr_blocks, era, snap = _SUPERBLOCK.unpack_from(block)
    if magic != ERA_SUPERBLOCK_MAGIC:
        return MetadataHeader(MetadataKind.FOREIGN)
    return MetadataHeader(MetadataKind.ERA, block_size, nr_blocks, era, snap != 0)


def read_metadata_header(path: str, offset_sectors: int) -> MetadataHeader:
    """Read and classify the superblock at `offset_sectors` of `path` (bypassing the cache)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        # The kernel writes metadata with its own buffers; drop ours so we see the disk.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        block = os.pread(fd, 4096, offset_sectors * 512)
    finally:
        os.close(fd)
    return parse_metadata_header(block)


SYS_BLOCK = Path("/sys/block")
_DELETED = " (deleted)"  # what the kernel appends to the name of an unlinked backing file


@dataclass(frozen=True)
class LoopDevice:
    """An attached loop device, as sysfs describes it."""

    node: str  # /dev/loopN
    backing_file: str  # the path it was attached to
    deleted: bool  # that file has been unlinked since (the loop keeps its space)
    holders: tuple[str, ...]  # kernel names of devices stacked on it (e.g. a `-pit`)


def loop_devices(sys_block: Path = SYS_BLOCK) -> list[LoopDevice]:
    """Every attached loop device (a detached one has no `loop/backing_file`)."""
    found = []
    for entry in sorted(sys_block.glob("loop[0-9]*")):
        try:
            name = read_small(entry / "loop" / "backing_file").rstrip("\n")
            holders = tuple(sorted(os.listdir(entry / "holders")))
        except OSError:
            continue  # not attached, or detached while we looked
        deleted = name.endswith(_DELETED)
        found.append(
            LoopDevice(f"/dev/{entry.name}", name.removesuffix(_DELETED), deleted, holders)
        )
    return found
