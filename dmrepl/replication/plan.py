"""What one replication cycle does, decided from what was observed: pure functions, no I/O.

`plan_cycle` runs before the cut: from each site's cursor, the spool's chain and the
cap it decides whether a chain delta is captured (and from which cut), which sites
need a delta of their own (the overflow ladder: a resync from their cursor, and a site
still owed ranges by `dmrepl reverse`), and which are seeded. `finalize` runs once the
chain delta's size is known (its extents listed under the held cut, nothing read yet):
which spooled deltas are evicted to fit it, and which sites thereby lose their chain and
resync. `deliveries` says what a site is sent
after the cut, and `prunable` what the spool no longer needs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from dmrepl.deltafiles import DeltaFile, chain


@dataclass(frozen=True)
class SiteView:
    """One site as observed at the start of the cycle."""

    name: str
    reachable: bool  # its check passed (and any interrupted apply was finished)
    cursor: int | None  # the cut it holds: its own record if reachable, else the last known
    cursor_known: bool = True  # the state store has that cut's eras (else: seed by compare)
    force_seed: bool = False  # `dmrepl seed --site` named it
    compare_seed: bool = False  # it can be seeded by comparing its replicas
    owed: bool = False  # placed by `dmrepl reverse`: it resyncs, its delta carrying the owed


@dataclass(frozen=True)
class Observed:
    """Everything the plan depends on."""

    sites: tuple[SiteView, ...]
    spool: tuple[DeltaFile, ...]  # the chain deltas, oldest first
    cap_bytes: int


class Seed(StrEnum):
    COMPARE = "compare"  # copy only what differs from the cut's image, in place
    FULL = "full image"  # receive a full delta of the cut


@dataclass(frozen=True)
class CyclePlan:
    """What the held cut must produce."""

    head: int | None  # the cut the new chain delta starts from; None: no chain delta
    followers: tuple[str, ...] = ()  # sites the chain serves (reachable now or not)
    resyncs: Mapping[str, int] = field(default_factory=dict)  # site -> cut its delta starts at
    seeds: Mapping[str, Seed] = field(default_factory=dict)
    unreachable: tuple[str, ...] = ()  # sites that get nothing this cycle


def plan_cycle(observed: Observed) -> CyclePlan:
    """Decide the chain delta, resyncs and seeds (see the module docstring)."""
    placed = {
        s.name: s.cursor
        for s in observed.sites
        if s.cursor is not None and s.cursor_known and not s.force_seed
    }  # sites at a cut the store knows; the others are seeded (again)
    head = observed.spool[-1].seq if observed.spool else None
    chained = [placed[s.name] for s in observed.sites if s.name in placed and not s.owed]
    if head is None and chained:
        head = max(chained)
    followers: list[str] = []
    resyncs: dict[str, int] = {}
    seeds: dict[str, Seed] = {}
    for site in observed.sites:
        cursor = placed.get(site.name)
        if cursor is None:
            if site.reachable:
                seeds[site.name] = Seed.COMPARE if site.compare_seed else Seed.FULL
            continue
        if site.owed:
            if site.reachable:
                resyncs[site.name] = cursor
            continue
        if head is not None and chain(observed.spool, cursor, head) is not None:
            followers.append(site.name)
        elif site.reachable:
            resyncs[site.name] = cursor
    return CyclePlan(
        head=head if followers else None,
        followers=tuple(followers),
        resyncs=resyncs,
        seeds=seeds,
        unreachable=tuple(s.name for s in observed.sites if not s.reachable),
    )


@dataclass(frozen=True)
class Capture:
    """The plan completed under the held cut, once the chain delta's size is known."""

    chain_delta: bool  # capture the chain delta into the spool
    evict: tuple[DeltaFile, ...]  # spooled deltas to delete first, oldest first
    resyncs: Mapping[str, int]  # site -> cut its own delta starts at (the plan's and new ones)
    over_cap: bool  # the chain delta alone is larger than the spool cap


def finalize(
    plan: CyclePlan,
    observed: Observed,
    chain_bytes: int,
    *,
    protected: frozenset[str] = frozenset(),
) -> Capture:
    """Fit the chain delta (`chain_bytes` encoded) under the cap; sites it no longer
    reaches resync from their own cursor.

    `protected` sites are the ones writers are held for this cycle (draining, or joining
    their mirror): nothing they still need is evicted and their chain delta is captured
    even past the cap, which they bring back under once they have applied it (one that
    does not is dropped and protected no more)."""
    if plan.head is None:
        return Capture(False, (), dict(plan.resyncs), False)
    views = {s.name: s for s in observed.sites}
    keep_from = min(
        (
            views[name].cursor or 0
            for name in plan.followers
            if name in protected and views[name].reachable
        ),
        default=None,
    )  # the oldest cut a protected follower is at: later deltas stay
    over_cap = chain_bytes > observed.cap_bytes and keep_from is None
    kept = list(observed.spool)
    evict: list[DeltaFile] = []
    if not over_cap:
        used = sum(f.size for f in kept)
        while kept and used + chain_bytes > observed.cap_bytes:
            if keep_from is not None and kept[0].seq > keep_from:
                break
            oldest = kept.pop(0)
            used -= oldest.size
            evict.append(oldest)
    resyncs = dict(plan.resyncs)
    for name in plan.followers:
        site = views[name]
        if not site.reachable or site.cursor is None:
            continue  # a site down now finds out next time it is back
        if over_cap or chain(kept, site.cursor, plan.head) is None:
            resyncs[name] = site.cursor
    return Capture(not over_cap, tuple(evict), resyncs, over_cap)


def deliveries(
    cursor: int | None, target: int, spool: Sequence[DeltaFile], own: Sequence[DeltaFile]
) -> list[DeltaFile] | None:
    """What takes a site from `cursor` to cut `target`, in order: its own newest delta (a
    resync or a seed) if it has one, else the chain; None if nothing reaches it."""
    if own:
        return [own[-1]]
    if cursor is None:
        return None
    if cursor == target:
        return []
    return chain(spool, cursor, target)


def prunable(spool: Sequence[DeltaFile], cursors: Sequence[int | None]) -> list[DeltaFile]:
    """Chain deltas every placed site has applied (seq <= the oldest cursor)."""
    placed = [c for c in cursors if c is not None]
    if not placed:
        return []
    oldest = min(placed)
    return [f for f in spool if f.seq <= oldest]
