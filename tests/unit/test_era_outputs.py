"""era_invalidate and dm-era status parsing, on outputs captured from the real kernel and tools."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.eraxml import parse_era_invalidate
from dmrepl.errors import ParseError
from dmrepl.ranges import Extent, blocks_to_sectors, coalesce
from dmrepl.status import parse_era_status, parse_status_line

DATA = Path(__file__).parent.parent / "data" / "era"


def captured(name: str) -> str:
    return (DATA / name).read_text()


def test_cpp_tool_output_with_spaced_end_attribute() -> None:
    text = captured("written-since-1.xml")
    assert 'end = "13"' in text  # the 0.9.0 C++ form, as captured
    assert list(parse_era_invalidate([text])) == [
        Extent(3, 4),
        Extent(10, 13),
        Extent(20, 21),
        Extent(511, 512),
    ]


def test_rust_tool_form_without_spaces_parses_the_same() -> None:
    text = captured("written-since-1.xml").replace('end = "', 'end="')
    assert list(parse_era_invalidate([text])) == list(
        parse_era_invalidate([captured("written-since-1.xml")])
    )


def test_empty_list() -> None:
    assert list(parse_era_invalidate([captured("written-since-2-empty.xml")])) == []


def test_streaming_one_character_at_a_time() -> None:
    text = captured("written-since-1.xml")
    assert len(list(parse_era_invalidate(iter(text)))) == 4


def test_large_output_streams_in_constant_memory() -> None:
    def chunks(count: int) -> Iterator[str]:
        yield "<blocks>\n"
        for block in range(0, 2 * count, 2):
            yield f'  <block block="{block}"/>\n'
        yield "</blocks>\n"

    # A generator in, a generator out: nothing forces the whole list into memory.
    extents = parse_era_invalidate(chunks(200_000))
    assert sum(1 for _ in extents) == 200_000


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "truncated"),
        ("<blocks>", "truncated"),
        ('<blocks><block block="3"/>', "truncated"),
        ('<ranges><block block="3"/></ranges>', "root"),
        ('<blocks><block blok="3"/></blocks>', "bad attributes"),
        ('<blocks><block block="x"/></blocks>', "bad attributes"),
        ('<blocks><range begin="5" end="5"/></blocks>', "bad attributes"),
        ('<blocks><range begin="5"/></blocks>', "bad attributes"),
        ('<blocks><extent begin="5" end="6"/></blocks>', "unknown element"),
        ('<blocks><block block="1"><x/></block></blocks>', "nested"),
        ("bad checksum in superblock", "not well-formed"),
    ],
)
def test_malformed_output_raises(text: str, why: str) -> None:
    with pytest.raises(ParseError, match=why):
        list(parse_era_invalidate([text]))


def test_ranges_to_sectors_clamped_at_device_end() -> None:
    blocks = coalesce(parse_era_invalidate([captured("written-since-1.xml")]))
    # The origin ends 100 sectors into block 511 in this hypothetical.
    device = 511 * 128 + 100
    sectors = list(blocks_to_sectors(blocks, 128, device))
    assert sectors[0] == Extent(384, 512)
    assert sectors[-1] == Extent(511 * 128, device)


@pytest.mark.parametrize(
    ("name", "used", "era", "held"),
    [
        ("status-fresh.txt", 10, 1, None),
        ("status-before-take.txt", 10, 1, None),
        ("status-held.txt", 13, 2, 45),
        ("status-dropped.txt", 10, 2, None),
    ],
)
def test_era_status_lines(name: str, used: int, era: int, held: int | None) -> None:
    line = parse_status_line(captured(name))
    assert (line.start, line.length, line.target) == (0, 131072, "era")
    status = parse_era_status(line.params)
    assert status.metadata_block_sectors == 8
    assert (status.metadata_used_blocks, status.metadata_total_blocks) == (used, 1024)
    assert status.current_era == era
    assert status.held_root == held
    assert status.snapshot_held == (held is not None)


@pytest.mark.parametrize("params", ["8 10/1024 1", "8 10-1024 1 -", "8 10/1024 x -", ""])
def test_era_status_malformed(params: str) -> None:
    with pytest.raises(ParseError):
        parse_era_status(params)
