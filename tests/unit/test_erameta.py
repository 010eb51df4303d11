"""The dm-era metadata reader on metadata images captured from the kernel, whole and damaged.

The images in tests/data/erameta/ are metadata devices of a 5 000-block era
device, each saved while a snapshot was held by tests/kernel/test_erareader.py,
beside what the reader listed there for every era (the kernel test had checked
those lists against era_invalidate 0.9.0 and its model).
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import random
from pathlib import Path

import pytest

from dmrepl import era, erameta, erareader
from dmrepl.erameta import BLOCK_SIZE, BlockSet, MetadataDoubt
from dmrepl.executor import Runner
from dmrepl.ops import Op
from dmrepl.ranges import Extent

DATA = Path(__file__).parent.parent / "data" / "erameta"
IMAGES = sorted(DATA.glob("*.img.gz"))


def _expected(image: Path) -> dict[int, list[Extent]]:
    lists = json.loads(image.with_name(image.name.replace(".img.gz", ".json")).read_text())
    return {int(e): [Extent(b, x) for b, x in v] for e, v in lists["written_since"].items()}


@pytest.fixture(params=IMAGES, ids=[p.name for p in IMAGES])
def image(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "meta.img"
    data = gzip.decompress(request.param.read_bytes()).rstrip(b"\0")  # the unused tail: zeros
    path.write_bytes(data.ljust(-(-len(data) // BLOCK_SIZE) * BLOCK_SIZE, b"\0"))
    (tmp_path / "source").write_text(str(request.param))
    return path


def _source(image: Path) -> Path:
    return Path((image.parent / "source").read_text())


def test_images_are_there() -> None:
    assert len(IMAGES) >= 3


def test_lists_what_the_kernel_test_checked(image: Path) -> None:
    for since, extents in _expected(_source(image)).items():
        assert erareader.written_since(str(image), since) == extents, since


def test_checksums_match_the_kernels(image: Path) -> None:
    """Both crc32c implementations agree with the checksum of every block in use."""
    data = image.read_bytes()
    sb = data[:BLOCK_SIZE]
    stored = int.from_bytes(sb[:4], "little")
    assert erameta.block_checksum(sb, erameta.SUPERBLOCK_CSUM_XOR) == stored
    assert erameta._crc32c_python(sb[4:]) == erameta.crc32c(sb[4:])


def test_crc32c_check_value() -> None:
    assert erameta._crc32c_python(b"123456789") == 0xE3069283
    assert erameta.crc32c(b"123456789") == 0xE3069283


def _used_blocks(image: Path) -> list[int]:
    """The blocks the snapshot's listing reads (every era, every writeset, the era array)."""
    with erareader.MetadataDevice(str(image)) as device:
        seen: set[int] = set()

        def read(location: int) -> bytes:
            seen.add(location)
            return device.read(location)

        def read_many(locations: list[int]):  # type: ignore[no-untyped-def]
            seen.update(locations)
            return device.read_many(locations)

        sb = erareader.snapshot_superblock(device)
        seen.update((0, sb.location))
        erameta.written_since(sb, read, read_many, 0)
        erameta.written_since(sb, read, read_many, sb.current_era)
    return sorted(seen)


def test_any_damaged_block_is_refused(image: Path) -> None:
    """One flipped bit in any block the listing reads: MetadataDoubt, never a wrong list."""
    pristine = image.read_bytes()
    rng = random.Random(7)
    blocks = _used_blocks(image)
    assert len(blocks) >= 4
    for block in blocks:
        damaged = bytearray(pristine)
        damaged[block * BLOCK_SIZE + rng.randrange(BLOCK_SIZE)] ^= 1 << rng.randrange(8)
        image.write_bytes(damaged)
        with pytest.raises(MetadataDoubt):
            erareader.written_since(str(image), 0)
            erareader.written_since(str(image), 10**6)


def test_no_snapshot_held(image: Path) -> None:
    data = bytearray(image.read_bytes())
    data[216:224] = bytes(8)  # metadata_snap
    data[:4] = erameta.block_checksum(data[:BLOCK_SIZE], erameta.SUPERBLOCK_CSUM_XOR).to_bytes(
        4, "little"
    )
    image.write_bytes(data)
    with pytest.raises(MetadataDoubt, match="no metadata snapshot"):
        erareader.written_since(str(image), 1)


def test_short_device(tmp_path: Path) -> None:
    path = tmp_path / "short"
    path.write_bytes(b"\1" * 100)
    with pytest.raises(MetadataDoubt):
        erareader.written_since(str(path), 1)


@pytest.mark.parametrize("seed", range(20))
def test_block_set_extents(seed: int) -> None:
    rng = random.Random(seed)
    nr_blocks = rng.randint(1, 3000)
    members = {b for b in range(nr_blocks) if rng.random() < rng.choice((0.01, 0.3, 0.9))}
    result = BlockSet(nr_blocks)
    for block in members:
        result.add(block)
    listed = result.extents()
    assert {b for x in listed for b in range(x.begin, x.end)} == members
    assert all(a.end < b.begin for a, b in itertools.pairwise(listed))


def test_block_set_merge_bytes_clips() -> None:
    result = BlockSet(10)  # two bytes, six spare bits
    result.merge_bytes(0, b"\x01\xff\xff\xff")
    assert result.extents() == [Extent(0, 1), Extent(8, 10)]


class ToolRunner(Runner):
    """Answers era_invalidate with a fixed list; counts the calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def stream(self, op: Op, sink=None, *, stderr=None) -> int:  # type: ignore[no-untyped-def]
        self.calls += 1
        assert sink is not None
        sink('<blocks>\n  <block block="4"/>\n</blocks>\n')
        return 0


def test_auto_falls_back_to_era_invalidate_with_a_reason(
    image: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(era.LIST_ENV, "auto")
    monkeypatch.setattr(erameta, "FAST_CHECKSUMS", True)
    runner = ToolRunner()
    since, expected = next(iter(_expected(_source(image)).items()))
    assert era.written_since(runner, str(image), since) == expected
    assert runner.calls == 0

    damaged = bytearray(image.read_bytes())
    damaged[100] ^= 0xFF  # the live superblock
    image.write_bytes(damaged)
    with caplog.at_level(logging.WARNING, logger="dmrepl.era"):
        assert era.written_since(runner, str(image), since) == [Extent(4, 5)]
    assert runner.calls == 1
    assert "bad checksum" in caplog.text and "era_invalidate" in caplog.text


def test_modes(image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = ToolRunner()
    monkeypatch.setenv(era.LIST_ENV, "tool")
    assert era.written_since(runner, str(image), 1) == [Extent(4, 5)]
    monkeypatch.setenv(era.LIST_ENV, "reader")
    image.write_bytes(b"\0" * BLOCK_SIZE)
    with pytest.raises(MetadataDoubt):
        era.written_since(runner, str(image), 1)
    monkeypatch.setenv(era.LIST_ENV, "fast")
    with pytest.raises(ValueError, match="DMREPL_ERA_LIST"):
        era.written_since(runner, str(image), 1)
    assert runner.calls == 1
