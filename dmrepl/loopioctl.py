"""Loop devices attached and detached by ioctls, as `losetup --find --show` and
`losetup --detach` do, without their process start. Layout and numbers: the kernel's
include/uapi/linux/loop.h. `dmrepl.kernelops` answers the two `losetup` ops with these.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct

LOOP_CONTROL = "/dev/loop-control"
LOOP_MAJOR = 7
LOOP_CTL_GET_FREE = 0x4C82
LOOP_CLR_FD = 0x4C01
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8 and later; earlier kernels answer EINVAL or ENOTTY
NAME_BYTES = 64  # LO_NAME_SIZE
# struct loop_config: fd, block_size, struct loop_info64, __u64 reserved[8].
# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number,
# encrypt_type, encrypt_key_size, flags (u32); file_name, crypt_name (64 bytes each),
# encrypt_key (32 bytes), init[2] (u64).
LOOP_CONFIG = struct.Struct(f"<II5Q4I{NAME_BYTES}s{NAME_BYTES}s32s2Q64x")
# How often a free device is asked for again when another process took it first.
ATTACH_TRIES = 16


class NotSupported(OSError):
    """The kernel has no LOOP_CONFIGURE: the caller falls back to `losetup`."""


def config_for(backing_fd: int, path: str) -> bytes:
    """A loop_config binding `backing_fd`, read-write, no offset, 512-byte blocks, and
    the path as the device's file name (what `losetup --list` shows, cut to 63 bytes)."""
    name = os.fsencode(path)[: NAME_BYTES - 1]
    return LOOP_CONFIG.pack(backing_fd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, name, b"", b"", 0, 0)


def node(number: int) -> str:
    return f"/dev/loop{number}"


def _open_node(number: int) -> int:
    """Open /dev/loopN, making the node first where no devtmpfs or udev made it."""
    path = node(number)
    if not os.path.exists(path):
        os.mknod(path, 0o660 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, number))
    return os.open(path, os.O_RDWR | os.O_CLOEXEC)


def attach(path: str) -> str:
    """Bind `path` to a free loop device and return the device's node."""
    backing = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    control = os.open(LOOP_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTACH_TRIES):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            device = _open_node(number)
            try:
                fcntl.ioctl(device, LOOP_CONFIGURE, config_for(backing, path))
                return node(number)
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.ENOTTY):
                    raise NotSupported(exc.errno, "LOOP_CONFIGURE") from None
                if exc.errno != errno.EBUSY:  # EBUSY: another process bound it first
                    raise
            finally:
                os.close(device)
        raise OSError(errno.EBUSY, f"no free loop device after {ATTACH_TRIES} tries")
    finally:
        os.close(control)
        os.close(backing)


def detach(device_node: str) -> None:
    """Unbind a loop device (deferred by the kernel until its last opener closes it)."""
    device = os.open(device_node, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(device, LOOP_CLR_FD)
    finally:
        os.close(device)
