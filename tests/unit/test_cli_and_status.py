"""CLI refusals that need no kernel, status warnings, and the udev waiter without udev."""

from __future__ import annotations

import os

import pytest

from dmrepl import udev
from dmrepl.builder import metadata_warnings
from dmrepl.status import EraStatus
from tests.clirun import run_cli_here


def test_metadata_warning_from_three_quarters_full() -> None:
    calm = EraStatus(8, 700, 1024, 3, None)
    assert metadata_warnings("d-era", calm) == []
    full = EraStatus(8, 800, 1024, 3, None)
    (warning,) = metadata_warnings("d-era", full)
    assert "78% used (800/1024 blocks)" in warning and "fails writes" in warning
    held = EraStatus(8, 10, 1024, 3, 45)
    assert metadata_warnings("d-era", held) == ["d-era: a metadata snapshot is held (root 45)"]


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
