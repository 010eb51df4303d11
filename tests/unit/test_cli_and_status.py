"""CLI refusals that need no kernel, status warnings, and the udev waiter without udev."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pytest

from dmrepl import builder, dm, udev
from dmrepl.builder import metadata_warnings
from dmrepl.executor import Runner
from dmrepl.ops import Op, Result
from dmrepl.stack import Layer, plan_stack
from dmrepl.status import EraStatus, Health
from tests.clirun import run_cli_here
from tests.unit.factories import device_spec


def test_metadata_warning_from_three_quarters_full() -> None:
    calm = EraStatus(8, 700, 1024, 3, None)
    assert metadata_warnings("d-era", calm) == []
    full = EraStatus(8, 800, 1024, 3, None)
    (warning,) = metadata_warnings("d-era", full)
    assert "78% used (800/1024 blocks)" in warning and "fails writes" in warning
    held = EraStatus(8, 10, 1024, 3, 45)
    assert metadata_warnings("d-era", held) == ["d-era: a metadata snapshot is held (root 45)"]


class MirrorLayerRunner(Runner):
    """Answers `dmsetup status` of the mirror layer with `line`; runs nothing else."""

    def __init__(self, line: str) -> None:
        super().__init__()
        self.line = line

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        assert op.argv[:2] == ("dmsetup", "status") and op.argv[2].endswith("-mirror"), op.argv
        return Result(op.argv, 0, self.line, "", 0.0)


def observed_layer(name: str) -> dm.ObservedDevice:
    return dm.ObservedDevice(name, "", "dm-3", suspended=False, open_count=1, table="")


def test_a_mirror_layer_running_as_a_linear_has_no_mirror_status() -> None:
    """A synchronous site's mirror layer is a linear until a replica joins: status shows the
    stack, not a parse error."""
    stack = plan_stack(device_spec(sync_replicas=("/dev/vde",)), 2097152, 8192)
    name = stack.require(Layer.MIRROR).name
    linear = MirrorLayerRunner("0 2097152 linear \n")
    assert builder._mirror_state(linear, stack, {name: observed_layer(name)}) is None
    mirror = MirrorLayerRunner("0 2097152 mirror 2 254:16 254:64 1024/1024 1 AD 1 core\n")
    shown = builder._mirror_state(mirror, stack, {name: observed_layer(name)})
    assert shown is not None and [leg.health for leg in shown.legs] == [
        Health.ALIVE,
        Health.WRITE_FAILED,
    ]


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_mutating_and_probing_commands_need_root(
    command: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    code, _out, err = run_cli_here(command, "--config", "/nonexistent.toml")
    assert code == 5
    assert "must run as root" in err and "sudo" in err


def test_size_command_prints_json_and_rejects_bad_block_size() -> None:
    code, out, _ = run_cli_here("size", "1TiB", "--block-size", "2MiB", "--json")
    assert code == 0
    assert '"era_blocks": 524288' in out and '"provision_sectors": 14336' in out
    code, _, err = run_cli_here("size", "16T", "--block-size", "12s")
    assert code == 10
    assert "not a multiple of 8 sectors" in err


def test_node_waiter_without_udev_times_out_with_a_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udev, "UDEV_CONTROL", udev.Path("/nonexistent/udev/control"))
    with udev.NodeWaiter(timeout_s=0.1) as waiter, pytest.raises(udev.NodeTimeout) as caught:
        waiter.wait("no-such-dmrepl-device")
    assert "did not appear within 0.1 s" in caught.value.message
    assert "dmsetup mknodes" in (caught.value.hint or "")
