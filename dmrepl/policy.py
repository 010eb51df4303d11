"""Site-link policies of dm-replicator, in userspace: pure values and decisions, no I/O.

`asynchronous`: a site follows by cycles. `synchronous`: the replica is a leg of the
device's dm-mirror layer, so a write completes only once the replica has it; a failed
leg falls back to tracked asynchronous mode and rejoins after catching up by era.
`stall`: when the site is over its fall-behind limit or the spool cannot hold what it
still needs, writers are held until it drains, for at most `stall_limit`.

Fall-behind limits (`ios`, `size`, `timeout`) are measured from the gates' block-layer
write counters since the site's cut: like dm-replicator's ring buffer, every write
counts, rewrites included. Over a limit the site is driven synchronously (writers held
while a cycle brings it to the cut) until it is at or under the limit again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Policy(StrEnum):
    ASYNCHRONOUS = "asynchronous"
    SYNCHRONOUS = "synchronous"
    STALL = "stall"


DEFAULT_STALL_LIMIT_S = 60.0


@dataclass(frozen=True)
class FallBehind:
    """How far a site may fall behind; None: no limit of that kind."""

    ios: int | None = None
    bytes: int | None = None
    seconds: float | None = None

    @property
    def limited(self) -> bool:
        return (self.ios, self.bytes, self.seconds) != (None, None, None)

    def exceeded(self, backlog: Backlog) -> str | None:
        """Why `backlog` is over a limit (None: at or under every limit)."""
        if self.ios is not None and backlog.ios > self.ios:
            return f"{backlog.ios} writes behind (limit {self.ios})"
        if self.bytes is not None and backlog.bytes > self.bytes:
            return f"{backlog.bytes} bytes behind (limit {self.bytes})"
        if self.seconds is not None and backlog.age_s > self.seconds:
            return f"oldest unapplied write {backlog.age_s:.1f} s old (limit {self.seconds:g} s)"
        return None

    def describe(self) -> str:
        parts = []
        if self.ios is not None:
            parts.append(f"ios {self.ios}")
        if self.bytes is not None:
            parts.append(f"size {self.bytes}")
        if self.seconds is not None:
            parts.append(f"timeout {self.seconds:g}s")
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class WriteCounters:
    """A gate's block-layer write counters (/sys/block/dm-N/stat fields 5 and 7)."""

    ios: int
    sectors: int

    def since(self, earlier: WriteCounters) -> WriteCounters:
        """Writes after `earlier`; a counter that went backwards was reset (the gate was
        rebuilt), so everything it counts now is after it (a lower bound)."""
        if self.ios < earlier.ios or self.sectors < earlier.sectors:
            return self
        return WriteCounters(self.ios - earlier.ios, self.sectors - earlier.sectors)


@dataclass(frozen=True)
class Backlog:
    """What a site has not applied: writes and bytes since its cut, and the age of the
    oldest of them (an upper bound: the time since its cut, once anything was written)."""

    ios: int
    sectors: int
    age_s: float

    @property
    def bytes(self) -> int:
        return self.sectors * 512


NONE_BEHIND = Backlog(0, 0, 0.0)


def backlog(now: WriteCounters, at_cut: WriteCounters, cut_age_s: float) -> Backlog:
    """The backlog of a site whose cut saw `at_cut` and was taken `cut_age_s` ago."""
    behind = now.since(at_cut)
    return Backlog(behind.ios, behind.sectors, max(cut_age_s, 0.0) if behind.ios else 0.0)
