"""The replication cycle (DESIGN.md section 5): recover, cut, capture, release, ship.

One `sync` of a group, under the group's lock:

1. Recover: repair a killed cut; finish a committed site journal; drop spool
   files of cuts that were never recorded.
2. Cut the group with `-pit` images and, while it is held, capture into the spool
   the delta since the spool's head (the chain every up-to-date site follows),
   a resync delta for each reachable site the chain cannot serve (the overflow
   ladder: `written-since(site era + 1)`), and a full copy for unseeded sites.
   A `-pit` that overflowed voids the whole capture.
3. Release the cut (the PIT's copy-on-write cost lasts only for local reads),
   record it.
4. Ship to every reachable site, strictly in cut order; a site's cursor moves
   only after its durable apply. A site that fails is reported and skipped;
   the others go on.
5. Delete spooled deltas every site has applied.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from dmrepl import blockio, builder, delta, phases, safefile
from dmrepl.changes import next_cut_seq, require_running
from dmrepl.config import Config, GroupSpec
from dmrepl.cut import (
    HeldCut,
    check_pits,
    cow_devices,
    held_cut,
    list_changes,
    recover,
    recover_cows,
)
from dmrepl.errors import DmreplError, InvalidInput
from dmrepl.executor import Runner
from dmrepl.journal import JournalError
from dmrepl.lock import group_lock
from dmrepl.ranges import Extent
from dmrepl.replication.status import SiteStatus as SiteStatus  # re-exported for the CLI
from dmrepl.replication.status import site_status as site_status
from dmrepl.signals import Say
from dmrepl.sites import (
    BlockdevSite,
    Delivery,
    Progress,
    ReplicaMismatch,
    Site,
    SiteDown,
    delta_file_name,
    fsync_directory,
    open_site,
)
from dmrepl.spool import Spool
from dmrepl.state import CutRecord, StateStore
from dmrepl.statedir import StateDir

# (description, total bytes) -> a callback taking bytes done since the last call.
ProgressFactory = Callable[[str, int], Progress]
_SITE_FAILURES = (SiteDown, ReplicaMismatch, JournalError, delta.CorruptDelta, OSError)


def _no_progress(_what: str, _total: int) -> Progress:
    return lambda _done: None


@dataclass
class SiteReport:
    site: str
    transport: str
    state: str  # in sync | behind | down | misconfigured | broken
    cursor: int | None
    delivered: list[Delivery] = field(default_factory=list)
    seeded: blockio.CopyStats | None = None
    detail: str = ""


@dataclass
class SyncResult:
    group: str
    cut: CutRecord
    recovered: list[str]
    changed_bytes: int  # written since the spool head, at era-block granularity
    spooled_bytes: int  # size of the delta added to the spool (0 if none)
    spool_bytes: int  # spool use after the cycle
    sites: list[SiteReport]


@dataclass
class _Plan:
    """What the held cut must produce."""

    head: int | None  # the cut the new spool delta starts from
    spool_delta: bool
    resync: dict[str, int] = field(default_factory=dict)  # site -> its cursor
    seed: list[str] = field(default_factory=list)


def sync(
    runner: Runner,
    config: Config,
    group: str,
    *,
    seed_sites: tuple[str, ...] = (),
    target_zeroed: bool = False,
    say: Say = print,
    progress: ProgressFactory = _no_progress,
) -> SyncResult:
    """One replication cycle of `group` (and a (re-)seed of `seed_sites`)."""
    (spec,) = config.select(group)
    if not spec.sites:
        raise InvalidInput(
            f"group {group} has no sites to replicate to",
            hint=f"add a [group.{group}.site.NAME] table to {config.path}",
        )
    for name in seed_sites:
        spec.site(name)
    doing = "seed" if seed_sites else "sync"
    builder.require_devices(spec, doing, config.path)  # before the lock: nothing is touched
    with group_lock(config.state_dir, group, "sync"):
        store = StateStore(config.state_dir)
        try:
            return _Cycle(runner, config, spec, store, say, progress).run(
                set(seed_sites), target_zeroed
            )
        finally:
            store.close()


class _Cycle:
    def __init__(
        self,
        runner: Runner,
        config: Config,
        spec: GroupSpec,
        store: StateStore,
        say: Say,
        progress: ProgressFactory,
    ):
        self.runner, self.config, self.spec, self.store = runner, config, spec, store
        self.say, self.progress = say, progress
        found = builder.survey(runner, [spec], check=False)
        builder.require_surveyed(spec, found, "sync", config.path)  # a path vanished since
        self.stacks, self.observed = found.stacks, found.observed
        require_running(self.stacks, self.observed)
        self.spool = Spool(StateDir(config.state_dir).spool(spec.name), spec.name, spec.spool_bytes)
        self.sites = {s.name: open_site(s, self.stacks, config.state_dir) for s in spec.sites}
        self.cleanup: ExitStack
        self.reports = {
            s.name: SiteReport(s.name, s.transport, "unknown", None) for s in spec.sites
        }

    def run(self, force_seed: set[str], target_zeroed: bool) -> SyncResult:
        recovered = recover(self.runner, self.stacks, self.observed, self.say)
        recovered += recover_cows(self.runner, self.stacks, self.config.state_dir, self.say)
        latest = self.store.cuts(self.spec.name, limit=1)
        for orphan in self.spool.remove_orphans(latest[0].seq if latest else 0):
            recovered.append(f"removed {orphan.name} (capture of a cut never recorded)")
        reachable = self._recover_sites(recovered, force_seed)
        plan = self._plan(reachable, force_seed)
        seq = self._next_seq()
        with ExitStack() as self.cleanup:  # unpublished captures are deleted on the way out
            with ExitStack() as resources:
                cow = resources.enter_context(
                    cow_devices(self.runner, self.stacks, self.config.state_dir)
                )
                held = resources.enter_context(
                    held_cut(self.runner, self.stacks, cow_for=cow, say=self.say)
                )
                changed, spooled, resyncs = self._capture(held, seq, plan, reachable)
                seeded = self._seed(held, seq, plan, reachable, target_zeroed)
                check_pits(self.runner, held)  # an overflowed image voids everything read
                phases.reached("captured")
                for publish in resyncs:
                    publish()
                if spooled is not None:
                    spooled()
            record = self.store.record_cut(self.spec.name, held.eras, held.stall_s, seq=seq)
            # A seed is marked only once its cut is recorded: a site never holds an unknown cut.
            for name, mark in seeded.items():
                mark()
                self._set_cursor(name, seq)
        for site in reachable.values():
            self._ship(site, seq)
        spool_size = self._prune()
        return SyncResult(
            self.spec.name, record, recovered, changed, self._spooled_size(seq), spool_size,
            list(self.reports.values()),
        )  # fmt: skip

    # -- 1. recovery and reachability

    def _recover_sites(self, recovered: list[str], force_seed: set[str]) -> dict[str, Site]:
        """Check each site; finish a journal an interrupted run committed (unless the site is
        about to be seeded, which overwrites everything anyway)."""
        reachable: dict[str, Site] = {}
        for name, site in self.sites.items():
            report = self.reports[name]
            try:
                site.check()
                if name in force_seed:
                    reachable[name] = site
                    continue
                replayed = site.replay()
                if replayed is not None:
                    recovered.append(
                        f"site {name}: finished applying cut {replayed.seq} from its journal"
                    )
                held = site.held_seq()
            except _SITE_FAILURES as exc:
                self._site_failed(name, exc)
                continue
            known = self.store.site(self.spec.name, name)
            if held is not None and (known is None or known.seq != held):
                self._set_cursor(name, held)  # the site's own record is the truth
            elif held is None and known is not None and known.seq is not None:
                self.store.forget_cursor(
                    self.spec.name, name, "the site's journal records no applied cut"
                )
            report.cursor = held
            if held is not None and self.store.cut(self.spec.name, held) is None:
                # The store lost it (state.db deleted, or corrupt and rebuilt): without the
                # cut's eras nothing can be listed since it, so the site is compared whole.
                report.detail = (
                    f"holds cut {held}, which the state store does not know "
                    "(state.db lost or rebuilt): re-seeding by compare"
                )
                self.store.set_site_state(self.spec.name, name, "needs seed", report.detail)
                self.say(f"site {name}: {report.detail}")
            reachable[name] = site
        return reachable

    def _plan(self, reachable: Mapping[str, Site], force_seed: set[str]) -> _Plan:
        cursors = {
            name: cursor
            for name in self.sites
            if (cursor := self._cursor(name)) is not None
            and self.store.cut(self.spec.name, cursor) is not None
        }  # sites at a cut the store knows; the others are seeded (again)
        seeded = [c for name, c in cursors.items() if name not in force_seed]
        head = self.spool.head()
        if head is None and seeded:
            head = max(seeded)
        plan = _Plan(head=head, spool_delta=False)
        for name in self.sites:
            cursor = cursors.get(name)
            if name in force_seed or cursor is None:
                if name in reachable:
                    plan.seed.append(name)
                continue
            follows = head is not None and self.spool.chain(cursor, head) is not None
            if follows:
                plan.spool_delta = True
            elif name in reachable:
                plan.resync[name] = cursor
        return plan

    def _next_seq(self) -> int:
        """The new cut's number: past every cut the store or a site knows of, so a store
        rebuilt after a loss never gives a site's cut number to a different cut."""
        return next_cut_seq(self.store, self.spec, self.config.state_dir)

    # -- 2. capture while the cut is held

    def _capture(
        self, held: HeldCut, seq: int, plan: _Plan, reachable: Mapping[str, Site]
    ) -> tuple[int, Callable[[], None] | None, list[Callable[[], None]]]:
        """Write the spool delta and resync deltas under temporary names; return publishers."""
        phases.reached("capture")
        changed = 0
        spooled: Callable[[], None] | None = None
        resync = dict(plan.resync)
        if plan.spool_delta and plan.head is not None:
            ranges = self._ranges(held, plan.head)
            changed = _bytes(ranges)
            header = self._header(held, seq, plan.head)
            size = delta.encoded_size(header, _lengths(ranges))
            evicted = self.spool.make_room(size)
            if evicted is None:
                self.say(
                    f"the delta of cut {seq} ({size} bytes) exceeds the spool cap "
                    f"({self.spool.cap_bytes} bytes): sites resync from this cut instead"
                )
            else:
                for entry in evicted:
                    self.say(f"spool full: evicted {entry.path.name}")
                spooled = self._stage(held, header, ranges, self.spool.path(seq, plan.head))
            for name in reachable:
                cursor = self._cursor(name)
                if name in plan.seed or cursor is None or name in resync:
                    continue
                if evicted is None or self.spool.chain(cursor, plan.head) is None:
                    resync[name] = cursor  # the chain no longer reaches this site
        publishers = []
        for name, cursor in resync.items():
            base = self.store.cut(self.spec.name, cursor)
            if base is None:
                self.reports[name].detail = f"cut {cursor} unknown: re-seeding"
                plan.seed.append(name)
                continue
            ranges = self._ranges(held, cursor)
            header = self._header(held, seq, cursor)
            self.say(f"site {name}: resync from cut {cursor} ({_bytes(ranges)} bytes changed)")
            self.reports[name].state = "resyncing"
            target = self.spool.resync_path(name, seq, cursor)
            publishers.append(self._stage(held, header, ranges, target))
        return changed, spooled, publishers

    def _stage(
        self,
        held: HeldCut,
        header: delta.DeltaHeader,
        ranges: Mapping[str, list[Extent]] | None,
        target: Path,
    ) -> Callable[[], None]:
        """Capture into `.<name>.partial` beside `target` now; the returned callable renames it
        into place. Publishing happens only once the `-pit` images were checked; anything
        unpublished is removed when the cycle ends."""
        partial = target.with_name(f".{target.name}.partial")
        self.cleanup.callback(partial.unlink, missing_ok=True)
        with safefile.open_new(partial, buffering=blockio.CHUNK_BYTES) as out:
            self._write_delta(out, held, header, ranges)
            out.flush()
            os.fsync(out.fileno())

        def publish() -> None:
            os.rename(partial, target)
            fsync_directory(target.parent)

        return publish

    def _ranges(self, held: HeldCut, base_seq: int) -> dict[str, list[Extent]]:
        base = self.store.cut(self.spec.name, base_seq)
        assert base is not None
        since = {
            d.stack.device.name: base.eras.get(d.stack.device.name, 0) + 1 for d in held.devices
        }
        return list_changes(self.runner, held, since)

    def _header(self, held: HeldCut, seq: int, base_seq: int | None) -> delta.DeltaHeader:
        base = None if base_seq is None else self.store.cut(self.spec.name, base_seq)
        return delta.DeltaHeader(
            group=self.spec.name,
            seq=seq,
            base_seq=base_seq,
            devices=tuple(
                delta.DeltaDevice(
                    name=d.stack.device.name,
                    sectors=d.stack.origin_sectors,
                    base_era=None if base is None else base.eras.get(d.stack.device.name, 0) + 1,
                    target_era=d.era,
                )
                for d in held.devices
            ),
            created=time.time(),
        )

    def _write_delta(
        self,
        out: object,
        held: HeldCut,
        header: delta.DeltaHeader,
        ranges: Mapping[str, list[Extent]] | None,
    ) -> delta.DeltaSummary:
        """Read the ranges (None: every non-zero chunk) from the `-pit` images into a delta."""
        writer = delta.DeltaWriter(out, header)  # type: ignore[arg-type]
        report = self.progress(f"capture cut {header.seq}", _bytes(ranges) if ranges else 0)
        for index, device in enumerate(held.devices):
            assert device.pit is not None
            fd = os.open(device.pit.path, os.O_RDONLY)
            try:
                wanted = (
                    ranges[device.stack.device.name]
                    if ranges is not None
                    else [Extent(0, device.stack.origin_sectors)]
                )
                for offset, data in blockio.read_extents(fd, wanted):
                    held.latch.check()
                    if ranges is None and not any(data):
                        continue  # a full image leaves zero chunks out
                    writer.add(index, offset, data)
                    report(len(data))
            finally:
                os.close(fd)
        return writer.finish()

    def _seed(
        self,
        held: HeldCut,
        seq: int,
        plan: _Plan,
        reachable: Mapping[str, Site],
        target_zeroed: bool,
    ) -> dict[str, Callable[[], None]]:
        """Full copies for new sites; returns what marks each seeded once the cut is safe."""
        marks: dict[str, Callable[[], None]] = {}
        images = {d.stack.device.name: d.pit.path for d in held.devices if d.pit is not None}
        for name in plan.seed:
            site = reachable[name]
            report = self.reports[name]
            report.state = "seeding"
            self.say(f"site {name}: initial copy from cut {seq}")
            total = sum(s.origin_sectors * 512 for s in self.stacks)
            try:
                if isinstance(site, BlockdevSite):
                    report.seeded = site.seed(
                        images,
                        target_zeroed=target_zeroed,
                        progress=self.progress(f"seed {name}", total),
                    )  # fmt: skip
                    marks[name] = functools.partial(site.mark_seeded, seq)
                else:
                    header = self._header(held, seq, None)
                    target = site.directory / delta_file_name(self.spec.name, seq, None)
                    marks[name] = self._stage(held, header, None, target)
            except _SITE_FAILURES as exc:
                self._site_failed(name, exc)
        return marks

    # -- 4. ship

    def _ship(self, site: Site, seq: int) -> None:
        """Deliver, in cut order, what takes the site from its cursor to `seq`."""
        name = site.name
        report = self.reports[name]
        cursor = self._cursor(name)
        if report.state in ("down", "misconfigured", "broken") or cursor is None:
            return
        resyncs = self.spool.resyncs(name)
        steps = resyncs[-1:] if resyncs else None
        if steps is None:
            chain = self.spool.chain(cursor, seq) if cursor != seq else []
            if chain is None:
                report.state = "behind"
                report.detail = f"at cut {cursor}; the spool no longer reaches it"
                self.store.set_site_state(self.spec.name, name, "behind", report.detail)
                return
            steps = [entry.path for entry in chain]
        for path in steps:
            try:
                with path.open("rb", buffering=blockio.CHUNK_BYTES) as source:
                    delivery = site.receive(source)
            except delta.CorruptDelta as exc:
                # Set aside, so the next cycle resyncs the site from a fresh cut instead.
                os.rename(path, path.with_name(path.name + ".corrupt"))
                exc.message = f"{path.name} failed its checks in transit: {exc.message}"
                self._site_failed(name, exc)
                return
            except _SITE_FAILURES as exc:
                self._site_failed(name, exc)
                return
            report.delivered.append(delivery)
            phases.reached("cursor")
            self._set_cursor(name, delivery.seq)
        for path in resyncs:
            path.unlink(missing_ok=True)
        report.state = "in sync"

    # -- bookkeeping

    def _cursor(self, site: str) -> int | None:
        known = self.store.site(self.spec.name, site)
        return None if known is None else known.seq

    def _set_cursor(self, site: str, seq: int) -> None:
        self.store.set_cursor(self.spec.name, site, seq)
        self.reports[site].cursor = seq

    def _site_failed(self, site: str, exc: Exception) -> None:
        if isinstance(exc, ReplicaMismatch):
            state = "misconfigured"
        elif isinstance(exc, (delta.CorruptDelta, JournalError)):
            state = "broken"
        else:
            state = "down"
        message = exc.message if isinstance(exc, DmreplError) else str(exc)
        report = self.reports[site]
        report.state, report.detail = state, message
        self.store.set_site_state(self.spec.name, site, state, message)
        self.say(f"site {site}: {state}: {message}")

    def _prune(self) -> int:
        cursors = [self._cursor(name) for name in self.sites]
        seeded = [c for c in cursors if c is not None]
        if seeded:
            self.spool.prune(min(seeded))
        return self.spool.used()

    def _spooled_size(self, seq: int) -> int:
        return sum(e.size for e in self.spool.entries() if e.seq == seq)


def _bytes(ranges: Mapping[str, list[Extent]] | None) -> int:
    if not ranges:
        return 0
    return sum(extent.length for extents in ranges.values() for extent in extents) * 512


def _lengths(ranges: Mapping[str, list[Extent]]) -> list[int]:
    return [extent.length * 512 for extents in ranges.values() for extent in extents]
