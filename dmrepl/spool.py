"""The spool: a group's replication log of captured deltas, with a size cap.

Files `<group>.<seq>.<base seq>.delta` in `<state>/spool/<group>/`: each brings
a replica from cut `base` to cut `seq`; consecutive deltas form a chain a site
follows from its cursor. Site-specific resync deltas (the overflow ladder) live
in `resync/` beside them and are removed once delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dmrepl import safefile
from dmrepl.sites import delta_file_name, listed_deltas


@dataclass(frozen=True)
class SpoolEntry:
    seq: int
    base_seq: int | None
    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size


class Spool:
    def __init__(self, directory: Path, group: str, cap_bytes: int):
        self.directory = directory
        self.group = group
        self.cap_bytes = cap_bytes
        self.resync_dir = directory / "resync"
        safefile.private_dir(self.resync_dir, what="state_dir")

    def entries(self) -> list[SpoolEntry]:
        """The chain deltas, oldest first."""
        return [SpoolEntry(*item) for item in listed_deltas(self.directory, self.group)]

    def used(self) -> int:
        return sum(entry.size for entry in self.entries())

    def head(self) -> int | None:
        """The cut the newest spooled delta brings a replica to."""
        entries = self.entries()
        return entries[-1].seq if entries else None

    def chain(self, cursor: int, target: int) -> list[SpoolEntry] | None:
        """The deltas that take a replica at cut `cursor` to cut `target`, or None if broken."""
        by_base = {entry.base_seq: entry for entry in self.entries()}
        path: list[SpoolEntry] = []
        at = cursor
        while at != target:
            entry = by_base.get(at)
            if entry is None:
                return None
            path.append(entry)
            at = entry.seq
        return path

    def make_room(self, needed: int) -> list[SpoolEntry] | None:
        """Evict the oldest deltas until `needed` more bytes fit under the cap.

        Returns what was evicted (sites that still needed it fall back to a
        resync), or None if `needed` alone exceeds the cap (nothing is evicted).
        """
        if needed > self.cap_bytes:
            return None
        entries = self.entries()
        used = sum(entry.size for entry in entries)
        evicted = []
        while entries and used + needed > self.cap_bytes:
            oldest = entries.pop(0)
            used -= oldest.size
            oldest.path.unlink()
            evicted.append(oldest)
        return evicted

    def path(self, seq: int, base_seq: int | None) -> Path:
        """Where the chain delta from `base_seq` to `seq` lives."""
        return self.directory / delta_file_name(self.group, seq, base_seq)

    def resync_path(self, site: str, seq: int, base_seq: int) -> Path:
        """Where a site's resync delta (the overflow ladder) lives until delivered."""
        return self.resync_dir / (f"{site}~" + delta_file_name(self.group, seq, base_seq))

    def resyncs(self, site: str) -> list[Path]:
        return sorted(self.resync_dir.glob(f"{site}~{self.group}.*.delta"))

    def prune(self, applied_everywhere: int) -> list[SpoolEntry]:
        """Delete deltas every site has applied (seq <= the oldest cursor)."""
        gone = [entry for entry in self.entries() if entry.seq <= applied_everywhere]
        for entry in gone:
            entry.path.unlink()
        return gone

    def remove_orphans(self, last_recorded_seq: int) -> list[Path]:
        """Delete what an interrupted run left: captures of cuts never recorded, partial
        and staging files, and undelivered resync deltas (a new cut resyncs afresh)."""
        orphans = [e.path for e in self.entries() if e.seq > last_recorded_seq]
        orphans += list(self.directory.glob(".*"))
        orphans += list(self.resync_dir.glob("*"))
        for path in orphans:
            path.unlink(missing_ok=True)
        return orphans
