"""Changing which host is primary without a full resend: switchover, demote, reverse.

dm-era answers "what changed since era N" for any N, so both directions ship only blocks:

- `switchover` (on the primary, planned): one last cycle ships the final cut to the site,
  the group is checked untouched since (its gates closed, nothing written after the cut),
  then demoted here; an ssh site's host is then asked to take over (`dmrepl promote` runs
  there by hand for other transports).
- `demote` (on an old primary back after an unplanned failover): lists, from its own era
  metadata, what it wrote after the last cut the site is known to hold, keeps those writes
  as a delta file under `<state>/discarded/`, and records its demotion with their ranges.
- `reverse` (on the new primary): places the old primary as one of its sites at the cut it
  was promoted at, owed the ranges the demotion record lists. Its next cycle sends it
  what changed here since the promotion and what it wrote after that cut, read from this cut.

A block the old primary did not write since cut K holds K's data there; K's data is what
the new primary started from, so once those two sets are sent it equals the new primary's
cut, block for block.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from dmrepl import builder, deltafiles, roles
from dmrepl.changes import FIRST_ERA, require_running
from dmrepl.config import Config, GroupSpec
from dmrepl.cut import cow_devices, held_cut, list_changes, recover
from dmrepl.dm import observe
from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import group_lock
from dmrepl.plan import Plan
from dmrepl.ranges import Extent
from dmrepl.replication import capture
from dmrepl.replication.cycle import sync
from dmrepl.replication.dryrun import Preview, preview
from dmrepl.roles import Demotion
from dmrepl.safefile import private_dir
from dmrepl.signals import Say
from dmrepl.sites import SiteContext, SiteFailure, open_site
from dmrepl.sites.base import Promoter
from dmrepl.spool import Spool
from dmrepl.stack import Layer, StackSpec
from dmrepl.state import CutRecord, StateStore
from dmrepl.statedir import StateDir


class GatesInUse(DmreplError):
    """A gate is open (mounted or held): the group is not quiet enough to change roles."""

    exit_code = ExitCode.DEVICE_IN_USE


class SwitchoverFailed(DmreplError):
    """The site did not get the final cut, or something wrote after it: nothing changed."""

    exit_code = ExitCode.SITES_BEHIND


@dataclass(frozen=True)
class Switchover:
    group: str
    site: str
    cut: int  # the final cut, which the site holds
    seconds: float  # from the start of the final cycle to the site promoted (or this
    # host demoted, when the site is promoted by hand)
    demotion: Demotion
    record: Path
    promoted: int | None = None  # the cut the site's host took over at, when it was asked
    problem: str | None = None  # why the site's host did not take over when asked


@dataclass(frozen=True)
class Reversal:
    group: str
    site: str
    cut: int  # the cut the site is placed at (the promotion's)
    owed_bytes: int  # what the old primary wrote after it, sent with the next resync


def switchover(runner: Runner, config: Config, group: str, site: str, say: Say) -> Switchover:
    """Planned: ship the final cut to `site`, then demote this host (see the module doc)."""
    spec, stacks = _switchable(runner, config, group, site)
    started = time.monotonic()
    result = sync(runner, config, group, say=say)
    (report,) = [r for r in result.sites if r.site == site]
    if report.cursor != result.cut.seq:
        raise SwitchoverFailed(
            f"site {site} did not get the final cut {result.cut.seq} ({report.state}"
            + (f": {report.detail}" if report.detail else "")
            + "): nothing was demoted, this host is still the primary",
            hint="fix the site (`dmrepl status`) and run switchover again",
        )
    demoted, record = demote(
        runner, config, group, site, cut=result.cut.seq, reason="switchover", say=say
    )
    promoted, problem = _promote_there(config, spec, stacks, site, say)
    seconds = time.monotonic() - started
    return Switchover(group, site, result.cut.seq, seconds, demoted, record, promoted, problem)


def _promote_there(
    config: Config, spec: GroupSpec, stacks: tuple[StackSpec, ...], site: str, say: Say
) -> tuple[int | None, str | None]:
    """Ask the site's host to take over, if it runs dmrepl (an ssh site); (the cut it was
    promoted at, or why not). A failure leaves it to be promoted there by hand: this host
    is demoted either way, so there is never a second primary."""
    receiver = open_site(spec.site(site), SiteContext.of(stacks, StateDir(config.state_dir)))
    try:
        if not isinstance(receiver, Promoter):
            return None, None
        say(f"asking site {site} to take over")
        return receiver.promote(), None
    except SiteFailure as exc:
        return None, exc.message
    finally:
        receiver.close()


def demote(
    runner: Runner,
    config: Config,
    group: str,
    site: str,
    *,
    cut: int | None = None,
    reason: str = "failover",
    say: Say,
) -> tuple[Demotion, Path]:
    """Make this host a site of `site`: list and keep what it wrote after the cut the site
    holds, record the demotion, remove the group's stack. A switchover demotes only a
    group nothing wrote to after its final cut."""
    spec = _group(config, group, site)
    _not_demoted_yet(config, group)
    builder.require_devices(spec, "demote", config.path)
    with group_lock(config.state_dir, group, "demote"):
        store = StateStore(config.state_dir)
        try:
            base = _base_cut(store, group, site, cut, latest=reason == "switchover")
            stacks, tracking = _running(runner, config, spec, say)
            _require_closed(runner, stacks, reason)
            discarded, saved = _keep_discarded(
                runner, config, stacks, base, tracking, clean=reason == "switchover", say=say
            )
            demoted = Demotion(
                group, site, base.seq, reason, {s.device.name: s.origin_sectors for s in stacks},
                discarded, None if saved is None else str(saved), time.time(),
            )  # fmt: skip
            record = roles.record_demotion(config, demoted)
            store.record(
                group, "", "demoted",
                f"{reason} to site {site} at cut {base.seq}; "
                f"{demoted.discarded_bytes} bytes written after it kept in {saved}",
            )  # fmt: skip
        finally:
            store.close()
    builder.down(runner, config, group, say=say)
    return demoted, record


@dataclass(frozen=True)
class DemotionPreview:
    """What `demote --dry-run` found and what `demote` would do."""

    group: str
    site: str
    cut: int  # the cut the site holds, after which writes are listed and kept
    since: dict[str, int]  # device -> the first era that would be listed
    up: Plan | None  # the stack is down: it would be brought up over its metadata first
    down: Plan  # removing the stack (when it runs now)
    record: Path
    kept_in: Path


def demote_preview(
    runner: Runner, config: Config, group: str, site: str, *, cut: int | None = None
) -> DemotionPreview:
    """Every check `demote` makes, and what it would do; reads only (no lock, no cut)."""
    spec = _group(config, group, site)
    _not_demoted_yet(config, group)
    builder.require_devices(spec, "demote", config.path)
    store = StateStore.open_readonly(config.state_dir)
    if store is None:
        raise InvalidInput(
            f"this host has no state store: it knows no cut of group {group}",
            hint="run demote on the old primary, with its configuration",
        )
    try:
        base = _base_cut(store, group, site, cut, latest=False)
    finally:
        store.close()
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "demote", config.path)
    running = all(layer.name in found.observed for s in found.stacks for layer in s.layers)
    if running:
        _require_closed(runner, found.stacks, "failover")
    state = StateDir(config.state_dir)
    return DemotionPreview(
        group, site, base.seq,
        {s.device.name: base.eras.get(s.device.name, FIRST_ERA - 1) + 1 for s in found.stacks},
        None if running else builder.up(runner, config, group, dry_run=True),
        builder.down(runner, config, group, dry_run=True),
        state.demoted(group), state.discarded(group, base.seq),
    )  # fmt: skip


@dataclass(frozen=True)
class SwitchoverPreview:
    """What `switchover --dry-run` found: the final cycle, the stack's removal, and whether
    the site's host would be asked to take over."""

    cycle: Preview
    down: Plan
    site_takes_over: bool


def switchover_preview(runner: Runner, config: Config, group: str, site: str) -> SwitchoverPreview:
    """Every check `switchover` makes before its final cycle, and what it would do."""
    spec, stacks = _switchable(runner, config, group, site)
    cycle = preview(runner, config, group)
    receiver = open_site(spec.site(site), SiteContext.of(stacks, StateDir(config.state_dir)))
    try:
        takes_over = isinstance(receiver, Promoter)
    finally:
        receiver.close()
    return SwitchoverPreview(cycle, builder.down(runner, config, group, dry_run=True), takes_over)


def reverse(
    runner: Runner,
    config: Config,
    group: str,
    site: str,
    source: Path,
    say: Say,
    *,
    dry_run: bool = False,
) -> Reversal:
    """On the new primary: place the old primary (site `site`) at the promotion's cut,
    owed what its demotion record lists; the next cycle sends it the rest. `dry_run`:
    every check (the site asked too), nothing marked or recorded."""
    spec = _group(config, group, site)
    promoted = roles.promoted_cut(config, group)
    if promoted is None:
        raise InvalidInput(
            f"group {group} was not promoted on this host: `reverse` places an old primary as "
            "a site of the group its replicas were promoted into",
            hint="run it on the new primary, after `dmrepl promote`",
        )
    doc = roles.read_json(source)
    if doc is None:
        raise InvalidInput(f"{source} does not exist", hint="copy it from the old primary")
    demoted = Demotion.from_json(doc, str(source))
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "reverse", config.path)
    _check_record(demoted, group, promoted, {s.device.name: s.origin_sectors for s in found.stacks})
    if dry_run:
        known = StateStore.open_readonly(config.state_dir)
        try:
            _require_cut(known, group, site, promoted)
            _place(config, spec, found.stacks, site, promoted, None, say)
        finally:
            if known is not None:
                known.close()
        return Reversal(group, site, promoted, demoted.discarded_bytes)
    with group_lock(config.state_dir, group, "reverse"):
        store = StateStore(config.state_dir)
        try:
            _require_cut(store, group, site, promoted)
            # Owed before the site's journal names the cut: a crash between the two must
            # never leave it placed without the old primary's late writes to undo.
            store.owe(group, site, demoted.discarded)
            _place(config, spec, found.stacks, site, promoted, store, say)
            store.record(
                group, "", "reverse",
                f"site {site} (the old primary) placed at cut {promoted}, owed "
                f"{demoted.discarded_bytes} bytes it wrote after cut {demoted.cut}",
            )  # fmt: skip
        finally:
            store.close()
    return Reversal(group, site, promoted, demoted.discarded_bytes)


def _switchable(
    runner: Runner, config: Config, group: str, site: str
) -> tuple[GroupSpec, tuple[StackSpec, ...]]:
    """The group and its stacks, if it is primary here, running, and quiet (gates closed)."""
    spec = _group(config, group, site)
    roles.require_primary(config, group, "switch it over")
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "switch over", config.path)
    require_running(found.stacks, found.observed)
    _require_closed(runner, found.stacks, "switchover")
    return spec, found.stacks


def _not_demoted_yet(config: Config, group: str) -> None:
    earlier = roles.demotion(config, group)
    if earlier is not None:
        raise InvalidInput(
            f"group {group} was demoted on this host already (at cut {earlier.cut})",
            hint=f"give {StateDir(config.state_dir).demoted(group)} to `dmrepl reverse` on "
            "the new primary",
        )


def _require_cut(store: StateStore | None, group: str, site: str, cut: int) -> None:
    if store is None or store.cut(group, cut) is None:
        raise InvalidInput(
            f"the state store has no record of cut {cut}, at which {group} was promoted here",
            hint=f"seed site {site} instead (`dmrepl seed {group} --site {site}`)",
        )


def _group(config: Config, group: str, site: str) -> GroupSpec:
    (spec,) = config.select(group)
    spec.site(site)  # an unknown site is refused with the sites there are
    return spec


def _require_closed(runner: Runner, stacks: tuple[StackSpec, ...], doing: str) -> None:
    """Every gate must be closed: a role changes under a quiet group (as DRBD's demote)."""
    owned = observe(runner).owned
    for stack in stacks:
        gate = owned.get(stack.require(Layer.GATE).name)
        if gate is not None and gate.open_count > 0:
            raise GatesInUse(
                f"{gate.name} is open ({gate.open_count} holders: mounted, or in use)",
                hint=f"unmount it and stop what uses it first: a {doing} changes roles only "
                "while nothing writes",
            )


def _base_cut(
    store: StateStore, group: str, site: str, cut: int | None, *, latest: bool
) -> CutRecord:
    """The cut the site holds for certain: given, else the site's cursor here."""
    record = store.site(group, site)
    seq = cut if cut is not None else (None if record is None else record.seq)
    if seq is None:
        raise InvalidInput(
            f"this host has no record of a cut that site {site} holds",
            hint="give --cut K, the cut `dmrepl promote` printed on the new primary",
        )
    base = store.cut(group, seq)
    if base is None:
        known = ", ".join(str(c.seq) for c in reversed(store.cuts(group))) or "none"
        raise InvalidInput(f"group {group} has no cut {seq} here", hint=f"recorded cuts: {known}")
    newest = store.cuts(group, limit=1)[0].seq
    if latest and (record is None or record.seq != seq or newest != seq):
        raise SwitchoverFailed(
            f"cut {seq} is not both the newest cut ({newest}) and the one site {site} holds "
            f"({None if record is None else record.seq}): a cycle ran in between",
            hint="run switchover again",
        )
    return base


def _running(
    runner: Runner, config: Config, spec: GroupSpec, say: Say
) -> tuple[tuple[StackSpec, ...], bool]:
    """The group's stacks, brought up over their existing metadata if they are not running
    (an old primary back after a crash); whether change tracking went on uninterrupted."""
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "demote", config.path)
    tracking = True
    if any(layer.name not in found.observed for s in found.stacks for layer in s.layers):
        plan = builder.up(runner, config, spec.name, say=say)
        tracking = not any("new metadata" in note or "--fresh" in note for note in plan.notes)
        found = builder.survey(runner, [spec], check=False)
    recover(runner, found.stacks, found.observed, say)
    return found.stacks, tracking


def _keep_discarded(
    runner: Runner,
    config: Config,
    stacks: tuple[StackSpec, ...],
    base: CutRecord,
    tracking: bool,
    *,
    clean: bool,
    say: Say,
) -> tuple[dict[str, list[Extent]], Path | None]:
    """What was written after `base` (everything, if tracking restarted since), kept as a
    delta file from that cut; (ranges, its directory). `clean`: none may exist."""
    state = StateDir(config.state_dir)
    group = base.group
    since = {s.device.name: base.eras.get(s.device.name, FIRST_ERA - 1) + 1 for s in stacks}
    with (
        cow_devices(runner, stacks, config.state_dir) as cow,
        held_cut(runner, stacks, cow_for=cow, say=say) as held,
    ):
        if tracking and all(held.eras[d] + 1 >= era for d, era in since.items()):
            ranges = list_changes(runner, held, since)
        else:
            say("change tracking restarted since that cut: every block counts as written")
            ranges = {s.device.name: [Extent(0, s.origin_sectors)] for s in stacks}
        ranges = {d: extents for d, extents in ranges.items() if extents}
        if not ranges:
            return {}, None
        if clean:
            raise SwitchoverFailed(
                f"{capture.total_bytes(ranges)} bytes were written after the final cut "
                f"{base.seq}: nothing was demoted, this host is still the primary",
                hint="make sure nothing uses the gates, and run switchover again",
            )
        directory = state.discarded(group, base.seq)
        private_dir(directory, what="state_dir", strict_from=state.root)
        seq = base.seq + 1  # a name for it only: it is no cut of the group's history
        head = capture.header(group, held, seq, base)
        target = directory / deltafiles.file_name(group, seq, base.seq)
        deltafiles.write_durably(
            directory, target.name,
            lambda out: capture.write(out, held, head, ranges, capture.no_progress),
        )  # fmt: skip
    say(
        f"kept what this host wrote after cut {base.seq} ({capture.total_bytes(ranges)} bytes) "
        f"in {target}"
    )
    return ranges, directory


def _check_record(demoted: Demotion, group: str, promoted: int, devices: dict[str, int]) -> None:
    """The record must be this group's, from before the promotion, with devices that fit."""
    if demoted.group != group:
        raise InvalidInput(f"the demotion record is of group {demoted.group}, not {group}")
    if demoted.cut > promoted:
        raise InvalidInput(
            f"the old primary's record names cut {demoted.cut}, after cut {promoted} at which "
            f"{group} was promoted here: it cannot be this group's old primary",
            hint="give the record of the host this group failed over from",
        )
    for name, sectors in demoted.devices.items():
        if devices.get(name) != sectors:
            raise InvalidInput(
                f"device {name} of the old primary has {sectors} sectors; here "
                f"{devices.get(name, 'no such device')}",
                hint="the groups must have the same devices, of the same sizes",
            )
    for name, extents in demoted.discarded.items():
        if name not in devices or any(e.end > devices[name] for e in extents):
            raise InvalidInput(f"the record's ranges of {name} lie outside the device")


def _place(
    config: Config,
    spec: GroupSpec,
    stacks: tuple[StackSpec, ...],
    site: str,
    cut: int,
    store: StateStore | None,
    say: Say,
) -> None:
    """Mark the site's own record as holding `cut` (its replicas are the old primary's
    devices), dropping any delta still waiting for it. Without a store (a dry run): only
    check that the site can be placed."""
    state = StateDir(config.state_dir)
    receiver = open_site(spec.site(site), SiteContext.of(stacks, state))
    try:
        seeder = receiver.compare_seeder()
        if seeder is None:
            raise InvalidInput(
                f"site {site} is a {receiver.spec.transport} site, which this host cannot "
                "place at a cut",
                hint="reverse onto a blockdev, nbd or ssh site; or seed it",
            )
        try:
            receiver.check()
            if store is None:
                return
            receiver.recover()
            Spool.delete(Spool(state, spec.name, spec.spool_bytes).own_deltas(site))
            seeder.mark_seeded(cut)
        except SiteFailure as exc:
            raise DmreplError(
                f"site {site}: {exc.message}", hint=exc.hint or "bring the site back first"
            ) from None
    finally:
        receiver.close()
    store.set_cursor(spec.name, site, cut, state="resyncing")
    say(f"site {site} placed at cut {cut}")
