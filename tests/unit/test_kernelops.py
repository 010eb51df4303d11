"""`dmrepl.kernelops` over a fake kernel: which ops become ioctls, and the text they answer
with (checked against dmsetup itself on the real kernel in tests/kernel/test_kernelops.py)."""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmrepl import dm, dmioctl, kernelops, loop, loopioctl
from dmrepl.dmioctl import NAME_LIST, TARGET_SPEC, Command, Flag, Reply, Request
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Op, command, probe

INFO_ALL = probe(
    "dmsetup", "info", "-c", "--noheadings", "--separator", "|",
    "-o", "name,uuid,blkdevname,suspended,open",
)  # fmt: skip


@dataclass
class FakeDevice:
    uuid: str
    minor: int
    suspended: bool = False
    opened: int = 0
    status: list[tuple[int, int, str, str]] = field(default_factory=list)
    table: list[tuple[int, int, str, str]] = field(default_factory=list)


def target_specs(targets: list[tuple[int, int, str, str]]) -> bytes:
    """DM_TABLE_STATUS output: specs whose `next` counts from the first one."""
    data = b""
    for start, length, kind, text in targets:
        body = text.encode() + b"\0"
        body += b"\0" * (-(TARGET_SPEC.size + len(body)) % 8)
        following = len(data) + TARGET_SPEC.size + len(body)
        data += TARGET_SPEC.pack(start, length, 0, following, kind.encode()) + body
    return data


def name_list(devices: dict[str, FakeDevice]) -> bytes:
    """DM_LIST_DEVICES output: dev, offset to the next entry, the name (8-byte aligned)."""
    if not devices:
        return NAME_LIST.pack(0, 0)
    entries = []
    for index, (name, device) in enumerate(devices.items()):
        body = name.encode() + b"\0"
        body += b"\0" * (-(NAME_LIST.size + len(body)) % 8)
        following = 0 if index == len(devices) - 1 else NAME_LIST.size + len(body)
        entries.append(NAME_LIST.pack(os.makedev(254, device.minor), following) + body)
    return b"".join(entries)


class FakeKernel:
    def __init__(self, devices: dict[str, FakeDevice]):
        self.devices = devices
        self.vanished: dict[str, FakeDevice] = {}  # listed, then removed before the next ask
        self.issued: list[tuple[Command, str]] = []

    def issue(self, request: Request) -> Reply:
        dmioctl.pack(request)  # as the real one does: refuses what the kernel cannot hold
        self.issued.append((request.command, request.name))
        if request.command is Command.LIST_DEVICES:
            listed = {**self.devices, **self.vanished}
            return self.reply("", FakeDevice("", 0), name_list(listed), 0)
        if request.command is Command.DEV_CREATE:
            self.devices[request.name] = FakeDevice(request.uuid, 40 + len(self.devices))
        device = self.devices.get(request.name)
        if device is None:
            raise dmioctl.IoctlFailed(errno.ENXIO, os.strerror(errno.ENXIO))
        if request.command is Command.TABLE_STATUS:
            targets = device.table if request.flags & Flag.STATUS_TABLE else device.status
            return self.reply(request.name, device, target_specs(targets), len(targets))
        return self.reply(request.name, device, b"", 0)

    @staticmethod
    def reply(name: str, device: FakeDevice, data: bytes, count: int) -> Reply:
        flags = Flag.SUSPEND if device.suspended else 0
        dev = os.makedev(254, device.minor)
        return Reply((4, 47, 0), flags, count, device.opened, 0, dev, name, device.uuid, data)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel(
        {
            "ca": FakeDevice(
                "DMREPL-gate-g.ca", 3, opened=1, table=[(0, 2048, "linear", "254:2 0")],
                status=[(0, 2048, "linear", "")],
            ),
            "ca-era": FakeDevice(
                "DMREPL-era-g.ca", 2, suspended=True, table=[(0, 2048, "era", "7:1 7:0 128")],
                status=[(0, 2048, "era", "8 5/1024 3 -")],
            ),
            "other": FakeDevice("", 7, table=[(0, 10, "zero", ""), (10, 5, "error", "")]),
            "ca-pit": FakeDevice("DMREPL-pit-g.ca", 9),  # created, never loaded
        }
    )  # fmt: skip
    monkeypatch.setattr(dmioctl, "issue", fake.issue)
    return fake


def answer(op: Op) -> str:
    result = kernelops.perform(op)
    assert result is not None and result.exit_code == 0, result
    return result.stdout


def test_status_and_table_print_one_line_per_target_as_dmsetup_does(kernel: FakeKernel) -> None:
    assert answer(dm.status("ca-era")) == "0 2048 era 8 5/1024 3 -\n"
    assert answer(dm.status("ca")) == "0 2048 linear \n"  # dmsetup's trailing space
    assert answer(dm.table("other")) == "0 10 zero \n10 5 error \n"
    assert answer(dm.table("ca-pit")) == "\n"  # no table loaded: an empty line


def test_the_whole_system_listings_cover_every_device(kernel: FakeKernel) -> None:
    assert answer(INFO_ALL).splitlines() == [
        "ca|DMREPL-gate-g.ca|dm-3|Active|1",
        "ca-era|DMREPL-era-g.ca|dm-2|Suspended|0",
        "other||dm-7|Active|0",
        "ca-pit|DMREPL-pit-g.ca|dm-9|Active|0",
    ]
    assert answer(probe("dmsetup", "table")).splitlines() == [
        "ca: 0 2048 linear 254:2 0",
        "ca-era: 0 2048 era 7:1 7:0 128",
        "other: 0 10 zero ",
        "other: 10 5 error ",
        "ca-pit: ",
    ]
    assert answer(dm.info_fields("ca-era", "suspended")) == "Suspended\n"


def test_observe_reads_the_same_devices_through_the_ioctls(kernel: FakeKernel) -> None:
    seen = dm.observe(Runner())
    assert sorted(seen.owned) == ["ca", "ca-era", "ca-pit"]
    assert seen.owned["ca-era"].suspended and seen.owned["ca-era"].kernel_name == "dm-2"
    assert seen.owned["ca"].table == "0 2048 linear 254:2 0" and seen.owned["ca"].open_count == 1
    assert seen.names["other"] == ""


def test_a_device_removed_while_listing_is_left_out(kernel: FakeKernel) -> None:
    kernel.vanished["other"] = kernel.devices.pop("other")
    assert "other" not in answer(INFO_ALL)
    assert "other" not in answer(probe("dmsetup", "table"))


def test_an_empty_system_says_so_as_dmsetup_does(kernel: FakeKernel) -> None:
    kernel.devices.clear()
    assert answer(INFO_ALL) == "No devices found\n"
    assert dm.observe(Runner()).names == {}


def test_a_missing_device_fails_as_the_command_would(kernel: FakeKernel) -> None:
    result = kernelops.perform(dm.status("nosuch"))
    assert result is not None and result.exit_code == 1 and "No such device" in result.stderr
    with pytest.raises(CommandFailed) as failed:
        Runner().run(dm.info_fields("nosuch", "suspended"))
    assert failed.value.argv[:2] == ("dmsetup", "info")


def test_a_name_the_kernel_cannot_hold_fails_as_the_command_would(kernel: FakeKernel) -> None:
    result = kernelops.perform(dm.status("x" * 200))
    assert result is not None and result.exit_code == 1 and "too long" in result.stderr


def test_changes_issue_the_ioctls_dmsetup_makes(kernel: FakeKernel) -> None:
    answer(dm.create_empty("ca-pit2", "DMREPL-pit-g.ca2"))
    answer(dm.message("ca-era", "drop_metadata_snap"))
    assert kernel.issued == [(Command.DEV_CREATE, "ca-pit2"), (Command.TARGET_MSG, "ca-era")]
    assert kernel.devices["ca-pit2"].uuid == "DMREPL-pit-g.ca2"


@pytest.mark.parametrize(
    "op",
    [
        dm.create("ca", "0 8 zero", f"{dm.UUID_PREFIX}x"),  # a create with a table
        dm.create_readonly("ca", "0 8 zero", f"{dm.UUID_PREFIX}x"),
        dm.remove_deferred("ca"),
        probe("dmsetup", "status", "--target", "era", "ca"),
        probe("dmsetup", "info", "-c", "--noheadings", "--separator", "|", "-o", "major", "ca"),
        probe("dmsetup", "targets"),
        command("losetup", "--find", "--show", "--read-only", "/tmp/x"),
        command("losetup", "--list"),
        probe("blockdev", "--getsz", "/dev/loop0"),
    ],
)
def test_any_other_op_runs_as_its_command(op: Op) -> None:
    assert kernelops.perform(op) is None


def test_losetup_ops_become_loop_ioctls(monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[str] = []
    monkeypatch.setattr(loopioctl, "attach", lambda path: done.append(path) or "/dev/loop5")
    monkeypatch.setattr(loopioctl, "detach", done.append)
    assert loop.attach(Runner(), Path("/tmp/cow.img")) == "/dev/loop5"
    Runner().run(loop.detach("/dev/loop5"))
    assert done == ["/tmp/cow.img", "/dev/loop5"]


def test_a_kernel_without_loop_configure_falls_back_to_losetup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def old_kernel(path: str) -> str:
        raise loopioctl.NotSupported(errno.EINVAL, "LOOP_CONFIGURE")

    monkeypatch.setattr(loopioctl, "attach", old_kernel)
    assert kernelops.perform(command("losetup", "--find", "--show", "/tmp/cow.img")) is None


def test_the_loop_config_has_the_kernels_layout() -> None:
    packed = loopioctl.config_for(7, "/var/lib/dmrepl/cow/g.ca.cow")
    assert len(packed) == 304  # sizeof(struct loop_config)
    assert struct.unpack_from("<II", packed) == (7, 0)  # fd, block_size (default)
    assert packed[64:92] == b"/var/lib/dmrepl/cow/g.ca.cow"  # info.lo_file_name
    assert packed[92] == 0
    long_name = loopioctl.config_for(3, "/" + "x" * 100)
    assert long_name[64 + 63] == 0  # cut to 63 bytes and NUL-terminated
