"""Cuts and change lists on the real kernel: exact blocks, PIT images, recovery after kill -9."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import pytest

from dmrepl import builder, dm, dmioctl, era, loop
from dmrepl.config import DeviceSpec, load_config
from dmrepl.cut import CowOverflow, check_pits, cow_devices, held_cut, recover
from dmrepl.demo import write_random
from dmrepl.executor import CommandFailed, Runner
from dmrepl.sizing import metadata_size
from dmrepl.stack import Layer, pit_spec, plan_stack
from dmrepl.statedir import StateDir
from dmrepl.tables import Zero, single
from tests.kernel.stacks import Bed, read_bytes

MiB = 2**20
BLOCK = 64 * 1024  # the beds' era block
BLOCK_SECTORS = BLOCK // 512


def write_blocks(gate: str, blocks: list[int]) -> None:
    for block in blocks:
        write_random(gate, block * BLOCK + 512, 512)  # one sector inside each block


def changes(bed: Bed, *args: str) -> dict[str, object]:
    result: dict[str, object] = json.loads(bed.cli("changes", bed.group, "--json", *args).stdout)
    return result


def blocks_of(result: dict[str, object], device: str) -> list[int]:
    """The era blocks a `changes --json` result lists for a device."""
    (entry,) = [d for d in result["devices"] if d["device"] == device]  # type: ignore[attr-defined]
    blocks: list[int] = []
    for begin, end in entry["ranges"]:
        blocks += range(begin // BLOCK_SECTORS, -(-end // BLOCK_SECTORS))
    return blocks


@pytest.fixture
def group(bed: Bed) -> Bed:
    bed.add_device("ca")
    bed.add_device("cb")
    bed.cli("up")
    return bed


def test_each_change_list_is_exactly_the_blocks_written_after_the_cut(group: Bed) -> None:
    write_blocks("/dev/mapper/ca", [1, 2, 40])
    first = changes(group)
    assert first["cut"] == 1 and first["since"] == "tracking began"
    assert blocks_of(first, "ca") == [1, 2, 40] and blocks_of(first, "cb") == []

    write_blocks("/dev/mapper/ca", [5])
    write_blocks("/dev/mapper/cb", [7, 8])
    second = changes(group)
    assert second["cut"] == 2 and second["since"].startswith("cut 1")  # type: ignore[union-attr]
    assert blocks_of(second, "ca") == [5] and blocks_of(second, "cb") == [7, 8]

    write_blocks("/dev/mapper/ca", [2, 100])
    third = changes(group, "--since-cut", "1")
    assert blocks_of(third, "ca") == [2, 5, 100]
    assert blocks_of(third, "cb") == [7, 8]

    fourth = changes(group, "--since-cut", "3")
    assert blocks_of(fourth, "ca") == [] and blocks_of(fourth, "cb") == []
    everything = changes(group, "--since-era", "1")
    assert blocks_of(everything, "ca") == [1, 2, 5, 40, 100]

    shown = group.cli("status").stdout
    assert "last cuts of" in shown and "cut 5" in shown
    # Nothing is left held or suspended after a cut.
    for name in ("ca-era", "cb-era"):
        assert era.read_status(group.runner, name).held_root is None


def test_unknown_cut_is_refused_with_the_known_ones(group: Bed) -> None:
    changes(group)
    refused = group.cli("changes", group.group, "--since-cut", "9", check=False)
    assert refused.returncode == 10
    assert "has no cut 9" in refused.stderr and "recorded cuts: 1" in refused.stderr


def test_pit_images_hold_the_cut_while_writers_go_on(group: Bed, workdir: Path) -> None:
    gate = "/dev/mapper/ca"
    write_random(gate, 3 * MiB, MiB)
    before = hashlib.sha256(read_bytes(gate, 0, 32 * MiB)).hexdigest()
    config = load_config(group.config)
    stacks = builder.survey(group.runner, config.select(group.group), check=False).stacks
    cows: dict[str, str] = {}

    def cow_for(stack: builder.StackSpec) -> str:
        path = workdir / f"{stack.device.name}.cow"
        loop.create_sparse_file(path, 32 * MiB)
        cows[stack.device.name] = loop.attach(group.runner, path)
        return cows[stack.device.name]

    try:
        with held_cut(group.runner, stacks, cow_for=cow_for) as held:
            write_random(gate, 3 * MiB, MiB)  # after the cut: the live device moves on
            (pit,) = [d.pit for d in held.devices if d.stack.device.name == "ca"]
            assert pit is not None
            image = hashlib.sha256(read_bytes(pit.path, 0, 32 * MiB)).hexdigest()
            check_pits(group.runner, held)
        assert image == before
        assert hashlib.sha256(read_bytes(gate, 0, 32 * MiB)).hexdigest() != before
        assert not [n for n in dm.observe(group.runner).owned if n.endswith("-pit")]
    finally:
        for device in cows.values():
            group.runner.run_best_effort(loop.detach(device))


# Runs the CLI and kills itself with SIGKILL right after a stalled step (an ioctl, issued by
# `Runner.run_dm`) whose equivalent dmsetup arguments match a glob.
KILL_AFTER_STEP = """
import fnmatch, os, signal, sys
from dmrepl.cli import main
from dmrepl.executor import Runner
pattern, issue = sys.argv[1], Runner.run_dm
def run_dm(self, op):
    result = issue(self, op)
    if fnmatch.fnmatchcase(" ".join(op.argv[1:]), pattern):
        os.kill(os.getpid(), signal.SIGKILL)
    return result
Runner.run_dm = run_dm
sys.argv = ["dmrepl", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize(
    "phase",
    [
        "suspend c[ab]",  # a gate suspended
        "message c[ab]-era 0 take_metadata_snap",  # gates suspended, snapshot held
        "resume ca",  # gates resumed (cb first), snapshots still held
    ],
)
def test_kill_9_during_a_cut_is_repaired_and_loses_no_block(group: Bed, phase: str) -> None:
    write_blocks("/dev/mapper/ca", [3])
    changes(group)  # cut 1 completes
    write_blocks("/dev/mapper/ca", [9, 10])
    write_blocks("/dev/mapper/cb", [11])
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_STEP, phase,
         "changes", group.group, "--config", str(group.config)],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    after = changes(group)
    assert after["recovered"], "nothing was repaired"
    assert blocks_of(after, "ca") == [9, 10] and blocks_of(after, "cb") == [11]
    observed = dm.observe(group.runner).owned
    assert not [n for n, d in observed.items() if d.suspended]
    for name in ("ca-era", "cb-era"):
        assert era.read_status(group.runner, name).held_root is None


def test_stale_pit_and_suspended_origin_are_recovered(group: Bed, workdir: Path) -> None:
    config = load_config(group.config)
    stacks = builder.survey(group.runner, config.select(group.group), check=False).stacks
    path = workdir / "stale.cow"
    loop.create_sparse_file(path, 8 * MiB)
    cow = loop.attach(group.runner, path)
    try:
        stack = stacks[0]
        pit = pit_spec(stack, cow)
        origin = stack.require(Layer.ORIGIN).name
        group.runner.run(dm.suspend(origin))
        group.runner.run(dm.create(pit.name, pit.table, pit.uuid))  # left with -orig suspended
        done = recover(group.runner, stacks, dm.observe(group.runner).owned, say=lambda _: None)
        assert any("resume" in d and origin in d for d in done)
        assert any("remove stale" in d for d in done)
        assert pit.name not in dm.observe(group.runner).owned

        # `down` repairs the same state itself: the stale -pit holds the origin.
        group.runner.run(dm.suspend(origin))
        group.runner.run(dm.create(pit.name, pit.table, pit.uuid))
        down = group.cli("down")
        assert "remove stale" in down.stderr
        assert group.owned() == []
    finally:
        group.runner.run_best_effort(loop.detach(cow))


def stacks_of(bed: Bed) -> tuple[builder.StackSpec, ...]:
    return builder.survey(bed.runner, load_config(bed.config).select(bed.group), check=False).stacks


def test_cow_too_small_for_the_writes_is_detected(group: Bed) -> None:
    group.devices["ca"]["cow_size"] = "1MiB"
    group.write()
    stacks = stacks_of(group)
    with cow_devices(group.runner, stacks, group.workdir / "state") as cow_for:
        with (
            pytest.raises(CowOverflow, match="copy-on-write space ran out") as caught,
            held_cut(group.runner, stacks, cow_for=cow_for, say=lambda _: None) as held,
        ):
            write_random("/dev/mapper/ca", 0, 4 * MiB)  # 4 MiB of COW needed, 1 MiB there
            check_pits(group.runner, held)
        assert "was not used" in caught.value.message
    owned = dm.observe(group.runner).owned
    assert not [n for n in owned if n.endswith("-pit")]
    assert not [n for n, d in owned.items() if d.suspended]
    assert not list(StateDir(group.workdir / "state").cow.iterdir())  # COW files removed


WRITER = """
import mmap, os, struct, sys
buf = mmap.mmap(-1, 4096)
fds = [os.open(p, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC) for p in sys.argv[1:3]]
n = 0
while True:
    n += 1
    buf.seek(0)
    buf.write(struct.pack("<Q", n))
    for fd in fds:  # A, then B: B never gets sequence n before A has it
        os.pwrite(fd, buf, 0)
"""


def sequence(path: str) -> int:
    value: int = struct.unpack("<Q", read_bytes(path, 0, 8))[0]
    return value


def test_group_cut_is_atomic_across_devices(group: Bed) -> None:
    stacks = stacks_of(group)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, "/dev/mapper/ca", "/dev/mapper/cb"])
    seen: list[tuple[int, int]] = []
    try:
        with cow_devices(group.runner, stacks, group.workdir / "state") as cow_for:
            while len(seen) < 8:
                with held_cut(group.runner, stacks, cow_for=cow_for, say=lambda _: None) as held:
                    pits = {d.stack.device.name: d.pit for d in held.devices}
                    a, b = (sequence(pits[name].path) for name in ("ca", "cb"))  # type: ignore[union-attr]
                    check_pits(group.runner, held)
                if a == 0:
                    continue  # the writer has not started yet
                seen.append((a, b))
                assert b <= a <= b + 1, f"cut {len(seen)}: A={a} B={b}"
    finally:
        writer.kill()
        writer.wait()
    assert writer.returncode is not None
    assert [a for a, _ in seen] == sorted(a for a, _ in seen)
    assert seen[-1][0] > seen[0][0], f"the writer made no progress between cuts: {seen}"


# Appends 4 KiB records with an fsync every 16, and starts the file over at 8 MiB so a slow
# guest never fills the 32 MiB filesystem; the count of records written goes to a second file.
APPENDER = """
import os, sys
count = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT)
with open(sys.argv[1], "ab") as log:
    n = 0
    while True:
        n += 1
        log.write(b"%08d " % n + b"x" * 4087)
        if n % 16 == 0:
            log.flush()
            if log.tell() >= 8 << 20:
                log.truncate(0)
                log.seek(0)
            os.fsync(log.fileno())
            os.pwrite(count, b"%012d" % n, 0)
"""


def test_pit_of_a_mounted_ext4_under_writes_is_fsck_clean(group: Bed, workdir: Path) -> None:
    gate = "/dev/mapper/ca"
    subprocess.run(["mkfs.ext4", "-q", gate], check=True)
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    subprocess.run(["mount", gate, str(mountpoint)], check=True)
    count = mountpoint / "count"
    writer = subprocess.Popen([sys.executable, "-c", APPENDER, str(mountpoint / "log"), count])
    results = []
    written = []
    try:
        deadline = time.monotonic() + 60
        while not (count.exists() and int(count.read_bytes() or b"0") > 0):  # writing
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never wrote"
            time.sleep(0.05)
        stacks = stacks_of(group)
        with cow_devices(group.runner, stacks, group.workdir / "state") as cow_for:
            for _ in range(4):
                with held_cut(group.runner, stacks, cow_for=cow_for, say=lambda _: None) as held:
                    (pit,) = [d.pit for d in held.devices if d.stack.device.name == "ca"]
                    assert pit is not None
                    fsck = subprocess.run(
                        ["fsck.ext4", "-fn", pit.path], capture_output=True, text=True
                    )
                    results.append((fsck.returncode, fsck.stdout + fsck.stderr))
                    check_pits(group.runner, held)
                written.append(int(count.read_bytes() or b"0"))
    finally:
        writer.kill()
        writer.wait()
        subprocess.run(["umount", str(mountpoint)], check=False)
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    assert writer.returncode == -9, "the writer died before it was stopped"
    assert written == sorted(written) and written[-1] > written[0], f"no writes: {written}"


class DmsetupRunner(Runner):
    """Issues every step as a `dmsetup` process, as cuts did before the ioctls."""

    ioctls = False


def snapshot_of_the_kernel(bed: Bed) -> dict[str, object]:
    """Every owned device's table and suspension, and what each era device holds."""
    owned = dm.observe(bed.runner).owned
    eras = {
        name: (status.current_era, status.held_root is not None)
        for name in ("ca-era", "cb-era")
        for status in [era.read_status(bed.runner, name)]
    }
    return {
        "tables": {name: d.table for name, d in owned.items()},
        "suspended": sorted(name for name, d in owned.items() if d.suspended),
        "eras": eras,
    }


def test_the_ioctl_cut_leaves_the_kernel_as_the_dmsetup_cut_does(group: Bed) -> None:
    stacks = stacks_of(group)
    seen: dict[str, list[dict[str, object]]] = {}
    with cow_devices(group.runner, stacks, group.workdir / "state") as cow_for:
        for way, runner in (("dmsetup", DmsetupRunner()), ("ioctl", group.runner)):
            before = snapshot_of_the_kernel(group)
            with held_cut(runner, stacks, cow_for=cow_for, say=lambda _: None) as held:
                inside = snapshot_of_the_kernel(group)
                for cut in held.devices:  # the image has its node and reads the cut
                    assert cut.pit is not None and Path(cut.pit.path).is_block_device()
                    read_bytes(cut.pit.path, 0, 4096)
                    # The ioctl readers agree with dmsetup on the real kernel.
                    reply = dmioctl.issue(dmioctl.info(cut.pit.name))
                    assert not reply.suspended and reply.flags & dmioctl.Flag.ACTIVE_PRESENT
                    answer = dmioctl.issue(dmioctl.table_status(cut.pit.name, table=True))
                    (start, length, target, params) = dmioctl.unpack_targets(answer)[0]
                    assert f"{start} {length} {target} {params}" == inside["tables"][cut.pit.name]  # type: ignore[index]
            after = snapshot_of_the_kernel(group)
            seen[way] = [before, inside, after]
    dmsetup_way, ioctl_way = seen["dmsetup"], seen["ioctl"]
    for state in (dmsetup_way, ioctl_way):
        before, inside, after = state
        assert inside["suspended"] == [] and after == {**before, "eras": after["eras"]}
        assert {n: e for n, (e, _) in after["eras"].items()} == {  # type: ignore[attr-defined]
            n: e + 1
            for n, (e, _) in before["eras"].items()  # type: ignore[attr-defined]
        }
        assert all(held for _, held in inside["eras"].values())  # type: ignore[attr-defined]
        assert not any(held for _, held in after["eras"].values())  # type: ignore[attr-defined]
    assert dmsetup_way[1]["tables"] == ioctl_way[1]["tables"]  # the -pit tables included
    assert dmsetup_way[2]["tables"] == ioctl_way[2]["tables"] == dmsetup_way[0]["tables"]


def test_a_failure_inside_the_stall_undoes_every_step(group: Bed) -> None:
    """The -pit's table load fails in the kernel (its COW device is not there) after both
    gates were suspended, both metadata snapshots taken and ca-orig suspended."""
    stacks = stacks_of(group)
    before = snapshot_of_the_kernel(group)
    with (
        pytest.raises(CommandFailed, match="dmsetup load ca-pit"),
        held_cut(group.runner, stacks, cow_for=lambda _: "/dev/mapper/none", say=lambda _: None),
    ):
        pytest.fail("the body must not run")
    after = snapshot_of_the_kernel(group)
    assert after["suspended"] == [] and after["tables"] == before["tables"]  # no -pit either
    assert not any(held for _, held in after["eras"].values())  # type: ignore[attr-defined]
    write_blocks("/dev/mapper/cb", [4])  # writers go on, and the next cut sees the write
    assert blocks_of(changes(group), "cb") == [4]


def test_cuts_faster_than_the_digest_wait_and_never_fill_the_metadata(
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    """16 TiB in 2 MiB era blocks: dm-era digests each archived writeset (8 Mi bits) in
    about 0.3 s, a cut takes about 20 ms. On metadata of exactly the size dmrepl requires,
    90 back-to-back cuts would pile up archived writesets of 261 blocks each until it is full
    (room for about 74 above the steady state; dm-era then fails writes). The cut waits for
    the digest instead."""
    origin_sectors, block_sectors = 16 * 2**40 // 512, 4096
    size = metadata_size(origin_sectors, block_sectors)
    zero = make_dm("pile-zero", single(origin_sectors, Zero()))
    metadata = make_loop("pile-meta", size.required_sectors * 512)
    device = DeviceSpec(
        group="pile", name=f"kt{os.getpid()}pile", origin=zero, metadata=metadata,
        metadata_offset=0, metadata_size=None, block_sectors=block_sectors, cow=None,
        cow_sectors=None, mirror=None,
    )  # fmt: skip
    stack = plan_stack(device, origin_sectors, size.required_sectors)
    for layer in stack.layers:  # removed in reverse at teardown
        runner.run(dm.create(layer.name, layer.table, layer.uuid))
        cleanup.callback(runner.run_best_effort, dm.remove(layer.name))
    gate, era_dev = stack.require(Layer.GATE).path, stack.require(Layer.ERA).name
    said: list[str] = []
    fullest = 0
    for cut in range(90):
        write_random(gate, (cut % 16) * 2**40, 4096)  # one era block a TiB apart
        with held_cut(runner, (stack,), say=said.append):
            status = era.read_status(runner, era_dev, checked=False)
            fullest = max(fullest, status.metadata_used_blocks)
    waits = [line for line in said if "waiting for dm-era to digest earlier eras" in line]
    assert waits, "no cut waited: the pile-up this test needs did not happen"
    assert fullest < status.metadata_total_blocks == size.worst_blocks
    write_random(gate, 17 * 2**40 // 2 + 4096, 4096)  # dm-era still takes writes
    assert not era.read_status(runner, era_dev, checked=False).snapshot_held  # and answers
