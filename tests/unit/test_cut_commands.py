"""The commands a cut and a recovery run, against a scripted runner (no kernel needed).

Each dmsetup call is a process start, and whatever runs between the gate's
suspend and resume stalls every writer; these tests pin that sequence.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from dmrepl import dm, dmioctl, probe, sizing
from dmrepl.cut import (
    MetadataFull,
    cut_steps,
    held_cut,
    opened_gate_counters,
    recover,
    wait_for_metadata_room,
)
from dmrepl.errors import ExitCode
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Op, Result
from dmrepl.policy import WriteCounters
from dmrepl.stack import Layer, StackSpec, pit_chunk_sectors, pit_spec, plan_stack
from tests.unit.factories import device_spec

ERA_NOW = 7  # what `dmsetup status <era>` reports after the take


class ScriptedRunner(Runner):
    """Records every op; answers era status queries, succeeds at everything else."""

    ioctls = False  # every op, ioctl or not, is recorded by `run`

    def __init__(self, held_root: str = "-", used: Iterable[int] = ()) -> None:
        super().__init__()
        self.ops: list[tuple[str, ...]] = []
        self.held_root = held_root
        self.used = list(used)  # metadata blocks used, one per status read; then 10

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        self.ops.append(op.argv)
        stdout = ""
        if op.argv[:2] == ("dmsetup", "status") and op.argv[2].endswith("-era"):
            used = self.used.pop(0) if self.used else 10
            stdout = f"0 2097152 era 8 {used}/1024 {ERA_NOW} {self.held_root}\n"
        return Result(op.argv, 0, stdout, "", 0.0)


@pytest.fixture
def stack() -> StackSpec:
    return plan_stack(device_spec(), 2097152, 8192)


def test_writers_stall_only_for_the_seven_steps_of_the_cut(stack: StackSpec) -> None:
    runner = ScriptedRunner()
    gate, era_dev = stack.require(Layer.GATE).name, stack.require(Layer.ERA).name
    origin, pit = stack.require(Layer.ORIGIN).name, f"{stack.device.name}-pit"
    with held_cut(runner, (stack,), cow_for=lambda _: "/dev/loop9", say=lambda _: None) as held:
        room, taken = runner.ops[:1], runner.ops[1:]
    # First, whether dm-era's metadata has room for a cut (wait_for_metadata_room).
    assert room == [("dmsetup", "status", era_dev)]
    # The image's device is made empty before writers stall: no table, nothing registered.
    assert taken[0][:3] == ("dmsetup", "create", pit) and taken[0][-1] == "--notable"
    stalled = taken[1 : taken.index(("dmsetup", "resume", gate)) + 1]
    assert [op[:3] for op in stalled] == [
        ("dmsetup", "suspend", gate),
        ("dmsetup", "message", era_dev),
        ("dmsetup", "suspend", origin),
        ("dmsetup", "load", pit),
        ("dmsetup", "resume", pit),
        ("dmsetup", "resume", origin),
        ("dmsetup", "resume", gate),
    ]
    # After the resume: the image's node (no udev made it here), the era, no suspension probe.
    assert taken[len(stalled) + 1 :] == [
        ("dmsetup", "mknodes", pit),
        ("dmsetup", "status", era_dev),
    ]
    assert held.eras == {stack.device.name: ERA_NOW - 1}
    assert ("dmsetup", "message", era_dev, "0", "drop_metadata_snap") in runner.ops[
        len(taken) + 1 :
    ]
    assert [label for label, _ in held.steps] == [
        f"suspend {gate}",
        "read the gates' write counters",
        f"message {era_dev} take_metadata_snap",
        f"suspend {origin}",
        f"load {pit}",
        f"resume {pit}",
        f"resume {origin}",
        f"resume {gate}",
    ]
    assert abs(sum(seconds for _, seconds in held.steps) - held.stall_s) < 0.05


def test_the_stalled_steps_are_ioctls_and_the_rest_commands(
    stack: StackSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    issued: list[tuple[str, str]] = []

    def issue(request: dmioctl.Request) -> dmioctl.Reply:
        issued.append((request.command.name, request.name))
        return dmioctl.unpack(dmioctl.pack(request))

    monkeypatch.setattr(dmioctl, "issue", issue)
    runner = ScriptedRunner()
    runner.ioctls = True
    with held_cut(runner, (stack,), cow_for=lambda _: "/dev/loop9", say=lambda _: None):
        commands = list(runner.ops)
    gate, pit = stack.require(Layer.GATE).name, f"{stack.device.name}-pit"
    origin, era_dev = stack.require(Layer.ORIGIN).name, stack.require(Layer.ERA).name
    assert issued == [
        ("DEV_SUSPEND", gate),
        ("TARGET_MSG", era_dev),
        ("DEV_SUSPEND", origin),
        ("TABLE_LOAD", pit),
        ("DEV_SUSPEND", pit),
        ("DEV_SUSPEND", origin),
        ("DEV_SUSPEND", gate),
    ]
    assert [op[1] for op in commands] == ["status", "create", "mknodes", "status"]


def test_recover_uses_the_callers_observation(stack: StackSpec) -> None:
    """Nothing to repair: one era status read (for a held snapshot), no re-observation."""
    runner = ScriptedRunner()
    observed = {
        layer.name: dm.ObservedDevice(layer.name, layer.uuid, "dm-0", False, 1, "")
        for layer in stack.layers
    }
    assert recover(runner, (stack,), observed, say=lambda _: None) == []
    assert runner.ops == [("dmsetup", "status", stack.require(Layer.ERA).name)]


def test_recover_resumes_a_suspended_era_device_before_asking_its_status(
    stack: StackSpec,
) -> None:
    runner = ScriptedRunner(held_root="1234")
    era_dev = stack.require(Layer.ERA).name
    observed = {
        layer.name: dm.ObservedDevice(layer.name, layer.uuid, "dm-0", layer.name == era_dev, 1, "")
        for layer in stack.layers
    }
    done = recover(runner, (stack,), observed, say=lambda _: None)
    assert runner.ops == [
        ("dmsetup", "resume", era_dev),
        ("dmsetup", "status", era_dev),
        ("dmsetup", "message", era_dev, "0", "drop_metadata_snap"),
    ]
    assert len(done) == 2


def two_stacks() -> tuple[StackSpec, ...]:
    return tuple(
        plan_stack(device_spec(name=name, origin=f"/dev/{origin}"), 2097152, 8192)
        for name, origin in (("a", "vdb"), ("b", "vdd"))
    )


def test_a_cut_runs_exactly_the_steps_dry_run_prints() -> None:
    stacks = two_stacks()
    runner = ScriptedRunner()
    cows = {"a": "/dev/loop1", "b": "/dev/loop2"}
    with held_cut(runner, stacks, cow_for=lambda s: cows[s.device.name], say=lambda _: None):
        taken = list(runner.ops)
    steps = cut_steps(stacks, cows)
    eras = [("dmsetup", "status", s.require(Layer.ERA).name) for s in stacks]
    assert taken[: len(stacks)] == eras  # the metadata's room, before anything else
    assert taken[len(stacks) : len(stacks) + len(steps)] == [step.op.argv for step in steps]
    released = runner.ops[len(taken) :]
    assert released == [s.release.argv for s in reversed(steps) if s.release is not None]


class FailingRunner(ScriptedRunner):
    def __init__(self, fail_at: tuple[str, ...]) -> None:
        super().__init__()
        self.fail_at = fail_at

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        if op.argv[: len(self.fail_at)] == self.fail_at:
            self.ops.append(op.argv)
            raise CommandFailed(op.argv, 1, "", "device busy")
        return super().run(op, ok_codes=ok_codes)


def test_a_failed_pit_load_resumes_everything_it_suspended_in_reverse() -> None:
    stacks = two_stacks()
    runner = FailingRunner(("dmsetup", "load", "b-pit"))
    cut = held_cut(runner, stacks, cow_for=lambda _: "/dev/loop1", say=lambda _: None)
    with pytest.raises(CommandFailed), cut:
        pytest.fail("the body must not run")
    failed = [op[:3] for op in runner.ops].index(("dmsetup", "load", "b-pit"))
    after = runner.ops[failed + 1 :]
    assert [op[:3] for op in after] == [
        ("dmsetup", "resume", "b-orig"),
        ("dmsetup", "resume", "b"),
        ("dmsetup", "resume", "a"),
        ("dmsetup", "message", "b-era"),
        ("dmsetup", "message", "a-era"),
        ("dmsetup", "remove", "--retry"),
        ("dmsetup", "remove", "--retry"),
    ]
    assert [op[-1] for op in after[3:]] == [
        "drop_metadata_snap", "drop_metadata_snap", "b-pit", "a-pit"
    ]  # fmt: skip


def test_counters_opened_before_the_stall_are_read_anew_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = tmp_path / "253:4" / "stat"
    stat.parent.mkdir()
    stat.write_text("1 0 8 0 5 0 40 0 0 0 0\n")
    opener = probe.open_write_counters
    monkeypatch.setattr(probe, "dev_id_of", {"/dev/mapper/d": "253:4"}.get)
    monkeypatch.setattr(probe, "open_write_counters", lambda path: opener(path, tmp_path))
    with opened_gate_counters(["d", "missing"]) as read:
        assert read() == {"d": WriteCounters(5, 40)}  # a gate not there is left out
        stat.write_text("1 0 8 0 7 0 56 0 0 0 0\n")
        assert read() == {"d": WriteCounters(7, 56)}


@pytest.mark.parametrize(
    ("block_sectors", "chunk_sectors"),
    [(8, 8), (24, 16), (128, 128), (256, 128), (4096, 128)],
)
def test_the_pit_chunk_is_the_era_block_as_a_power_of_two_capped_at_64_kib(
    block_sectors: int, chunk_sectors: int
) -> None:
    stack = plan_stack(device_spec(block_sectors=block_sectors), 2097152, 8192)
    assert pit_chunk_sectors(block_sectors) == chunk_sectors
    pit = pit_spec(stack, "/dev/loop9")
    assert pit.table.endswith(f" snapshot /dev/vdb /dev/loop9 N {chunk_sectors}\n")


# -- room in dm-era's metadata before a cut -----------------------------------------------


def test_a_cut_waits_for_the_digest_when_the_metadata_lacks_room(stack: StackSpec) -> None:
    need = sizing.cut_headroom_blocks(stack.origin_sectors, stack.device.block_sectors)
    short = 1024 - need + 1  # one block too few free
    runner, said = ScriptedRunner(used=[short, short, 10]), []
    with held_cut(runner, (stack,), cow_for=lambda _: "/dev/loop9", say=said.append):
        pass
    era_dev, gate = stack.require(Layer.ERA).name, stack.require(Layer.GATE).name
    assert runner.ops[:3] == [("dmsetup", "status", era_dev)] * 3
    assert runner.ops.index(("dmsetup", "suspend", gate)) == 4  # after the room and the image
    assert said[0] == (
        f"{era_dev}: waiting for dm-era to digest earlier eras"
        f" ({need - 1} metadata blocks free, a cut may need {need})"
    )


def test_a_cut_with_the_writers_held_does_not_wait_and_touches_nothing(stack: StackSpec) -> None:
    runner = ScriptedRunner(used=[1024])
    cut = held_cut(runner, (stack,), say=lambda _: None, gates_held=True)
    with pytest.raises(MetadataFull, match="0 metadata blocks free") as refused, cut:
        pytest.fail("the cut was taken")
    assert refused.value.exit_code == ExitCode.METADATA_FULL == 21
    assert runner.ops == [("dmsetup", "status", stack.require(Layer.ERA).name)]


def test_the_wait_for_room_gives_up_after_its_timeout(stack: StackSpec) -> None:
    runner = ScriptedRunner(used=[1024] * 1000)
    started = time.monotonic()
    with pytest.raises(MetadataFull, match="has not yet digested earlier eras") as refused:
        wait_for_metadata_room(runner, (stack,), say=lambda _: None, timeout_s=0.2, poll_s=0.01)
    assert 0.2 <= time.monotonic() - started < 5
    assert refused.value.hint is not None and "retry later" in refused.value.hint
    assert set(runner.ops) == {("dmsetup", "status", stack.require(Layer.ERA).name)}


def test_every_device_of_the_group_is_checked() -> None:
    stacks = two_stacks()
    runner = ScriptedRunner()
    assert wait_for_metadata_room(runner, stacks, say=lambda _: None) < 1
    assert runner.ops == [("dmsetup", "status", s.require(Layer.ERA).name) for s in stacks]
