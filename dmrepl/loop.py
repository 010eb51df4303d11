"""Loop devices on sparse files, for the demo, tests and benchmarks."""

from __future__ import annotations

import os
from pathlib import Path

from dmrepl import safefile
from dmrepl.executor import Runner
from dmrepl.ops import Op, command, probe


def create_sparse_file(path: Path, size_bytes: int) -> None:
    """Create a new sparse file of `size_bytes`, 0600 (replacing whatever was at `path`;
    a symlink there is removed, never followed)."""
    fd = safefile.replace_new(path)
    try:
        os.ftruncate(fd, size_bytes)
    finally:
        os.close(fd)


def attach(runner: Runner, path: Path) -> str:
    """Attach `path` to a free loop device and return its node (e.g. /dev/loop0)."""
    device = runner.run(command("losetup", "--find", "--show", str(path))).stdout.strip()
    if not device.startswith("/dev/"):
        raise RuntimeError(f"losetup printed {device!r} instead of a device node")
    return device


def detach(device: str) -> Op:
    return command("losetup", "--detach", device)


def device_sectors(runner: Runner, device: str) -> int:
    """Size of a block device in 512-byte sectors."""
    return int(runner.run(probe("blockdev", "--getsz", device)).stdout.strip())


def kernel_has_device_mapper(modules: Path = Path("/lib/modules")) -> bool:
    """Whether we are root and the running kernel has device-mapper (loaded, or loadable).

    /dev/mapper/control is no evidence: libdevmapper creates that node even when
    the kernel lacks the driver.
    """
    if os.geteuid() != 0:
        return False
    if Path("/sys/module/dm_mod").exists():
        return True
    release = modules / os.uname().release
    for index in ("modules.builtin", "modules.dep"):
        path = release / index
        if path.exists() and "/dm-mod.ko" in path.read_text():
            return True
    return False
