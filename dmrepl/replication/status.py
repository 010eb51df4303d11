"""Each site's place, lag and mode, and each group's last cuts, as `dmrepl status` shows them.

Read-only, with no kernel access: the state store is opened with SQLite `mode=ro`, the spool
is listed without making its directory, and the lock is probed without creating it. On a
fresh host this creates nothing, not even the state directory. What the kernel shows (the
gates' write counters, the synchronous sites' mirror legs) is read by the caller
(dmrepl.replication.kernelview) and passed in as a `KernelView`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from dmrepl.config import Config, SiteSpec
from dmrepl.deltafiles import DeltaFile, chain, list_files
from dmrepl.lock import lock_holder
from dmrepl.policy import NONE_BEHIND, Backlog, Policy, WriteCounters
from dmrepl.replication.backlog import site_backlog
from dmrepl.replication.synchronous import LegsState, SiteLegs
from dmrepl.state import (
    NORMAL_MODE,
    CutRecord,
    SiteMode,
    SiteModeRecord,
    SiteRecord,
    StateStore,
    TransferRecord,
)
from dmrepl.statedir import StateDir


@dataclass(frozen=True)
class KernelView:
    """What the kernel shows now, as the caller read it (empty: not looked at)."""

    # group -> device -> its gate's block-layer write counters (unreadable ones left out)
    counters: Mapping[str, Mapping[str, WriteCounters]] = field(default_factory=dict)
    # (group, site) -> a synchronous site's legs in the mirror layers
    legs: Mapping[tuple[str, str], SiteLegs] = field(default_factory=dict)
    # group -> why its synchronous sites' legs were not read (a stack not running, ...)
    legs_unread: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModeSwitches:
    """How often a site switched: to synchronous behaviour over a fall-behind limit
    (enforced), back (released), and dropped after holding writers for `stall_limit`."""

    enforced: int = 0
    released: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class SiteStatus:
    """A site as `dmrepl status` shows it; lags are measured against the newest cut."""

    group: str
    site: str
    transport: str
    policy: str
    state: str  # in sync, behind, shipping, down, misconfigured, broken, not seeded, needs seed
    cursor: int | None
    latest_cut: int | None
    lag_cuts: int | None
    lag_eras: int | None  # most eras any device is behind by
    lag_bytes: int | None  # spooled deltas still to ship (None: a resync is needed)
    lag_s: float | None  # age of the cut the replicas hold
    detail: str
    last_ack: float | None = None  # when the site last confirmed a durable apply (Unix time)
    last_transfer: TransferRecord | None = None  # remote sites: how the last delta crossed
    # dm-replicator's words: S when every write reaches the site before it completes (its
    # replicas are healthy mirror legs) or writers are held for it (over a fall-behind
    # limit); A otherwise. `mode_reason` says why (empty: A by its policy).
    mode: str = "A"
    mode_reason: str = ""
    # Writes to the gates the site does not have: since its cut (0 for joined mirror legs;
    # None: unknown, e.g. never seeded, or the gates' counters could not be read).
    outstanding_ios: int | None = None
    outstanding_sectors: int | None = None
    outstanding_age_s: float | None = None  # at most: the time since its cut
    policy_mode: str = SiteMode.NORMAL.value  # normal, enforced or dropped (dmrepl.policy)
    policy_mode_since: float | None = None  # when it switched to it (None: never switched)
    policy_mode_reason: str = ""
    switches: ModeSwitches = ModeSwitches()
    legs: SiteLegs | None = None  # a synchronous site's mirror legs (None: not read)


@dataclass(frozen=True)
class ReplicationStatus:
    """The selected groups' latest cuts (newest first, per group) and their sites."""

    recent_cuts: dict[str, list[CutRecord]]
    sites: list[SiteStatus]


def replication_status(
    config: Config, group: str | None = None, *, recent: int = 5, seen: KernelView | None = None
) -> ReplicationStatus:
    """The last `recent` cuts of each group and every site's cursor, lag and mode, read from
    the state store (read-only: none, or a corrupt one, is no history), the spool, and what
    the caller `seen` of the kernel (without it, modes and outstanding writes are unknown)."""
    seen = KernelView() if seen is None else seen
    store = StateStore.open_readonly(config.state_dir)
    cuts: dict[str, list[CutRecord]] = {}
    sites: list[SiteStatus] = []
    try:
        for spec in config.select(group):
            latest = [] if store is None else store.cuts(spec.name, limit=max(recent, 1))
            cuts[spec.name] = latest[:recent]
            newest = latest[0] if latest else None
            spooled = list_files(StateDir(config.state_dir).spool(spec.name), spec.name)
            busy = lock_holder(config.state_dir, spec.name)
            for site in spec.sites:
                known = None if store is None else store.site(spec.name, site.name)
                cursor = None if known is None else known.seq
                held = None if store is None or cursor is None else store.cut(spec.name, cursor)
                lag_bytes = None
                if cursor is not None and newest is not None:
                    lag_bytes = _chain_bytes(spooled, cursor, newest.seq)
                record = NORMAL_MODE if store is None else store.site_mode(spec.name, site.name)
                legs = seen.legs.get((spec.name, site.name))
                mode, mode_reason = site_mode(site, record, legs, seen.legs_unread.get(spec.name))
                behind: Backlog | None = None
                if mode == "S" and legs is not None and legs.state is LegsState.JOINED:
                    behind = NONE_BEHIND  # the mirror wrote each write to its replicas
                elif store is not None:
                    counters = seen.counters.get(spec.name, {})
                    behind = site_backlog(store, spec.name, cursor, counters)
                sites.append(
                    SiteStatus(
                        group=spec.name,
                        site=site.name,
                        transport=site.transport,
                        policy=site.policy,
                        state=_site_state(known, cursor, newest, busy),
                        cursor=cursor,
                        latest_cut=None if newest is None else newest.seq,
                        lag_cuts=None if cursor is None or newest is None else newest.seq - cursor,
                        lag_eras=_era_lag(held, newest),
                        lag_bytes=lag_bytes,
                        lag_s=None if held is None else max(0.0, time.time() - held.time),
                        detail="" if known is None else known.detail,
                        last_ack=None if known is None else known.applied,
                        last_transfer=store.last_transfer(spec.name, site.name)
                        if store is not None
                        else None,
                        mode=mode,
                        mode_reason=mode_reason,
                        outstanding_ios=None if behind is None else behind.ios,
                        outstanding_sectors=None if behind is None else behind.sectors,
                        outstanding_age_s=None if behind is None else behind.age_s,
                        policy_mode=record.mode.value,
                        policy_mode_since=record.since or None,
                        policy_mode_reason=record.reason,
                        switches=ModeSwitches(record.enforced, record.released, record.dropped),
                        legs=legs,
                    )
                )
    finally:
        if store is not None:
            store.close()
    return ReplicationStatus(cuts, sites)


def site_status(config: Config, group: str | None = None) -> list[SiteStatus]:
    """Every site's cursor and lag, from the state store and spool (no kernel access)."""
    return replication_status(config, group, recent=0).sites


def site_mode(
    site: SiteSpec, record: SiteModeRecord, legs: SiteLegs | None, legs_unread: str | None
) -> tuple[str, str]:
    """S or A, as dm-replicator's status says of a site link, and why.

    S: a synchronous site whose replicas are healthy legs of every device's mirror (each
    write completes only once they have it), or a site over its fall-behind limit that
    writers are held for (`enforced`). A: every other site, including a synchronous one
    that left the mirror and follows by cycles until it has caught up. The store's record
    (`record.reason`, `record.since`) says more of an enforced or dropped site.
    """
    if site.policy == Policy.SYNCHRONOUS and legs is not None and legs.state is LegsState.JOINED:
        return "S", "synchronous: its replicas are healthy mirror legs"
    if record.mode is SiteMode.ENFORCED:
        return "S", "over its fall-behind limit: driven synchronously"
    if site.policy == Policy.SYNCHRONOUS:
        if legs is None:
            return "A", f"mirror legs not read: {legs_unread or 'no stack was looked at'}"
        if legs.state is LegsState.DETACHED:
            return "A", "not a mirror leg: follows by cycles until it joins"
        return "A", f"a leg failed ({legs.describe_failure()}): follows by cycles"
    if record.mode is SiteMode.DROPPED:
        return "A", "dropped after holding writers for stall_limit"
    return "A", ""


def _chain_bytes(spooled: list[DeltaFile], cursor: int, target: int) -> int | None:
    """Bytes of the spooled deltas that take a replica from cut `cursor` to cut `target`
    (0 when it is there); None when the spool no longer reaches it (a resync is needed)."""
    steps = chain(spooled, cursor, target)
    return None if steps is None else sum(f.size for f in steps)


def _site_state(
    known: SiteRecord | None, cursor: int | None, newest: CutRecord | None, busy: str | None
) -> str:
    if busy is not None:
        return "shipping"
    if known is not None and known.state in ("down", "misconfigured", "broken", "needs seed"):
        return known.state
    if cursor is None:
        return "not seeded"
    return "in sync" if newest is None or cursor == newest.seq else "behind"


def _era_lag(held: CutRecord | None, newest: CutRecord | None) -> int | None:
    if held is None or newest is None:
        return None
    return max((newest.eras[d] - held.eras.get(d, 0) for d in newest.eras), default=0)
