"""The commands a cut and a recovery run, against a scripted runner (no kernel needed).

Each dmsetup call is a process start, and whatever runs between the gate's
suspend and resume stalls every writer; these tests pin that sequence.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from dmrepl import dm
from dmrepl.cut import held_cut, recover
from dmrepl.executor import Runner
from dmrepl.ops import Op, Result
from dmrepl.stack import Layer, StackSpec, plan_stack
from tests.unit.factories import device_spec

ERA_NOW = 7  # what `dmsetup status <era>` reports after the take


class ScriptedRunner(Runner):
    """Records every op; answers era status queries, succeeds at everything else."""

    def __init__(self, held_root: str = "-") -> None:
        super().__init__()
        self.ops: list[tuple[str, ...]] = []
        self.held_root = held_root

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        self.ops.append(op.argv)
        stdout = ""
        if op.argv[:2] == ("dmsetup", "status") and op.argv[2].endswith("-era"):
            stdout = f"0 2097152 era 8 10/1024 {ERA_NOW} {self.held_root}\n"
        return Result(op.argv, 0, stdout, "", 0.0)


@pytest.fixture
def stack() -> StackSpec:
    return plan_stack(device_spec(), 2097152, 8192)


def test_writers_stall_only_for_the_six_commands_of_the_cut(stack: StackSpec) -> None:
    runner = ScriptedRunner()
    gate, era_dev = stack.require(Layer.GATE).name, stack.require(Layer.ERA).name
    origin = stack.require(Layer.ORIGIN).name
    with held_cut(runner, (stack,), cow_for=lambda _: "/dev/loop9", say=lambda _: None) as held:
        taken = list(runner.ops)
    stalled = taken[: taken.index(("dmsetup", "resume", gate)) + 1]
    assert [op[:3] for op in stalled] == [
        ("dmsetup", "suspend", gate),
        ("dmsetup", "message", era_dev),
        ("dmsetup", "suspend", origin),
        ("dmsetup", "create", f"{stack.device.name}-pit"),
        ("dmsetup", "resume", origin),
        ("dmsetup", "resume", gate),
    ]
    # The era is read after the resume, without a second suspension probe.
    assert taken[len(stalled) :] == [("dmsetup", "status", era_dev)]
    assert held.eras == {stack.device.name: ERA_NOW - 1}
    assert ("dmsetup", "message", era_dev, "0", "drop_metadata_snap") in runner.ops[len(taken) :]


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
