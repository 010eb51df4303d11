"""`dmrepl changes`: take a cut of a group and list what changed since an earlier point."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from dmrepl import builder, dm
from dmrepl.config import Config
from dmrepl.cut import cut_steps, held_cut, list_changes, recover
from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.executor import Runner
from dmrepl.ops import Op
from dmrepl.ranges import Extent
from dmrepl.signals import Say
from dmrepl.sites import Receiver, RecordUnreadable, SiteContext, open_site
from dmrepl.stack import StackSpec
from dmrepl.state import CutRecord, StateStore
from dmrepl.statedir import StateDir

FIRST_ERA = 1  # a new era device starts in era 1: since era 1 means "since tracking began"
MAX_NUMBER = 2**63 - 1  # cuts are SQLite integers; dm-era's eras are 32-bit


@dataclass(frozen=True)
class DeviceChanges:
    device: str
    block_sectors: int
    origin_sectors: int
    since_era: int
    cut_era: int
    ranges: list[Extent]  # sectors, half-open

    @property
    def changed_sectors(self) -> int:
        return sum(extent.length for extent in self.ranges)


@dataclass(frozen=True)
class ChangesResult:
    group: str
    cut: CutRecord
    since: str  # what the ranges are relative to, in words
    recovered: list[str]
    devices: list[DeviceChanges]


def validate_since(since_cut: int | None, since_era: int | None) -> None:
    """The checks on --since-cut/--since-era that need neither the kernel nor the state."""
    if since_cut is not None and since_era is not None:
        raise InvalidInput("give --since-cut or --since-era, not both")
    for option, value, first in (
        ("--since-cut", since_cut, 1),
        ("--since-era", since_era, FIRST_ERA),
    ):
        if value is not None and not first <= value <= MAX_NUMBER:
            raise InvalidInput(
                f"{option} {value} is out of range: give a number from {first} to {MAX_NUMBER}",
                hint="`dmrepl status` lists the last cuts and their eras",
            )


def changes(
    runner: Runner,
    config: Config,
    group: str,
    *,
    since_cut: int | None = None,
    since_era: int | None = None,
    say: Say = print,
) -> ChangesResult:
    """Take a cut of `group` and list, per device, the ranges written since a cut or era.

    Default: since the group's previous cut (or since tracking began, if none).
    """
    validate_since(since_cut, since_era)
    (spec,) = config.select(group)
    builder.require_devices(spec, "take a cut of", config.path)
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "take a cut of", config.path)
    stacks = found.stacks
    require_running(stacks, found.observed)
    recovered = recover(runner, stacks, found.observed, say)
    store = StateStore(config.state_dir)
    try:
        since, label = _since(store, group, [s.device.name for s in stacks], since_cut, since_era)
        with held_cut(runner, stacks, say=say) as held:
            ranges = list_changes(runner, held, since)
        # Recorded only once listed and released: a run killed before this point leaves
        # no record, so the next list starts from the last completed cut (a superset).
        context = SiteContext.of(stacks, StateDir(config.state_dir))
        sites = [open_site(site, context) for site in spec.sites]
        try:
            seq = next_cut_seq(store, group, sites)
        finally:
            for site in sites:
                site.close()
        record = store.record_cut(group, held.eras, held.stall_s, seq=seq)
    finally:
        store.close()
    devices = [
        DeviceChanges(
            device=s.device.name,
            block_sectors=s.device.block_sectors,
            origin_sectors=s.origin_sectors,
            since_era=since[s.device.name],
            cut_era=record.eras[s.device.name],
            ranges=ranges[s.device.name],
        )
        for s in stacks
    ]
    return ChangesResult(group, record, label, recovered, devices)


def preview(
    runner: Runner,
    config: Config,
    group: str,
    *,
    since_cut: int | None = None,
    since_era: int | None = None,
) -> tuple[str, list[Op]]:
    """`changes --dry-run`: what the list would be relative to, and the cut's commands
    (reads only: the state store read-only, nothing cut or recorded)."""
    validate_since(since_cut, since_era)
    (spec,) = config.select(group)
    builder.require_devices(spec, "take a cut of", config.path)
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "take a cut of", config.path)
    require_running(found.stacks, found.observed)
    store = StateStore.open_readonly(config.state_dir)
    devices = [s.device.name for s in found.stacks]
    try:
        if store is None:
            if since_cut is not None:
                raise InvalidInput(f"group {group} has no cut {since_cut} (no state store yet)")
            label = f"era {since_era}" if since_era is not None else "tracking began"
        else:
            label = _since(store, group, devices, since_cut, since_era)[1]
    finally:
        if store is not None:
            store.close()
    return label, [step.op for step in cut_steps(found.stacks, None)]


def _since(
    store: StateStore,
    group: str,
    devices: list[str],
    since_cut: int | None,
    since_era: int | None,
) -> tuple[dict[str, int], str]:
    """The first era to list per device, and a description of it."""
    if since_era is not None:
        if since_era < FIRST_ERA:
            raise InvalidInput(f"--since-era {since_era}: eras start at {FIRST_ERA}")
        return {d: since_era for d in devices}, f"era {since_era}"
    if since_cut is not None:
        record = store.cut(group, since_cut)
        if record is None:
            known = ", ".join(str(c.seq) for c in reversed(store.cuts(group))) or "none yet"
            raise InvalidInput(
                f"group {group} has no cut {since_cut}", hint=f"recorded cuts: {known}"
            )
        label = f"cut {since_cut}"
    else:
        latest = store.cuts(group, limit=1)
        if not latest:
            return {d: FIRST_ERA for d in devices}, "tracking began"
        record = latest[0]
        label = f"cut {record.seq} (the previous one)"
    # A device added to the group after that cut has been tracked only since it was added.
    return {d: record.eras[d] + 1 if d in record.eras else FIRST_ERA for d in devices}, label


class StacksNotRunning(DmreplError):
    """A command that needs the group's stacks found some of their layers missing."""

    exit_code = ExitCode.NOT_RUNNING


def require_running(stacks: tuple[StackSpec, ...], owned: Mapping[str, dm.ObservedDevice]) -> None:
    missing = [layer.name for s in stacks for layer in s.layers if layer.name not in owned]
    if missing:
        raise StacksNotRunning(
            f"the group's stacks are not running (missing: {', '.join(missing)})",
            hint="run `dmrepl up` first",
        )


def next_cut_seq(store: StateStore | None, group: str, sites: Iterable[Receiver]) -> int:
    """The next cut number of a group: past the store's cuts, every cursor it holds, and every
    cut a site's own record names (also a site down now, when its record is readable here).

    A store without cuts of the group while some site's record cannot be read (a journal
    device detached, a `dir` site's directory not mounted) may have been lost while that site
    holds any cut: numbering then starts past the current Unix time, which no cut number taken
    at under one cut a second can have reached, so no number ever names two cuts.
    `store` is None when there is none yet (a dry run reads, never creates, one).
    """
    first = 1 if store is None else store.next_cut_seq(group)
    known = [first]
    unreadable = False
    for site in sites:
        record = None if store is None else store.site(group, site.name)
        if record is not None and record.seq is not None:
            known.append(record.seq + 1)
        try:
            recorded = site.recorded()
        except RecordUnreadable:
            unreadable = True
            continue
        if recorded is not None:
            known.append(recorded + 1)
    if first == 1 and unreadable:
        known.append(int(time.time()))
    return max(known)
