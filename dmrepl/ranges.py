"""Ranges of era blocks and sectors: half-open [begin, end), coalesced, clamped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Extent:
    """A half-open interval [begin, end) of some unit (era blocks or sectors)."""

    begin: int
    end: int

    def __post_init__(self) -> None:
        if self.begin < 0 or self.end <= self.begin:
            raise ValueError(f"empty or negative extent [{self.begin}, {self.end})")

    @property
    def length(self) -> int:
        return self.end - self.begin


def coalesce(extents: Iterable[Extent]) -> Iterator[Extent]:
    """Merge touching or overlapping extents. Input must be sorted by begin.

    Streams: holds one pending extent, so it works on millions of inputs.
    """
    pending: Extent | None = None
    for extent in extents:
        if pending is None:
            pending = extent
        elif extent.begin < pending.begin:
            raise ValueError(f"extents out of order: {extent} after {pending}")
        elif extent.begin <= pending.end:
            pending = Extent(pending.begin, max(pending.end, extent.end))
        else:
            yield pending
            pending = extent
    if pending is not None:
        yield pending


def blocks_to_sectors(
    blocks: Iterable[Extent], block_sectors: int, device_sectors: int
) -> Iterator[Extent]:
    """Convert era-block extents to sector extents, clamped at the device end.

    The last era block may extend past the end of the origin when the origin is
    not a multiple of the block size; those sectors do not exist.
    """
    for extent in blocks:
        begin = extent.begin * block_sectors
        end = min(extent.end * block_sectors, device_sectors)
        if begin < end:
            yield Extent(begin, end)


def total_length(extents: Iterable[Extent]) -> int:
    return sum(extent.length for extent in extents)


def union(*lists: Iterable[Extent]) -> list[Extent]:
    """The extents covered by any of the lists, coalesced."""
    return list(coalesce(sorted(extent for extents in lists for extent in extents)))
