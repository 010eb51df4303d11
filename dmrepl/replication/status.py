"""What `dmrepl status` shows of each site: its cursor and lag, from the state store and the
spool (no kernel access)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from dmrepl.config import Config
from dmrepl.deltafiles import chain
from dmrepl.lock import lock_holder
from dmrepl.spool import Spool
from dmrepl.state import CutRecord, SiteRecord, StateStore
from dmrepl.statedir import StateDir


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


def site_status(config: Config, group: str | None = None) -> list[SiteStatus]:
    """Every site's cursor and lag, from the state store and spool (no kernel access)."""
    result: list[SiteStatus] = []
    store = StateStore(config.state_dir)
    try:
        for spec in config.select(group):
            latest = store.cuts(spec.name, limit=1)
            newest = latest[0] if latest else None
            spool = Spool(StateDir(config.state_dir), spec.name, spec.spool_bytes).chain_deltas()
            busy = lock_holder(config.state_dir, spec.name)
            for site in spec.sites:
                known = store.site(spec.name, site.name)
                cursor = None if known is None else known.seq
                held = None if cursor is None else store.cut(spec.name, cursor)
                state = _site_state(known, cursor, newest, busy)
                lag_bytes: int | None = None
                if cursor is not None and newest is not None:
                    steps = [] if cursor == newest.seq else chain(spool, cursor, newest.seq)
                    lag_bytes = None if steps is None else sum(e.size for e in steps)
                result.append(
                    SiteStatus(
                        group=spec.name,
                        site=site.name,
                        transport=site.transport,
                        policy=site.policy,
                        state=state,
                        cursor=cursor,
                        latest_cut=None if newest is None else newest.seq,
                        lag_cuts=None if cursor is None or newest is None else newest.seq - cursor,
                        lag_eras=_era_lag(held, newest),
                        lag_bytes=lag_bytes,
                        lag_s=None if held is None else max(0.0, time.time() - held.time),
                        detail="" if known is None else known.detail,
                    )
                )
    finally:
        store.close()
    return result


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
