"""The one map of dmrepl's state directory (`state_dir`): every path it keeps there.

    <state>/state.db                              the state store (dmrepl.state)
    <state>/locks/<group>.lock                    one run per group (dmrepl.lock)
    <state>/locks/receive.<group>.<site>.lock     one receiver session per site (dmrepl.serve)
    <state>/spool/<group>/<group>.<seq>.<base>.delta  the replication log (dmrepl.spool)
    <state>/spool/<group>/resync/<site>~<delta>   a site's own deltas until delivered: a
                                                  resync (the overflow ladder) or a full image
    <state>/journal/<group>.<site>.journal        a blockdev site's default journal
    <state>/journal/<group>.<site>.staging        a receiver's resume point of a cut-off transfer
    <state>/journal/<group>.<site>.nbd            the /dev/nbdN an nbd site has attached now
    <state>/cow/<group>.<device>.cow              a `-pit` image's COW file while a cut is held
    <state>/promoted/<group>.json                 the group was promoted here (dmrepl.promote)
    <state>/demoted/<group>.json                  the group was demoted here (dmrepl.failback)
    <state>/discarded/<group>.after-cut-<K>/      what it wrote after cut K, as a delta file

Names only: nothing here creates, opens or checks anything; whoever writes a path makes its
directory (safefile.private_dir), and readers never do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    """The paths under one state directory."""

    root: Path

    @property
    def db(self) -> Path:
        """The SQLite state store."""
        return self.root / "state.db"

    @property
    def locks(self) -> Path:
        return self.root / "locks"

    def lock(self, group: str) -> Path:
        """The group's lock file (`flock`), naming its holder."""
        return self.locks / f"{group}.lock"

    def receive_lock(self, group: str, site: str) -> Path:
        """A receiver's lock on one site: one session writes its journal at a time."""
        return self.locks / f"receive.{group}.{site}.lock"

    def spool(self, group: str) -> Path:
        """The group's spool: the chain of captured deltas."""
        return self.root / "spool" / group

    def resync(self, group: str) -> Path:
        """Each site's own deltas (resyncs, full images to seed it), kept until delivered."""
        return self.spool(group) / "resync"

    @property
    def journals(self) -> Path:
        return self.root / "journal"

    def journal(self, group: str, site: str) -> Path:
        """A blockdev site's journal when its config names none."""
        return self.journals / f"{group}.{site}.journal"

    def staging(self, group: str, site: str) -> Path:
        """How much of a delta a receiver journaled before its transfer was cut off."""
        return self.journals / f"{group}.{site}.staging"

    def nbd_attached(self, group: str, site: str) -> Path:
        """The NBD devices an `nbd` site has attached, so that the next run detaches what a
        killed one left attached."""
        return self.journals / f"{group}.{site}.nbd"

    def promoted(self, group: str) -> Path:
        """On a receiver host: the record that `group` was promoted here (a primary now)."""
        return self.root / "promoted" / f"{group}.json"

    def demoted(self, group: str) -> Path:
        """On an old primary: the record that `group` was demoted here (a site now), with
        what it wrote after the cut the new primary started from."""
        return self.root / "demoted" / f"{group}.json"

    def discarded(self, group: str, cut: int) -> Path:
        """The delta files of what an old primary wrote after cut `cut` and the new primary
        never received: kept, not silently dropped."""
        return self.root / "discarded" / f"{group}.after-cut-{cut}"

    @property
    def cow(self) -> Path:
        return self.root / "cow"

    def cow_file(self, group: str, device: str) -> Path:
        """The sparse file behind a device's `-pit` COW while a cut is held (no `cow` device)."""
        return self.cow / f"{group}.{device}.cow"
