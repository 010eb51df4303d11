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


@dataclass(frozen=True)
class Routes:
    """The shortest way to each cut a directory's files reach (see `routes`)."""

    start: int | None  # None: routes begin with a full image
    last: Mapping[int, DeltaFile | None]  # per cut reached, its route's last file

    @property
    def cuts(self) -> list[int]:
        """Every cut reached, oldest first (with a start cut, it is among them)."""
        return sorted(self.last)

    def to(self, cut: int) -> list[DeltaFile] | None:
        """The files that bring a replica to `cut`, in order; None if it is not reached."""
        if cut not in self.last:
            return None
        steps: list[DeltaFile] = []
        file = self.last[cut]
        while file is not None:
            steps.append(file)
            file = None if file.base_seq is None else self.last[file.base_seq]
        return steps[::-1]


def routes(files: Iterable[DeltaFile], start: int | None = None) -> Routes:
    """The shortest route to every cut the files reach: from a full image (`start` None) or
    from a replica that holds cut `start` (by deltas only).

    Shortest is fewest files, then fewest bytes. Several files may start at one cut (the
    two deltas a merge replaced and the merged one, until they are deleted): each cut
    still has exactly one shortest route.
    """
    cost: dict[int, tuple[int, int]] = {}
    last: dict[int, DeltaFile | None] = {}
    if start is not None:
        cost[start], last[start] = (0, 0), None
    # By seq: every file that ends at a cut comes before those that start there.
    for file in sorted(files, key=lambda f: (f.seq, f.path.name)):
        if file.base_seq is None:
            if start is not None:
                continue
            candidate = (1, file.size)
        elif file.base_seq in cost and file.base_seq < file.seq:
            steps, size = cost[file.base_seq]
            candidate = (steps + 1, size + file.size)
        else:
            continue
        if file.seq not in cost or candidate < cost[file.seq]:
            cost[file.seq], last[file.seq] = candidate, file
    return Routes(start, last)


def partial_path(final: Path) -> Path:
    """Where `final` is written before it is published (a dot-name: never listed)."""
    return final.with_name(f".{final.name}.partial")


def publish(partial: Path, final: Path) -> None:
    """Rename a fully written and fsynced file into place and make the rename durable."""
    os.rename(partial, final)
    fsync_directory(final.parent)


def write_durably(
    directory: Path, name: str, fill: Callable[[BinaryIO], object], *, buffering: int = -1
) -> Path:
    """Write a file via a temporary name, fsync it, rename it into place, fsync the directory.

    If `fill` raises, the temporary file is removed and nothing is renamed."""
    final = directory / name
    partial = partial_path(final)
    try:
        with safefile.open_new(partial, buffering=buffering) as out:
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
