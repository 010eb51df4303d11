"""The cycle drives any registered transport: a site kept in this process's memory (the
smallest transport there is) is seeded with a full image and then follows the chain,
and a down one is reported while the others go on."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from dmrepl.sites.registry import register
from tests.kernel.stacks import Bed
from tests.kernel.test_replicate import digest, pit_digests, sync, write_raw
from tests.memory_transport import TRANSPORT, MemorySite

__all__ = ["pit_digests"]  # a fixture used here


@pytest.fixture
def memory() -> Iterator[None]:
    unregister = register(TRANSPORT)
    MemorySite.held_by_site.clear()
    yield
    unregister()
    MemorySite.held_by_site.clear()


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
