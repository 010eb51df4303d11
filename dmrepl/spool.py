"""The spool: a group's replication log of captured deltas, with a size cap.

Chain deltas `<group>.<seq>.<base seq>.delta` live in `<state>/spool/<group>/`: each
brings a replica from cut `base` to cut `seq`; consecutive deltas form the chain a
site follows from its cursor. A site's own deltas (a resync from its cursor, the
overflow ladder, or a full image to seed it) live in `resync/` beside them, named
`<site>~<delta name>`, and are removed once delivered.

Listing reads only; the directories are made by `prepare`, before the first capture.

Deleting a file here (eviction at the cap, pruning, own deltas once delivered, orphans)
removes the spool's name only: a blockdev journal that committed the file holds its own
hard link to it until the delta is applied (dmrepl.journal, "payload").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from dmrepl import deltafiles, safefile
from dmrepl.deltafiles import DeltaFile
from dmrepl.statedir import StateDir


class Spool:
    def __init__(self, state_dir: StateDir, group: str, cap_bytes: int):
        self.group = group
        self.cap_bytes = cap_bytes
        self.directory = state_dir.spool(group)
        self.resync_dir = state_dir.resync(group)
        self.state_root = state_dir.root

    def prepare(self) -> None:
        """Make the spool's directories (0700), or check the existing ones."""
        safefile.private_dir(self.resync_dir, what="state_dir", strict_from=self.state_root)

    def chain_deltas(self) -> list[DeltaFile]:
        """The chain deltas, oldest first."""
        return deltafiles.list_files(self.directory, self.group)

    def own_deltas(self, site: str) -> list[DeltaFile]:
        """A site's own deltas (resyncs and seeds), oldest first."""
        return deltafiles.list_files(self.resync_dir, self.group, prefix=f"{site}~")

    def path(self, seq: int, base_seq: int | None) -> Path:
        """Where the chain delta from `base_seq` to `seq` lives."""
        return self.directory / deltafiles.file_name(self.group, seq, base_seq)

    def own_path(self, site: str, seq: int, base_seq: int | None) -> Path:
        """Where a site's own delta (a resync, or a full image to seed it) waits for delivery."""
        return self.resync_dir / (f"{site}~" + deltafiles.file_name(self.group, seq, base_seq))

    @staticmethod
    def delete(files: Iterable[DeltaFile]) -> None:
        for file in files:
            file.path.unlink(missing_ok=True)

    def remove_orphans(self, last_recorded_seq: int) -> list[Path]:
        """Delete what an interrupted run left: captures of cuts never recorded, partial
        and staging files, and undelivered own deltas (a new cut resyncs afresh)."""
        orphans = [f.path for f in self.chain_deltas() if f.seq > last_recorded_seq]
        if self.directory.is_dir():
            orphans += list(self.directory.glob(".*"))
        if self.resync_dir.is_dir():
            orphans += list(self.resync_dir.glob("*"))
        for path in orphans:
            path.unlink(missing_ok=True)
        return orphans
