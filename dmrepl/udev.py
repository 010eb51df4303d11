"""Waiting for /dev/mapper nodes: through udev when it runs, by polling when it does not.

The only module that imports pyudev. The monitor is started before the devices
are created so no event can be missed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import TracebackType

import pyudev

from dmrepl.errors import DmreplError

UDEV_CONTROL = Path("/run/udev/control")


class NodeTimeout(DmreplError):
    """A device node did not appear in time."""


class NodeWaiter:
    """Context manager: `wait(name)` returns once /dev/mapper/<name> is usable."""

    def __init__(self, timeout_s: float = 15.0):
        self.timeout_s = timeout_s
        self.udev_running = UDEV_CONTROL.exists()
        self.context: pyudev.Context | None = None
        self.monitor: pyudev.Monitor | None = None

    def __enter__(self) -> NodeWaiter:
        if self.udev_running:
            self.context = pyudev.Context()
            self.monitor = pyudev.Monitor.from_netlink(self.context)
            self.monitor.filter_by("block")
            self.monitor.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.monitor = None
        self.context = None

    def wait(self, name: str) -> None:
        path = f"/dev/mapper/{name}"
        deadline = time.monotonic() + self.timeout_s
        while not self._ready(path):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NodeTimeout(
                    f"{path} did not appear within {self.timeout_s:g} s",
                    hint="check udev (`udevadm settle`, `systemctl status systemd-udevd`) "
                    "or create the node with `dmsetup mknodes`",
                )
            if self.monitor is not None:
                self.monitor.poll(timeout=min(remaining, 0.2))
            else:
                time.sleep(0.02)

    def _ready(self, path: str) -> bool:
        if not os.path.exists(path):
            return False
        if self.context is None:
            return True  # no udev: libdevmapper made the node itself
        try:
            device = pyudev.Devices.from_device_file(self.context, path)
        except (pyudev.DeviceNotFoundError, ValueError):
            return False
        return bool(device.is_initialized)
