"""COW loops a killed cut leaves behind are found in sysfs and detached (issue 13, finding 7)."""

from __future__ import annotations

from pathlib import Path

from dmrepl.cut import cow_file, recover_cows
from dmrepl.probe import LoopDevice, loop_devices
from dmrepl.stack import StackSpec, plan_stack
from tests.unit.factories import device_spec
from tests.unit.test_cut_commands import ScriptedRunner


def fake_loop(
    sys_block: Path, index: int, backing: str | None, holders: tuple[str, ...] = ()
) -> None:
    """/sys/block/loopN as the kernel shows it (no `loop/` directory while detached)."""
    entry = sys_block / f"loop{index}"
    (entry / "holders").mkdir(parents=True)
    for holder in holders:
        (entry / "holders" / holder).touch()
    if backing is not None:
        (entry / "loop").mkdir()
        (entry / "loop" / "backing_file").write_text(backing + "\n")


def test_loop_devices_reads_backing_files_holders_and_deleted_files(tmp_path: Path) -> None:
    fake_loop(tmp_path, 0, "/var/lib/dmrepl/cow/g.d.cow (deleted)")
    fake_loop(tmp_path, 1, None)
    fake_loop(tmp_path, 2, "/srv/disk.img", holders=("dm-3",))
    assert loop_devices(tmp_path) == [
        LoopDevice("/dev/loop0", "/var/lib/dmrepl/cow/g.d.cow", True, ()),
        LoopDevice("/dev/loop2", "/srv/disk.img", False, ("dm-3",)),
    ]


def stacks() -> tuple[StackSpec, ...]:
    return (
        plan_stack(device_spec(name="a"), 2097152, 8192),
        plan_stack(device_spec(name="b"), 2097152, 8192),
        plan_stack(device_spec(name="own", cow="/dev/sdz"), 2097152, 8192),
    )


def test_only_this_groups_unheld_cow_loops_are_detached_and_their_files_removed(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    a, b, own = stacks()
    cow_file(state, a).parent.mkdir(parents=True)
    cow_file(state, b).write_bytes(b"")  # the killed run's file, still there
    attached = [
        LoopDevice("/dev/loop0", str(cow_file(state, a)), True, ()),  # the leak of the issue
        LoopDevice("/dev/loop1", str(cow_file(state, b)), False, ()),
        LoopDevice("/dev/loop2", str(cow_file(state, b)), False, ("dm-7",)),  # a live -pit's
        LoopDevice("/dev/loop3", str(state / "cow" / "other.a.cow"), True, ()),  # other group
        LoopDevice("/dev/loop4", "/dev/sdz", False, ()),  # a configured cow device: not ours
    ]
    runner = ScriptedRunner()
    done = recover_cows(runner, (a, b, own), state, say=lambda _: None, attached=attached)
    assert runner.ops == [
        ("losetup", "--detach", "/dev/loop0"),
        ("losetup", "--detach", "/dev/loop1"),
    ]
    assert not cow_file(state, b).exists()
    assert len(done) == 3 and "deleted" in done[0]


def test_nothing_to_recover_runs_nothing(tmp_path: Path) -> None:
    runner = ScriptedRunner()
    assert recover_cows(runner, stacks(), tmp_path, say=lambda _: None, attached=[]) == []
    assert runner.ops == []
