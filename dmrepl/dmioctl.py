"""Device-mapper operations as ioctls on /dev/mapper/control.

Each `dmsetup` is a process start (about 40 ms in user-mode Linux) around one or two
ioctls that take far less. A cut issues its stalled steps here instead: `request_for`
translates exactly the `dmsetup` ops `dmrepl.dm` builds for them (suspend, resume,
message, load) into the ioctl the command would make, so `--dry-run` still prints the
equivalent `dmsetup` commands. The queries below (`devices`, `device`, `targets`) serve
`dmrepl.kernelops`, which answers other `dmsetup` ops the same way. Packing and unpacking
are pure; `issue` is the one function that does I/O. Layout and numbers: the kernel's
include/uapi/linux/dm-ioctl.h.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
import time
from dataclasses import dataclass, replace
from enum import IntEnum

from dmrepl.ops import Op

CONTROL = "/dev/mapper/control"
VERSION = (4, 0, 0)  # the interface major we speak; the kernel answers with its own version
NAME_LEN, UUID_LEN, TYPE_NAME_LEN = 128, 129, 16

# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name, uuid, data[7] (padding; the payload starts after it).
HEADER = struct.Struct(f"<3IIIIiIIIQ{NAME_LEN}s{UUID_LEN}s7s")
TARGET_SPEC = struct.Struct(f"<QQiI{TYPE_NAME_LEN}s")  # sector_start, length, status, next, type
MESSAGE = struct.Struct("<Q")  # struct dm_target_msg: sector, then the NUL-terminated text
NAME_LIST = struct.Struct("<QI")  # struct dm_name_list: dev, next; then the NUL-ended name
OUTPUT_BYTES = 16 * 1024  # room for what the kernel writes back (status text, messages)
MAX_OUTPUT_BYTES = 16 * 1024 * 1024  # a larger answer is refused rather than grown into
# libdevmapper's `remove --retry`: 25 tries 0.2 s apart while the device is busy
# (udev rules or blkid may hold it open for a moment after use).
REMOVE_TRIES, REMOVE_DELAY_S = 25, 0.2


class Command(IntEnum):
    """The DM_*_CMD numbers."""

    VERSION = 0
    LIST_DEVICES = 2
    DEV_CREATE = 3
    DEV_REMOVE = 4
    DEV_SUSPEND = 6  # suspend with SUSPEND, resume without
    DEV_STATUS = 7
    TABLE_LOAD = 9
    TABLE_STATUS = 12
    TARGET_MSG = 14

    @property
    def number(self) -> int:
        """The ioctl request number: _IOWR(0xfd, cmd, struct dm_ioctl)."""
        return (3 << 30) | (HEADER.size << 16) | (0xFD << 8) | int(self)


class Flag:
    READONLY = 1 << 0
    SUSPEND = 1 << 1
    STATUS_TABLE = 1 << 4
    ACTIVE_PRESENT = 1 << 5
    INACTIVE_PRESENT = 1 << 6
    BUFFER_FULL = 1 << 8


@dataclass(frozen=True)
class Request:
    """One ioctl: its command, the device's name and the payload after the header."""

    command: Command
    name: str
    flags: int = 0
    payload: bytes = b""
    uuid: str = ""  # set only by DEV_CREATE
    target_count: int = 0
    output: int = 0  # extra bytes to leave for the kernel's answer


@dataclass(frozen=True)
class Reply:
    """The header the kernel wrote back, and the data after it."""

    version: tuple[int, int, int]
    flags: int
    target_count: int
    open_count: int
    event_nr: int
    dev: int
    name: str
    uuid: str
    data: bytes

    @property
    def suspended(self) -> bool:
        return bool(self.flags & Flag.SUSPEND)

    @property
    def major_minor(self) -> tuple[int, int]:
        return os.major(self.dev), os.minor(self.dev)


class IoctlFailed(OSError):
    """A device-mapper ioctl returned an error."""


def pack(request: Request) -> bytearray:
    """The buffer for `request`: a dm_ioctl header, then the payload, then room to answer."""
    name, uuid = request.name.encode(), request.uuid.encode()
    if (not name and request.command is not Command.LIST_DEVICES) or len(name) >= NAME_LEN:
        raise ValueError(f"dm device name {request.name!r} is empty or too long")
    if len(uuid) >= UUID_LEN:
        raise ValueError(f"dm UUID {request.uuid!r} is too long")
    size = HEADER.size + len(request.payload) + request.output
    header = HEADER.pack(
        *VERSION, size, HEADER.size, request.target_count, 0, request.flags, 0, 0, 0,
        name, uuid, b"",
    )  # fmt: skip
    buffer = bytearray(size)
    buffer[: HEADER.size] = header
    buffer[HEADER.size : HEADER.size + len(request.payload)] = request.payload
    return buffer


def unpack(buffer: bytes | bytearray) -> Reply:
    """What the kernel wrote into a buffer from `pack`."""
    (v0, v1, v2, data_size, data_start, targets, opened, flags, event_nr, _pad, dev, name, uuid,
     _) = HEADER.unpack_from(buffer)  # fmt: skip
    end = min(data_size, len(buffer))
    return Reply(
        (v0, v1, v2), flags, targets, opened, event_nr, dev,
        _cstring(name), _cstring(uuid), bytes(buffer[data_start:end]) if end > data_start else b"",
    )  # fmt: skip


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode()


def pack_table(table: str) -> tuple[bytes, int]:
    """A table's text (`start length type params` per line) as dm_target_specs, and its count.

    Each spec's params are NUL-terminated and padded so the next spec is 8-byte aligned;
    `next` is the offset from this spec to the next one.
    """
    specs = []
    for line in table.splitlines():
        if not line.strip():
            continue
        fields = line.split(maxsplit=3)
        if len(fields) < 3:
            raise ValueError(f"table line {line!r} lacks start, length or target type")
        start, length, target = int(fields[0]), int(fields[1]), fields[2]
        params = (fields[3] if len(fields) > 3 else "").encode() + b"\0"
        padded = params + b"\0" * (-(TARGET_SPEC.size + len(params)) % 8)
        if len(target.encode()) >= TYPE_NAME_LEN:
            raise ValueError(f"target type {target!r} is too long")
        size = TARGET_SPEC.size + len(padded)
        specs.append(TARGET_SPEC.pack(start, length, 0, size, target.encode()) + padded)
    if not specs:
        raise ValueError("a table needs at least one target")
    return b"".join(specs), len(specs)


def unpack_targets(reply: Reply) -> list[tuple[int, int, str, str]]:
    """(start, length, type, text) of each target a DM_TABLE_STATUS reply holds.

    Here `next` counts from the first spec (the kernel's output convention).
    """
    targets, offset = [], 0
    for _ in range(reply.target_count):
        start, length, _status, following, target = TARGET_SPEC.unpack_from(reply.data, offset)
        text_end = reply.data.index(b"\0", offset + TARGET_SPEC.size)
        text = reply.data[offset + TARGET_SPEC.size : text_end].decode()
        targets.append((start, length, _cstring(target), text))
        offset = following
    return targets


def request_for(op: Op) -> Request | None:
    """The ioctl a `dmsetup` op of a cut makes, or None for any other op.

    Covers `suspend NAME`, `resume NAME`, `message NAME SECTOR TEXT` and `load NAME` (table
    on stdin), exactly as `dmrepl.dm` builds them: no option changes what dmsetup would do.
    """
    argv = op.argv
    if len(argv) < 3 or argv[0] != "dmsetup" or argv[2].startswith("-"):
        return None
    verb, name = argv[1], argv[2]
    if verb == "suspend" and len(argv) == 3:
        return Request(Command.DEV_SUSPEND, name, flags=Flag.SUSPEND)
    if verb == "resume" and len(argv) == 3:
        return Request(Command.DEV_SUSPEND, name)
    if verb == "message" and len(argv) >= 5 and argv[3].isdigit():
        text = " ".join(argv[4:]).encode() + b"\0"
        return Request(Command.TARGET_MSG, name, payload=MESSAGE.pack(int(argv[3])) + text)
    if verb == "load" and len(argv) == 3 and op.stdin is not None:
        specs, count = pack_table(op.stdin)
        return Request(Command.TABLE_LOAD, name, payload=specs, target_count=count)
    return None


def unpack_names(reply: Reply) -> list[str]:
    """The device names a DM_LIST_DEVICES reply holds (none: one entry with dev 0).

    Each entry's `next` is the offset from that entry to the following one; 0 ends the list.
    """
    names, offset = [], 0
    while offset + NAME_LIST.size <= len(reply.data):
        dev, following = NAME_LIST.unpack_from(reply.data, offset)
        if dev == 0:
            break
        end = reply.data.index(b"\0", offset + NAME_LIST.size)
        names.append(reply.data[offset + NAME_LIST.size : end].decode())
        if following == 0:
            break
        offset += following
    return names


def info(name: str) -> Request:
    """DM_DEV_STATUS: the device's flags (suspended, tables present), counts and dev_t."""
    return Request(Command.DEV_STATUS, name)


def create(name: str, uuid: str) -> Request:
    """DM_DEV_CREATE: a device with no table (suspended; a load and resume activate it)."""
    return Request(Command.DEV_CREATE, name, uuid=uuid)


def remove(name: str) -> Request:
    return Request(Command.DEV_REMOVE, name)


def list_devices() -> Request:
    return Request(Command.LIST_DEVICES, "", output=OUTPUT_BYTES)


def table_status(name: str, *, table: bool) -> Request:
    """DM_TABLE_STATUS: each target's status line, or its table line with `table`."""
    return Request(
        Command.TABLE_STATUS, name, flags=Flag.STATUS_TABLE if table else 0, output=OUTPUT_BYTES
    )


_opened: dict[str, int] = {}


def _control(path: str) -> int:
    """The control device, opened once per process (an open is a system call, and in
    user-mode Linux every system call is traced)."""
    if path not in _opened:
        _opened[path] = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    return _opened[path]


def issue(request: Request) -> Reply:
    """Issue `request` on the control device; raise `IoctlFailed` with the kernel's errno.

    An answer that did not fit is asked again with twice the room, up to MAX_OUTPUT_BYTES.
    """
    while True:
        buffer = pack(request)
        try:
            fcntl.ioctl(_control(CONTROL), request.command.number, buffer, True)
        except OSError as exc:
            code = exc.errno or errno.EIO
            raise IoctlFailed(
                code, f"{request.command.name} on {request.name}: {os.strerror(code)}"
            ) from None
        reply = unpack(buffer)
        if not reply.flags & Flag.BUFFER_FULL:
            return reply
        if not 0 < request.output < MAX_OUTPUT_BYTES:
            raise IoctlFailed(errno.ENOSPC, f"{request.command.name} on {request.name}: answer cut")
        request = replace(request, output=request.output * 2)


# -- the queries and node handling `dmrepl.kernelops` answers dmsetup ops with


def devices() -> list[str]:
    """The names of every device-mapper device."""
    return unpack_names(issue(list_devices()))


def device(name: str) -> Reply:
    """One device's header: UUID, flags (suspended), open count, dev_t."""
    return issue(info(name))


def targets(name: str, *, table: bool) -> list[tuple[int, int, str, str]]:
    """(start, length, type, status or table text) of each target of the live table."""
    return unpack_targets(issue(table_status(name, table=table)))


def node_path(name: str) -> str:
    return f"{os.path.dirname(CONTROL)}/{name}"


def make_node(name: str) -> None:
    """Make /dev/mapper/NAME the block node of the kernel's device, as `dmsetup mknodes`
    does where no udev made it; a node that is already right is left alone."""
    path, dev = node_path(name), device(name).dev
    try:
        found = os.stat(path)
        if stat.S_ISBLK(found.st_mode) and found.st_rdev == dev:
            return
        os.unlink(path)  # a node of another device, or a dangling link: replaced
    except FileNotFoundError:
        if os.path.islink(path):
            os.unlink(path)
    os.mknod(path, 0o600 | stat.S_IFBLK, dev)


def remove_device(name: str) -> None:
    """Remove the device, retrying while it is busy as `dmsetup remove --retry` does, then
    its /dev/mapper entry (udev removes the ones it made; where it runs, the two agree)."""
    for attempt in range(REMOVE_TRIES):
        try:
            issue(remove(name))
            break
        except IoctlFailed as exc:
            if exc.errno != errno.EBUSY or attempt == REMOVE_TRIES - 1:
                raise
            time.sleep(REMOVE_DELAY_S)
    path = node_path(name)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
