"""How far each site is behind, from the gates' write counters (read-only: status, the
cycle and the run loop use it)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from dmrepl.config import Config, GroupSpec
from dmrepl.deltafiles import DeltaFile
from dmrepl.dm import mapper_path
from dmrepl.policy import Backlog, Policy, WriteCounters, backlog
from dmrepl.probe import write_counters
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


def drain_due(config: Config, groups: Sequence[GroupSpec]) -> bool:
    """Whether a site of `groups` is over its fall-behind limit now, or a stall site's
    backlog may not fit the spool: the run loop then starts a cycle at once. Reads only
    (sysfs, the state store, the spool's listing)."""
    store = StateStore.open_readonly(config.state_dir)
    if store is None:
        return False
    try:
        return any(_group_due(store, StateDir(config.state_dir), group) for group in groups)
    finally:
        store.close()


def _group_due(store: StateStore, state_dir: StateDir, group: GroupSpec) -> bool:
    watched = [s for s in group.sites if s.fall_behind.limited or s.policy == Policy.STALL]
    if not watched:
        return False
    now: dict[str, WriteCounters] = {}
    for device in group.devices:
        counters = write_counters(mapper_path(device.name))
        if counters is None:
            return False  # the stack is not up: the cycle will say so
        now[device.name] = counters
    latest = store.cuts(group.name, limit=1)
    at_latest = store.cut_counters(group.name, latest[0].seq) if latest else {}
    blocks = {d.name: d.block_sectors * 512 for d in group.devices}
    next_delta = next_delta_bound(now, at_latest, blocks)
    spool = Spool(state_dir, group.name, group.spool_bytes).chain_deltas()
    for site in watched:
        if store.site_mode(group.name, site.name).mode is SiteMode.DROPPED:
            continue
        record = store.site(group.name, site.name)
        cursor = None if record is None else record.seq
        behind = site_backlog(store, group.name, cursor, now)
        if behind is not None and site.fall_behind.exceeded(behind) is not None:
            return True
        if (
            site.policy == Policy.STALL
            and cursor is not None
            and next_delta is not None
            and pending_bytes(spool, cursor) + next_delta > group.spool_bytes
        ):
            return True
    return False
