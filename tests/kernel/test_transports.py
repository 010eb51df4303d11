"""The cycle drives any registered transport: a site kept in this process's memory (the
smallest transport there is) is seeded with a full image and then follows the chain,
and a down one is reported while the others go on."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl import dm
from tests.kernel.stacks import Bed
from tests.kernel.test_dataloss import tree
from tests.kernel.test_replicate import digest, pit_digests, sync, write_raw
from tests.memory_transport import MemorySite, registered

__all__ = ["pit_digests"]  # a fixture used here


@pytest.fixture
def memory() -> Iterator[None]:
    with registered():
        yield


def test_a_memory_site_is_seeded_then_follows_the_chain(
    memory: None, bed: Bed, pit_digests: list[dict[str, str]]
) -> None:
    bed.add_device("ma", origin_mib=16)
    bed.add_device("mb", origin_mib=8)
    bed.add_site("ram", transport="memory")
    bed.add_site("gone", transport="memory", reachable=False)
    bed.cli("up")
    write_raw("/dev/mapper/ma", [0, 5, 100])
    for cycle in range(3):
        result = sync(bed, check=False)
        assert result.returncode == 17, result.stdout + result.stderr  # "gone" is down
        assert "site gone: down, holds none" in result.stdout, result.stdout
        assert "site ram: in sync" in result.stdout, result.stdout
        replicas = MemorySite.held_by_site[f"group.{bed.group}.site.ram"]
        assert replicas.cut == cycle + 1
        for device in ("ma", "mb"):
            held = hashlib.sha256(replicas.images[device]).hexdigest()
            assert held == pit_digests[-1][device], (cycle, device)
        write_raw("/dev/mapper/mb", [cycle, 7 + cycle])
    assert digest("/dev/mapper/ma") == pit_digests[-1]["ma"]
    status = bed.cli("status", check=False).stdout
    assert f"site {bed.group}/ram (memory, asynchronous): in sync; holds cut 3" in status
    assert f"site {bed.group}/gone (memory, asynchronous): down" in status


def kernel_state(bed: Bed) -> dict[str, tuple[bool, str]]:
    """Every dm device: suspended?, live table."""
    return {n: (d.suspended, d.table) for n, d in dm.observe(bed.runner).owned.items()}


def test_dry_run_changes_nothing_and_says_what_sync_then_does(bed: Bed, workdir: Path) -> None:
    bed.add_device("da", origin_mib=16)
    bed.add_site("dr")
    vault = workdir / "vault"
    vault.mkdir(mode=0o700)
    bed.add_site("vault", transport="dir", path=str(vault))
    bed.cli("up")
    for cut in (1, 2, 3):
        files, kernel, archive = tree(bed.state_dir), kernel_state(bed), tree(vault)
        shown = bed.cli("sync", bed.group, "--dry-run").stdout
        assert (tree(bed.state_dir), kernel_state(bed), tree(vault)) == (files, kernel, archive)
        assert f"next cut: {cut};" in shown, shown
        if cut == 1:
            assert "dr (blockdev): holds none; seed (compare)" in shown, shown
            assert "vault (dir): holds none; seed (full image)" in shown, shown
            assert "chain delta: none" in shown
        else:
            assert f"dr (blockdev): holds cut {cut - 1}; follows the chain to cut {cut}" in shown
            assert f"chain delta: cut {cut - 1} -> {cut}, for dr, vault" in shown, shown
        cut_commands = shown.split("the cut (writers wait for these):\n")[1].splitlines()
        assert [c.split()[:3] for c in cut_commands[:2]] == [
            ["dmsetup", "suspend", "da"],
            ["dmsetup", "message", "da-era"],
        ]
        result = sync(bed)
        assert f"cut {cut} of {bed.group}" in result.stdout, result.stdout
        write_raw("/dev/mapper/da", [cut, 40 + cut])


def test_dry_run_on_a_fresh_state_dir_creates_nothing(bed: Bed) -> None:
    bed.add_device("fa", origin_mib=8)
    bed.add_site("dr")
    bed.cli("up")
    shutil.rmtree(bed.state_dir)  # as on a host whose state was never written
    shown = bed.cli("sync", bed.group, "--dry-run").stdout
    assert "next cut: 1;" in shown and "seed (compare)" in shown
    assert not bed.state_dir.exists()
