"""Retention at a `dir` site: which cuts a `keep` grid keeps, and how the files of the
others are compacted away. Pure: no I/O (dmrepl.compact carries the steps out).

    keep = "1h:24, 1d:7"

Each `INTERVAL:COUNT` entry keeps, for the newest COUNT intervals of that length, the
newest cut created in each interval. Intervals are aligned to the Unix epoch (so `1d` is a
UTC day), and the newest interval is the one holding the latest creation time of any cut
the site can restore. The newest cut is always kept; a cut kept by any entry is kept.

A cut that is not kept must stop being needed without breaking the chain of a kept one.
`next_step` looks at the files as they are and says what to do next, one atomic step at a
time: delete a file no kept cut's route needs, or merge the two files around a cut that is
not kept into one. Because it starts from the files each time, a crash between any two
steps (a merged file published, its inputs not yet deleted) leaves a directory it carries on
from, in which every kept cut is still restorable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise

from dmrepl import deltafiles
from dmrepl.deltafiles import DeltaFile

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ENTRY = re.compile(r"^(?P<number>\d+)(?P<unit>[A-Za-z]*)$")
EXAMPLE = '"1h:24, 1d:7"'


class GridError(ValueError):
    """A `keep` value that cannot be read; the message says what is wrong and what to write."""


@dataclass(frozen=True)
class KeepRule:
    """Keep the newest cut of each of the newest `count` intervals of `seconds`."""

    seconds: int
    count: int

    def __str__(self) -> str:
        for unit, factor in sorted(UNITS.items(), key=lambda item: -item[1]):
            if self.seconds % factor == 0:
                return f"{self.seconds // factor}{unit}:{self.count}"
        raise AssertionError("seconds is a whole number")  # "s" divides every whole number


Grid = tuple[KeepRule, ...]


def parse_grid(text: object) -> Grid:
    """The rules of a `keep` value like "1h:24, 1d:7", shortest interval first."""
    if not isinstance(text, str) or not text.strip():
        raise GridError(f"must be a string of INTERVAL:COUNT entries like {EXAMPLE}, not {text!r}")
    rules: dict[int, tuple[KeepRule, str]] = {}
    for raw in text.split(","):
        entry = raw.strip()
        interval, colon, count_text = entry.partition(":")
        if not entry or not colon:
            raise GridError(
                f"entry {entry!r} is not INTERVAL:COUNT (entries are separated by commas, "
                f"like {EXAMPLE})"
            )
        seconds = _interval(interval.strip(), entry)
        count_text = count_text.strip()
        if not count_text.isdecimal():
            raise GridError(f"count {count_text!r} in {entry!r} is not a whole number")
        count = int(count_text)
        if count == 0:
            raise GridError(f"count 0 in {entry!r} keeps nothing: give 1 or more, or drop it")
        if seconds in rules:
            raise GridError(
                f"{entry!r} repeats the interval of {rules[seconds][1]!r} ({seconds} s): "
                "give each interval once"
            )
        rules[seconds] = (KeepRule(seconds, count), entry)
    return tuple(rule for _, (rule, _) in sorted(rules.items()))


def _interval(text: str, entry: str) -> int:
    match = _ENTRY.match(text)
    units = ", ".join(UNITS)
    if match is None:
        raise GridError(f"interval {text!r} in {entry!r} is not a number and a unit ({units})")
    if match["unit"] not in UNITS:
        unit = match["unit"] or "(none)"
        raise GridError(f"interval {text!r} in {entry!r}: unit {unit} is not one of {units}")
    seconds = int(match["number"]) * UNITS[match["unit"]]
    if seconds == 0:
        raise GridError(f"interval {text!r} in {entry!r} is zero: give 1{match['unit']} or more")
    return seconds


def describe(grid: Grid) -> str:
    """The grid as it would be written in the configuration (shortest interval first)."""
    return ", ".join(str(rule) for rule in grid)


def kept_cuts(times: Mapping[int, float], grid: Grid) -> frozenset[int]:
    """The cuts the grid keeps, of those given (cut seq -> creation time, Unix seconds)."""
    if not times:
        return frozenset()
    kept = {max(times)}
    latest = max(times.values())
    for rule in grid:
        top = math.floor(latest / rule.seconds)
        newest: dict[int, int] = {}
        for seq, created in times.items():
            interval = math.floor(created / rule.seconds)
            if top - rule.count < interval <= top:
                newest[interval] = max(newest.get(interval, seq), seq)
        kept.update(newest.values())
    return frozenset(kept)


@dataclass(frozen=True)
class Merge:
    """Write one file that does what `first` and then `second` do (cut `first.seq` is
    dropped); it takes the site from `first`'s base (a full image: nothing) to `second.seq`."""

    first: DeltaFile
    second: DeltaFile

    @property
    def seq(self) -> int:
        return self.second.seq

    @property
    def base_seq(self) -> int | None:
        return self.first.base_seq


@dataclass(frozen=True)
class Delete:
    """Delete a file no kept cut needs (its data is in a merged file, or only dropped cuts
    used it)."""

    file: DeltaFile


Step = Merge | Delete


def next_step(files: Sequence[DeltaFile], times: Mapping[int, float], grid: Grid) -> Step | None:
    """What to do next to the files of one group (None: nothing; every file is needed).

    `times` holds the creation time of every cut the files reach from a full image.
    Deletes come first (they free space before a merge writes), the latest first. Only
    files the full images reach are touched: a delta beyond a gap in the chain is left
    where it is. Of the merges, the smallest goes first, so a full image is merged last.
    """
    routes = deltafiles.routes(files)
    reached = routes.cuts
    kept = kept_cuts({cut: times[cut] for cut in reached}, grid)
    chains = {cut: routes.to(cut) or [] for cut in kept}
    needed = {file.path for chain in chains.values() for file in chain}
    # The latest first: an unneeded file's base stays reachable until it is deleted too.
    for file in sorted(files, key=lambda f: (-f.seq, f.path.name)):
        reachable = file.base_seq is None or (
            file.base_seq in routes.last and file.base_seq < file.seq
        )
        if reachable and file.path not in needed:
            return Delete(file)
    merges = [
        Merge(first, second)
        for chain in chains.values()
        for first, second in pairwise(chain)
        if first.seq not in kept
    ]
    if not merges:
        return None
    return min(merges, key=lambda m: (m.first.size + m.second.size, m.seq, m.first.seq))
