"""The contract between the replication cycle and a site: the `Receiver` protocol, the one
failure type a site raises, and the words for a site's state.

The cycle talks to every site through `Receiver` alone (no `isinstance`): it checks
it, asks which cut it holds, lets it finish an interrupted apply, and hands it delta
streams to receive, in cut order. A site that can do more says so through an
optional method returning a helper or None (`compare_seeder`), so a transport that
cannot simply returns None.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol, runtime_checkable

from dmrepl import blockio
from dmrepl.config import SiteSpec
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.signals import Say
from dmrepl.statedir import StateDir

if TYPE_CHECKING:
    from dmrepl.stack import StackSpec

Progress = Callable[[int], object]


class SiteState(StrEnum):
    """What `sync` and `status` say of a site."""

    IN_SYNC = "in sync"
    BEHIND = "behind"
    SEEDING = "seeding"
    RESYNCING = "resyncing"
    SHIPPING = "shipping"
    NOT_SEEDED = "not seeded"
    NEEDS_SEED = "needs seed"
    DOWN = "down"
    MISCONFIGURED = "misconfigured"
    BROKEN = "broken"
    UNKNOWN = "unknown"


FAILED_STATES = frozenset({SiteState.DOWN, SiteState.MISCONFIGURED, SiteState.BROKEN})


class SiteFailure(DmreplError):
    """A site cannot take part in this cycle; the others go on.

    `state` is what the site is reported as; `transient` says whether the next cycle may
    succeed without anyone acting (a link down) or not (a wrong size, a corrupt journal).
    """

    state = SiteState.DOWN
    transient = True


class SiteDown(SiteFailure):
    """The site cannot be reached now (a replica missing, unwritable, or failing I/O)."""


class ReplicaMismatch(SiteFailure):
    """A replica does not fit its origin; the site is skipped until the config is fixed."""

    exit_code = ExitCode.UNSAFE
    state = SiteState.MISCONFIGURED
    transient = False


class SiteBroken(SiteFailure):
    """The site's own record (its journal) is unusable; nothing more is written to it."""

    exit_code = ExitCode.CORRUPT
    state = SiteState.BROKEN
    transient = False


class RecordUnreadable(Exception):
    """A site's own record lives somewhere that cannot be read now (a journal device or a
    `dir` site's directory that is missing, detached or failing)."""


@dataclass(frozen=True)
class Delivery:
    """One delta durably applied (or stored) at a site."""

    seq: int
    base_seq: int | None
    data_bytes: int
    transfer: Transfer | None = None  # how it crossed a network, for remote sites


@dataclass(frozen=True)
class Transfer:
    """How a delta crossed the wire: where it resumed, stream and wire bytes sent, time."""

    resumed_from: int  # bytes of the delta the receiver already had from a cut-off transfer
    stream_bytes: int  # bytes of the delta sent this time
    wire_bytes: int  # what they took on the wire, compressed
    seconds: float


@dataclass(frozen=True)
class SiteContext:
    """What every site is opened with: the group's devices (name -> size in sectors, in
    the group's order), the state directory, and where a site's own progress lines go
    (what a `dir` site's pruning did)."""

    devices: Mapping[str, int]
    state_dir: StateDir
    say: Say = field(default=lambda _line: None, compare=False)

    @classmethod
    def of(
        cls, stacks: Iterable[StackSpec], state_dir: StateDir, say: Say | None = None
    ) -> SiteContext:
        """The context of a group whose stacks were derived (their origin sizes probed)."""
        devices = {s.device.name: s.origin_sectors for s in stacks}
        return cls(devices, state_dir) if say is None else cls(devices, state_dir, say)


class CompareSeeder(Protocol):
    """A site whose replicas this host can read and write: a seed copies only what differs."""

    def seed(
        self, images: Mapping[str, str], *, target_zeroed: bool, progress: Progress
    ) -> blockio.CopyStats:
        """Make the replicas equal the images (device name -> path of the cut's image)."""
        ...

    def mark_seeded(self, seq: int) -> None:
        """The replicas now hold cut `seq` (called once the cut is recorded)."""
        ...


Piece = tuple[str, int, int]  # (group device, first sector, sectors) of a replica


@runtime_checkable
class Verifier(Protocol):
    """A site whose replicas can be hashed where they are (`dmrepl verify`)."""

    def digests(self, pieces: Sequence[Piece]) -> list[bytes]:
        """The XXH3-64 digest of each piece of the replicas, in order, as they are on
        stable storage (not from a stale page cache)."""
        ...


@runtime_checkable
class Promoter(Protocol):
    """A site whose host runs dmrepl and can be asked to take over (`dmrepl switchover`)."""

    def promote(self) -> int:
        """Ask the site's host to make its replicas the group's devices (this host was
        demoted first); the cut they hold. Raises SiteFailure if it refuses or fails."""
        ...


@dataclass(frozen=True)
class SpooledDelta:
    """A delta file in this host's spool, and what the run that captured it knows of it."""

    path: Path
    size: int
    # Its stream checksum when this process captured it (the writer's own, from the bytes
    # it wrote): the file was verified at capture. None: written by an earlier run.
    crc: int | None = None


@runtime_checkable
class SpoolReader(Protocol):
    """A site on this host that applies a spool file where it lies: its journal refers to
    the file instead of holding a copy of it."""

    def receive_spooled(self, spooled: SpooledDelta) -> Delivery:
        """As `Receiver.receive`, for a delta file in the spool."""
        ...


class Receiver(Protocol):
    """A site as the cycle sees it. Every method raises SiteFailure for the site's own
    problems; `receive` raises delta.CorruptDelta when the stream fails its checks."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> SiteSpec: ...

    def check(self) -> None:
        """Raise SiteFailure unless the site can take a delta now. Creates nothing."""
        ...

    def held(self) -> int | None:
        """The cut the site holds, by its own record (None: never seeded, or mid-apply).
        Creates nothing."""
        ...

    def recorded(self) -> int | None:
        """The newest cut number the site's record names in any state, read without
        creating anything; raises RecordUnreadable if the record cannot be read now."""
        ...

    def recover(self) -> Delivery | None:
        """Finish what an interrupted run committed at the site, if anything."""
        ...

    def receive(self, stream: BinaryIO) -> Delivery:
        """Take one delta (read front to back, never seeked) and make its cut the one the
        site holds, atomically."""
        ...

    def compare_seeder(self) -> CompareSeeder | None:
        """This site's compare-mode seeding, or None: it is seeded by receiving a full image."""
        ...

    def close(self) -> None:
        """Let go of what the site holds open (a connection); it reopens on the next call."""
        ...
