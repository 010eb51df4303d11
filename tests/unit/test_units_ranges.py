"""Size parsing/formatting and extent arithmetic."""

from __future__ import annotations

import pytest

from dmrepl.errors import InvalidInput
from dmrepl.ranges import Extent, blocks_to_sectors, coalesce, total_length
from dmrepl.units import (
    bytes_to_sectors,
    format_bytes,
    format_sectors,
    parse_size_bytes,
    parse_size_sectors,
)


@pytest.mark.parametrize(
    ("text", "sectors"),
    [
        ("4096", 4096),
        ("4096s", 4096),
        ("2MiB", 4096),
        ("2M", 4096),
        ("2m", 4096),
        ("16T", 16 * 2**31),
        ("16TiB", 16 * 2**31),
        ("4096B", 8),
        ("1.5GiB", 3 * 2**20),
        (" 64 MiB ", 131072),
        ("1MB", None),  # 10^6 bytes is not whole sectors
    ],
)
def test_parse_size_sectors(text: str, sectors: int | None) -> None:
    if sectors is None:
        with pytest.raises(InvalidInput, match="not a whole number of 512-byte sectors"):
            parse_size_sectors(text)
    else:
        assert parse_size_sectors(text) == sectors


def test_decimal_units_are_powers_of_1000() -> None:
    assert parse_size_bytes("1GB") == 10**9
    assert parse_size_bytes("512KB") == 512_000


@pytest.mark.parametrize("text", ["", "MiB", "-1", "2 XiB", "1e9", "0x10", "1.2.3M"])
def test_unreadable_sizes(text: str) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        parse_size_bytes(text, what="origin size")


def test_fractional_bytes_rejected() -> None:
    with pytest.raises(InvalidInput, match="whole number of bytes"):
        parse_size_bytes("0.3B")


def test_formatting() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(512) == "512 B"
    assert format_bytes(4096) == "4 KiB"
    assert format_bytes(3 * 2**29) == "1.5 GiB"
    assert format_sectors(4096) == "2 MiB (4096 sectors)"
    assert bytes_to_sectors(513) == 2


def test_coalesce_merges_touching_and_overlapping() -> None:
    merged = list(coalesce([Extent(0, 2), Extent(2, 3), Extent(3, 5), Extent(7, 8), Extent(7, 9)]))
    assert merged == [Extent(0, 5), Extent(7, 9)]
    assert total_length(merged) == 7


def test_coalesce_rejects_unsorted_input() -> None:
    with pytest.raises(ValueError, match="out of order"):
        list(coalesce([Extent(5, 6), Extent(1, 2)]))


def test_extent_must_be_non_empty() -> None:
    with pytest.raises(ValueError):
        Extent(3, 3)
    with pytest.raises(ValueError):
        Extent(-1, 2)


def test_blocks_to_sectors_drops_blocks_past_the_end() -> None:
    # Device of 250 sectors, 128-sector blocks: block 1 is partial, block 2 does not exist.
    assert list(blocks_to_sectors([Extent(0, 3)], 128, 250)) == [Extent(0, 250)]
    assert list(blocks_to_sectors([Extent(2, 3)], 128, 250)) == []
