"""The ioctl answers of `dmrepl.kernelops` against the commands they stand in for, on
the real kernel: the same text for every query, the same devices and nodes for every
change."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from dmrepl import dm, kernelops, loop
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Op, command, probe
from dmrepl.probe import loop_devices

INFO_ALL = probe(
    "dmsetup", "info", "-c", "--noheadings", "--separator", "|",
    "-o", "name,uuid,blkdevname,suspended,open",
)  # fmt: skip


class CommandRunner(Runner):
    """Every op as its process, for the reference answers."""

    ioctls = False


def answered(op: Op) -> str:
    result = kernelops.perform(op)
    assert result is not None, f"{op.render()} was not answered by ioctls"
    assert result.exit_code == 0, result.stderr
    return result.stdout


def sorted_lines(text: str) -> list[str]:
    return sorted(text.splitlines())


def test_queries_answer_exactly_what_dmsetup_prints(
    make_loop: Callable[[str, int], str], make_dm: Callable[[str, str], str]
) -> None:
    base = make_loop("base", 8 << 20)
    plain = make_dm("plain", f"0 8192 linear {base} 0\n8192 8192 zero\n")
    era_meta = make_loop("meta", 4 << 20)
    era = make_dm("era", f"0 16384 era {era_meta} {base} 128")
    held = make_dm("held", "0 64 zero")
    reference = CommandRunner()
    reference.run(dm.suspend(os.path.basename(held)))
    try:
        for path in (plain, era, held):
            name = os.path.basename(path)
            for op in (dm.status(name), dm.table(name), dm.info_fields(name, "suspended")):
                assert answered(op) == reference.run(op).stdout, op.render()
        # The whole-system queries list devices in the kernel's order; dmsetup sorts them.
        for op in (INFO_ALL, probe("dmsetup", "table")):
            assert sorted_lines(answered(op)) == sorted_lines(reference.run(op).stdout)
    finally:
        reference.run(dm.resume(os.path.basename(held)))


def test_a_missing_device_fails_like_dmsetup() -> None:
    for op in (dm.status("kt-nosuch"), dm.info_fields("kt-nosuch", "suspended")):
        result = kernelops.perform(op)
        assert result is not None and result.exit_code == 1 and result.stderr
        with pytest.raises(CommandFailed):
            CommandRunner().run(op)


def test_an_empty_device_is_created_noded_and_removed(
    make_loop: Callable[[str, int], str], runner: Runner
) -> None:
    name = f"kt{os.getpid()}-empty"
    node = Path(dm.mapper_path(name))
    answered(dm.create_empty(name, f"{dm.UUID_PREFIX}test-{name}"))
    try:
        # dmsetup cannot name the dm-N of a device that never had a table (the kernel adds
        # its disk at the first load) and fails the whole listing; the ioctls answer.
        (row,) = [r for r in answered(INFO_ALL).splitlines() if r.startswith(f"{name}|")]
        assert row.split("|")[1] == f"{dm.UUID_PREFIX}test-{name}"
        assert row.split("|")[2].startswith("dm-")
        fields = probe(
            "dmsetup", "info", "-c", "--noheadings", "--separator", "|",
            "-o", "name,uuid,suspended,open", name,
        )  # fmt: skip
        assert answered(fields) == CommandRunner().run(fields).stdout
        assert CommandRunner().run(dm.table(name)).stdout == answered(dm.table(name)) == "\n"
        answered(dm.load(name, "0 64 zero"))
        answered(dm.resume(name))
        answered(dm.mknodes(name))
        assert stat.S_ISBLK(node.stat().st_mode)
        assert node.read_bytes()[:512] == bytes(512)
        answered(dm.mknodes(name))  # a right node is left as it is
    finally:
        answered(dm.remove(name))
    assert name not in answered(INFO_ALL)
    assert not os.path.lexists(node)


def test_a_loop_device_is_attached_and_detached_like_losetup(workdir: Path) -> None:
    path = workdir / "backing.img"
    loop.create_sparse_file(path, 1 << 20)
    device = answered(command("losetup", "--find", "--show", str(path))).strip()
    try:
        (found,) = [d for d in loop_devices() if d.node == device]
        assert found.backing_file == str(path)
        with open(device, "r+b") as opened:  # read-write, 1 MiB
            opened.write(b"x" * 512)
            assert opened.seek(0, os.SEEK_END) == 1 << 20
        assert path.read_bytes()[:512] == b"x" * 512
    finally:
        answered(loop.detach(device))
    assert device not in [d.node for d in loop_devices()]
