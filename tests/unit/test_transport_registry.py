"""The transport registry: a transport is a spec class, a Receiver and one registry line."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.config import ConfigError, parse_config
from dmrepl.sites import SiteContext, SiteDown, open_site
from dmrepl.sites.registry import TRANSPORTS
from dmrepl.statedir import StateDir
from tests.memory_transport import MemorySite, registered
from tests.unit.factories import one_device_delta

GROUP = """
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
"""


@pytest.fixture
def memory() -> Iterator[None]:
    with registered():
        yield


def make_delta(seq: int, base: int | None, writes: list[tuple[int, bytes]]) -> bytes:
    return one_device_delta("db", "data", 64, seq, base, writes)


def test_a_registered_transport_is_configured_and_opened_like_the_built_in_ones(
    memory: None, tmp_path: Path
) -> None:
    config = parse_config(GROUP + '[group.db.site.ram]\ntransport = "memory"\n', Path("x.toml"))
    (spec,) = config.groups["db"].sites
    site = open_site(spec, SiteContext({"data": 64}, StateDir(tmp_path)))
    site.check()
    assert site.held() is None and site.compare_seeder() is None
    site.receive(io.BytesIO(make_delta(1, None, [(0, b"a" * 512)])))
    delivered = site.receive(io.BytesIO(make_delta(2, 1, [(8, b"b" * 512)])))
    assert (delivered.seq, delivered.base_seq, delivered.data_bytes) == (2, 1, 512)
    assert site.held() == 2
    image = MemorySite.held_by_site[spec.key].images["data"]
    assert image[:512] == b"a" * 512 and image[4096:4608] == b"b" * 512
    assert list(tmp_path.iterdir()) == []


def test_a_transports_own_keys_are_checked_by_its_spec(memory: None) -> None:
    text = GROUP + '[group.db.site.ram]\ntransport = "memory"\nreachable = "no"\npath = "/x"\n'
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    assert caught.value.problems == [
        'group.db.site.ram.path: only used with transport = "dir"',
        "group.db.site.ram.reachable: must be true or false",
    ]


def test_an_unreachable_memory_site_is_down(memory: None, tmp_path: Path) -> None:
    text = GROUP + '[group.db.site.ram]\ntransport = "memory"\nreachable = false\n'
    (spec,) = parse_config(text, Path("x.toml")).groups["db"].sites
    with pytest.raises(SiteDown, match="configured unreachable"):
        open_site(spec, SiteContext({"data": 64}, StateDir(tmp_path))).check()


def test_the_built_in_transports_and_an_unknown_one() -> None:
    assert sorted(TRANSPORTS) == ["blockdev", "dir", "nbd", "s3", "ssh"]
    with pytest.raises(ConfigError) as caught:
        parse_config(GROUP + '[group.db.site.ram]\ntransport = "memory"\n', Path("x.toml"))
    assert caught.value.problems == [
        "group.db.site.ram.transport: 'memory' is not one of blockdev, dir, nbd, s3, ssh"
    ]
