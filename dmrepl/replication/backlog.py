"""How far each site is behind, from the gates' write counters (read-only: status, the
cycle and the run loop use it)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from dmrepl.config import Config, GroupSpec, SiteSpec
from dmrepl.cut import gate_counters
from dmrepl.deltafiles import DeltaFile
from dmrepl.policy import Backlog, Policy, WriteCounters, backlog
from dmrepl.spool import Spool
from dmrepl.state import SiteMode, StateStore
from dmrepl.statedir import StateDir


def site_backlog(
    store: StateStore,
    group: str,
    cursor: int | None,
    now: Mapping[str, WriteCounters],
    *,
    clock: float | None = None,
) -> Backlog | None:
    """Writes to the gates since cut `cursor`; None when unknown (no cursor, or a cut or
    gate whose counters were not read)."""
    if cursor is None or not now:
        return None
    cut = store.cut(group, cursor)
    at_cut = store.cut_counters(group, cursor)
    if cut is None or set(at_cut) != set(now):
        return None
    ios = sectors = 0
    for device, counters in now.items():
        behind = counters.since(at_cut[device])
        ios, sectors = ios + behind.ios, sectors + behind.sectors
    age = (time.time() if clock is None else clock) - cut.time
    return backlog(WriteCounters(ios, sectors), WriteCounters(0, 0), age)


def pending_bytes(spool: Sequence[DeltaFile], cursor: int | None) -> int:
    """Bytes of spooled chain deltas a site at `cursor` has not applied."""
    if cursor is None:
        return 0
    return sum(f.size for f in spool if f.seq > cursor)


def next_delta_bound(
    now: Mapping[str, WriteCounters],
    at_last_cut: Mapping[str, WriteCounters],
    block_bytes: Mapping[str, int],
) -> int | None:
    """An upper bound of the next cut's chain delta: each write since the last cut
    touches at most its own bytes plus two era blocks (its unaligned ends) (None: unknown)."""
    if not now or set(at_last_cut) != set(now):
        return None
    total = 0
    for device, counters in now.items():
        behind = counters.since(at_last_cut[device])
        total += behind.sectors * 512 + 2 * behind.ios * block_bytes[device]
    return total


def over_limit(
    store: StateStore, group: GroupSpec, site: SiteSpec, cursor: int | None
) -> str | None:
    """Why `site`, at cut `cursor`, must be drained with writers held now: over its
    fall-behind limit, or (a stall site) with a backlog the spool may not hold; None if
    neither or unknown. Reads only (the gates' sysfs counters, the store, the spool)."""
    now = gate_counters(d.name for d in group.devices)  # a gate unread: no backlog known
    behind = site_backlog(store, group.name, cursor, now)
    reason = None if behind is None else site.fall_behind.exceeded(behind)
    if reason is not None or site.policy != Policy.STALL or cursor is None:
        return reason
    latest = store.cuts(group.name, limit=1)
    at_latest = store.cut_counters(group.name, latest[0].seq) if latest else {}
    blocks = {d.name: d.block_sectors * 512 for d in group.devices}
    next_delta = next_delta_bound(now, at_latest, blocks)
    spool = Spool(StateDir(store.path.parent), group.name, group.spool_bytes).chain_deltas()
    pending = pending_bytes(spool, cursor)
    if next_delta is None or pending + next_delta <= group.spool_bytes:
        return None
    return (
        f"the spool ({group.spool_bytes} bytes) may not hold its backlog "
        f"({pending} bytes spooled, up to {next_delta} more)"
    )


def watched(group: GroupSpec) -> list[SiteSpec]:
    """Sites writers may be held for: asynchronous ones with fall-behind limits, and stall
    ones (a synchronous site is either a mirror leg or catching up to become one)."""
    return [
        s
        for s in group.sites
        if s.policy != Policy.SYNCHRONOUS and (s.fall_behind.limited or s.policy == Policy.STALL)
    ]


def drain_due(config: Config, groups: Sequence[GroupSpec]) -> bool:
    """Whether a site of `groups` must be drained now (`over_limit`): the run loop then
    starts a cycle at once. Reads only."""
    store = StateStore.open_readonly(config.state_dir)
    if store is None:
        return False
    try:
        for group in groups:
            for site in watched(group):
                if store.site_mode(group.name, site.name).mode is SiteMode.DROPPED:
                    continue  # not waited for until it has caught up
                record = store.site(group.name, site.name)
                if record is not None and over_limit(store, group, site, record.seq):
                    return True
        return False
    finally:
        store.close()
