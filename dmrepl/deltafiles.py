"""Delta files on disk: their names, listing a directory of them, the chain walk, and
publishing one durably.

A delta file is named `<group>.<seq>.<base seq>.delta` (`full` for a full image's
base): it brings a replica from cut `base` to cut `seq`. The spool, an archive
(`dir`) site and `dmrepl apply` all keep their deltas under these names, and walk
them the same way: from a cut, follow the file whose base is that cut.

Files are written under a dot-name (`.<name>.partial`, never listed), fsynced,
renamed into place and the directory fsynced: a listed file is whole.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dmrepl import safefile

NAME = re.compile(r"^(?P<group>[^.]+)\.(?P<seq>\d{10})\.(?P<base>full|\d{10})\.delta$")


@dataclass(frozen=True)
class DeltaFile:
    """A listed delta file; `size` in bytes, as stat-ed when it was listed."""

    seq: int
    base_seq: int | None  # None: a full image
    path: Path
    size: int = 0


def file_name(group: str, seq: int, base_seq: int | None) -> str:
    """The name of the delta that takes `group` from cut `base_seq` (None: nothing) to `seq`."""
    base = "full" if base_seq is None else f"{base_seq:010d}"
    return f"{group}.{seq:010d}.{base}.delta"


def parse_name(name: str, group: str) -> tuple[int, int | None] | None:
    """(seq, base seq) of a delta file name of `group`, or None for any other name."""
    match = NAME.match(name)
    if match is None or match["group"] != group:
        return None
    return int(match["seq"]), None if match["base"] == "full" else int(match["base"])


def list_files(directory: Path, group: str, *, prefix: str = "") -> list[DeltaFile]:
    """The group's delta files in `directory` (named `prefix` + the delta name), by seq.

    Read-only: a missing directory lists as empty; a file that vanishes while listed is
    left out.
    """
    found = []
    try:
        paths = list(directory.glob(f"{prefix}{group}.*.delta"))
    except OSError:
        return []
    for path in paths:
        parsed = parse_name(path.name[len(prefix) :], group)
        if parsed is None:
            continue
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        found.append(DeltaFile(parsed[0], parsed[1], path, size))
    return sorted(found, key=lambda f: (f.seq, f.path.name))


def by_base(files: Iterable[DeltaFile]) -> Mapping[int, DeltaFile]:
    """Incremental deltas by the cut they start from (the last listed wins a tie)."""
    return {f.base_seq: f for f in files if f.base_seq is not None}


def walk(files: Iterable[DeltaFile], start: int, until: int | None = None) -> list[DeltaFile]:
    """The deltas that follow each other from cut `start`, as far as they go (or to `until`).

    Only forward: a file named as going back to an earlier cut ends the walk (no loop)."""
    links = by_base(files)
    steps: list[DeltaFile] = []
    at = start
    while at != until and at in links and at < links[at].seq:
        if until is not None and links[at].seq > until:
            break
        steps.append(links[at])
        at = links[at].seq
    return steps


def chain(files: Iterable[DeltaFile], cursor: int, target: int) -> list[DeltaFile] | None:
    """The deltas that take a replica at cut `cursor` to cut `target`; None if none do."""
    steps = walk(files, cursor, target)
    reached = steps[-1].seq if steps else cursor
    return steps if reached == target else None


def partial_path(final: Path) -> Path:
    """Where `final` is written before it is published (a dot-name: never listed)."""
    return final.with_name(f".{final.name}.partial")


def publish(partial: Path, final: Path) -> None:
    """Rename a fully written and fsynced file into place and make the rename durable."""
    os.rename(partial, final)
    fsync_directory(final.parent)


def write_durably(directory: Path, name: str, fill: Callable[[BinaryIO], object]) -> Path:
    """Write a file via a temporary name, fsync it, rename it into place, fsync the directory."""
    final = directory / name
    partial = partial_path(final)
    try:
        with safefile.open_new(partial) as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    fsync_directory(directory)
    return final


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
