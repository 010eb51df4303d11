"""The device-mapper ioctl structures, packed and unpacked without a kernel."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from dmrepl import dm, dmioctl
from dmrepl.dmioctl import HEADER, TARGET_SPEC, Command, Flag, Request
from dmrepl.executor import Runner
from dmrepl.ops import Op
from dmrepl.status import parse_status

NAME_AT = 48  # offsetof(struct dm_ioctl, name)


def test_the_structures_have_the_kernels_sizes_and_numbers() -> None:
    assert HEADER.size == 312  # sizeof(struct dm_ioctl)
    assert TARGET_SPEC.size == 40  # sizeof(struct dm_target_spec)
    assert Command.DEV_SUSPEND.number == 0xC138FD06
    assert Command.TABLE_LOAD.number == 0xC138FD09
    assert Command.TARGET_MSG.number == 0xC138FD0E


def test_a_suspend_is_a_bare_header_with_the_suspend_flag() -> None:
    buffer = dmioctl.pack(Request(Command.DEV_SUSPEND, "ca", flags=Flag.SUSPEND))
    assert len(buffer) == 312
    version, sizes = struct.unpack_from("<3I", buffer), struct.unpack_from("<II", buffer, 12)
    assert version == (4, 0, 0) and sizes == (312, 312)  # data_size, data_start
    assert struct.unpack_from("<I", buffer, 28) == (Flag.SUSPEND,)  # flags
    assert buffer[NAME_AT : NAME_AT + 3] == b"ca\0"


@pytest.mark.parametrize("name", ["", "x" * 128])
def test_a_name_the_kernel_cannot_hold_is_refused(name: str) -> None:
    with pytest.raises(ValueError):
        dmioctl.pack(Request(Command.DEV_STATUS, name))


def test_the_ops_of_a_cut_translate_to_their_ioctls() -> None:
    suspend = dmioctl.request_for(dm.suspend("ca"))
    assert suspend == Request(Command.DEV_SUSPEND, "ca", flags=Flag.SUSPEND)
    assert dmioctl.request_for(dm.resume("ca-orig")) == Request(Command.DEV_SUSPEND, "ca-orig")
    message = dmioctl.request_for(dm.message("ca-era", "take_metadata_snap"))
    assert message is not None and message.command is Command.TARGET_MSG
    assert message.payload == struct.pack("<Q", 0) + b"take_metadata_snap\0"
    load = dmioctl.request_for(dm.load("ca-pit", "0 2048 snapshot /dev/a /dev/b N 8\n"))
    assert load is not None and (load.command, load.target_count) == (Command.TABLE_LOAD, 1)


@pytest.mark.parametrize(
    "op",
    [
        dm.create("ca", "0 8 zero", f"{dm.UUID_PREFIX}x"),
        dm.create_empty("ca-pit", f"{dm.UUID_PREFIX}x"),
        dm.remove("ca"),
        dm.status("ca"),
        dm.info_fields("ca", "suspended"),
        dm.mknodes("ca"),
        Op(("dmsetup", "suspend", "--nolockfs", "ca")),
        Op(("losetup", "--detach", "/dev/loop0")),
    ],
)
def test_any_other_op_stays_a_command(op: Op) -> None:
    assert dmioctl.request_for(op) is None


def test_a_table_packs_one_aligned_spec_per_line() -> None:
    payload, count = dmioctl.pack_table("0 100 linear /dev/a 0\n100 50 zero\n")
    assert count == 2
    start, length, status, following, target = TARGET_SPEC.unpack_from(payload, 0)
    assert (start, length, status, target.rstrip(b"\0")) == (0, 100, 0, b"linear")
    assert following % 8 == 0 and payload[40:49] == b"/dev/a 0\0"
    second = TARGET_SPEC.unpack_from(payload, following)
    assert second[:2] == (100, 50) and second[4].rstrip(b"\0") == b"zero"
    assert payload[following + 40] == 0  # no params: an empty string
    assert len(payload) == following + second[3] and len(payload) % 8 == 0


@pytest.mark.parametrize("table", ["", "0 100\n", "0 100 a-target-type-too-long x\n"])
def test_a_table_without_targets_or_with_a_bad_line_is_refused(table: str) -> None:
    with pytest.raises(ValueError):
        dmioctl.pack_table(table)


def kernel_answer(flags: int, dev: int, targets: list[tuple[int, int, str, str]]) -> bytes:
    """A buffer as the kernel writes it for DM_TABLE_STATUS (`next` from the first spec)."""
    data = b""
    for start, length, target, text in targets:
        body = text.encode() + b"\0"
        body += b"\0" * (-(TARGET_SPEC.size + len(body)) % 8)
        following = len(data) + TARGET_SPEC.size + len(body)
        data += TARGET_SPEC.pack(start, length, 0, following, target.encode()) + body
    header = HEADER.pack(
        4, 48, 0, 312 + len(data), 312, len(targets), 2, flags, 7, 0, dev, b"ca", b"DMREPL-x", b""
    )
    return header + data + b"\0" * 64  # the rest of the caller's buffer


def test_a_reply_unpacks_to_flags_device_and_targets() -> None:
    dev = os.makedev(253, 4)
    lines = [(0, 100, "era", "8 10/1024 7 -"), (100, 8, "zero", "")]
    reply = dmioctl.unpack(kernel_answer(Flag.SUSPEND | Flag.ACTIVE_PRESENT, dev, lines))
    assert reply.version == (4, 48, 0) and reply.suspended and reply.major_minor == (253, 4)
    assert (reply.name, reply.uuid, reply.open_count, reply.event_nr) == ("ca", "DMREPL-x", 2, 7)
    assert dmioctl.unpack_targets(reply) == lines


def test_issue_reports_the_kernels_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.undo()  # the real `issue`, on a control node that is not there
    monkeypatch.setattr(dmioctl, "CONTROL", "/nonexistent/control")
    with pytest.raises(dmioctl.IoctlFailed, match="DEV_STATUS on ca: No such file") as caught:
        dmioctl.issue(Request(Command.DEV_STATUS, "ca"))
    assert caught.value.errno == errno.ENOENT


def test_a_status_read_by_ioctl_is_what_dmsetup_prints(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [(0, 65536, "snapshot", "16/131072 16"), (65536, 8, "zero", "")]
    asked: list[Request] = []

    def kernel(request: Request) -> dmioctl.Reply:
        asked.append(request)
        return dmioctl.unpack(kernel_answer(Flag.ACTIVE_PRESENT, 0, lines))

    monkeypatch.setattr(dmioctl, "issue", kernel)
    text = Runner().run(dm.status("ca-pit")).stdout
    assert text == "0 65536 snapshot 16/131072 16\n65536 8 zero \n"
    assert [line.params for line in parse_status(text)] == ["16/131072 16", ""]
    assert asked == [dmioctl.table_status("ca-pit", table=False)]
