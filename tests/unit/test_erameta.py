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
from hypothesis import given
from hypothesis import strategies as st

from dmrepl import era, erameta, erareader
from dmrepl.erameta import BLOCK_SIZE, PIECE_BITS, PIECE_BYTES, BlockSet, MetadataDoubt
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


def _members(listed: list[Extent]) -> set[int]:
    return {b for x in listed for b in range(x.begin, x.end)}


@pytest.mark.parametrize("seed", range(20))
def test_block_set_extents(seed: int) -> None:
    rng = random.Random(seed)
    nr_blocks = rng.randint(1, 3000)
    members = {b for b in range(nr_blocks) if rng.random() < rng.choice((0.01, 0.3, 0.9))}
    result = BlockSet(nr_blocks)
    for block in members:
        result.add(block)
    listed = result.extents()
    assert _members(listed) == members
    assert all(a.end < b.begin for a, b in itertools.pairwise(listed))


@given(
    st.integers(1, 5 * PIECE_BITS).flatmap(
        lambda nr_blocks: st.tuples(
            st.just(nr_blocks),
            st.lists(
                st.tuples(st.integers(0, nr_blocks - 1), st.integers(1, PIECE_BITS + 9)),
                max_size=12,
            ),
        )
    )
)
def test_block_set_runs_across_pieces(case: tuple[int, list[tuple[int, int]]]) -> None:
    """Runs of blocks anywhere, across piece boundaries: the extents are the set, coalesced."""
    nr_blocks, runs = case
    members = {b for start, length in runs for b in range(start, min(start + length, nr_blocks))}
    result = BlockSet(nr_blocks)
    for block in members:
        result.add(block)
    listed = result.extents()
    assert _members(listed) == members
    assert all(a.end < b.begin for a, b in itertools.pairwise(listed))
    assert len(result.pieces) == len({b // PIECE_BITS for b in members})


@given(
    st.integers(1, 4 * PIECE_BITS).flatmap(
        lambda nr_blocks: st.tuples(
            st.just(nr_blocks),
            st.lists(st.tuples(st.integers(0, nr_blocks), st.integers(0, nr_blocks)), max_size=6),
            st.lists(st.integers(0, nr_blocks - 1), max_size=6),
        )
    )
)
def test_block_set_add_range_matches_adding_each(
    case: tuple[int, list[tuple[int, int]], list[int]],
) -> None:
    nr_blocks, ranges, singles = case
    by_range, by_block = BlockSet(nr_blocks), BlockSet(nr_blocks)
    for begin, end in ranges:
        by_range.add_range(begin, end)
        for block in range(begin, end):
            by_block.add(block)
    for block in singles:
        by_range.add(block)
        by_block.add(block)
    assert by_range.extents() == by_block.extents()
    assert by_range.pieces == by_block.pieces


@pytest.mark.parametrize(
    ("eras", "since", "expected"),
    [
        ([1, 2, 3, 2], 4, []),  # nothing this recent
        ([5, 6, 5, 7], 5, [Extent(100, 104)]),  # everything
        ([5, 1, 6, 2], 5, [Extent(100, 101), Extent(102, 103)]),  # some
    ],
    ids=["none", "all", "some"],
)
def test_mark_eras_since(eras: list[int], since: int, expected: list[Extent]) -> None:
    result = BlockSet(200)
    entries = memoryview(b"".join(value.to_bytes(4, "little") for value in eras))
    erameta.mark_eras_since(result, entries, 100, since)
    assert result.extents() == expected


def test_block_set_keeps_only_pieces_with_members() -> None:
    result = BlockSet(258 * PIECE_BITS)  # a writeset of 16 TiB in 2 MiB era blocks
    for piece in range(258):
        result.merge_piece(piece, bytes(PIECE_BYTES))
    assert result.pieces == {}
    result.merge_piece(7, b"\x00\x80")  # block 7 * PIECE_BITS + 15
    result.merge_piece(7, b"\x01")  # OR-ed into the same piece
    result.add(8 * PIECE_BITS)  # the next piece
    result.add(8 * PIECE_BITS - 1)  # the end of piece 7: one extent with the next
    assert result.extents() == [
        Extent(7 * PIECE_BITS, 7 * PIECE_BITS + 1),
        Extent(7 * PIECE_BITS + 15, 7 * PIECE_BITS + 16),
        Extent(8 * PIECE_BITS - 1, 8 * PIECE_BITS + 1),
    ]
    assert sorted(result.pieces) == [7, 8]
    with pytest.raises(ValueError, match="do not fit"):
        result.merge_piece(0, bytes(PIECE_BYTES + 1))


def test_block_set_merge_piece_clips() -> None:
    result = BlockSet(10)  # two bytes, six spare bits
    result.merge_piece(0, b"\x01\xff\xff\xff")
    assert result.extents() == [Extent(0, 1), Extent(8, 10)]
    beyond = BlockSet(PIECE_BITS + 3)  # spare bits in a second piece
    beyond.merge_piece(1, b"\xff")
    assert beyond.extents() == [Extent(PIECE_BITS, PIECE_BITS + 3)]


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
