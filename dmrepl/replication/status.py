"""Each site's place and lag, and each group's last cuts, as `dmrepl status` shows them.

Read-only, with no kernel access: the state store is opened with SQLite `mode=ro`, the spool
is listed without making its directory, and the lock is probed without creating it. On a
fresh host this creates nothing, not even the state directory.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from dmrepl.config import Config
from dmrepl.deltafiles import DeltaFile, chain, list_files
from dmrepl.lock import lock_holder
from dmrepl.state import CutRecord, SiteRecord, StateStore, TransferRecord
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
    last_ack: float | None = None  # when the site last confirmed a durable apply (Unix time)
    last_transfer: TransferRecord | None = None  # remote sites: how the last delta crossed


@dataclass(frozen=True)
class ReplicationStatus:
    """The selected groups' latest cuts (newest first, per group) and their sites."""

    recent_cuts: dict[str, list[CutRecord]]
    sites: list[SiteStatus]


def replication_status(
    config: Config, group: str | None = None, *, recent: int = 5
) -> ReplicationStatus:
    """The last `recent` cuts of each group and every site's cursor and lag, read from the
    state store (read-only: none, or a corrupt one, is no history) and the spool."""
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
                    )
                )
    finally:
        if store is not None:
            store.close()
    return ReplicationStatus(cuts, sites)


def site_status(config: Config, group: str | None = None) -> list[SiteStatus]:
    """Every site's cursor and lag, from the state store and spool (no kernel access)."""
    return replication_status(config, group, recent=0).sites


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
