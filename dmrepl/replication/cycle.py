"""The replication cycle (DESIGN.md section 5), driven from a pure plan.

One `sync` of a group, under the group's lock:

1. Observe and recover: repair a killed cut; let each site finish an apply an
   interrupted run committed; drop spool files of cuts never recorded; read each
   site's cursor from its own record and the spool's chain deltas, once.
2. Plan (replication.plan.plan_cycle), then cut the group with `-pit` images and,
   while it is held, list the chain delta's extents, finalize the plan with its
   size (evictions, resyncs), and capture the chain delta, each resync delta and
   each full-image seed into the spool; compare-mode seeds copy in place. A `-pit`
   that overflowed voids the whole capture.
3. Release the cut and record it; only then are compare seeds marked.
4. Ship to every reachable site, strictly in cut order, through its Receiver; a
   site's cursor moves only after its durable apply. A site that fails is reported
   and skipped; the others go on.
5. Delete spooled deltas every site has applied.

Policies (dmrepl.policy): a synchronous site whose mirror legs are healthy is marked at
the cut without a byte shipped; one whose leg failed is detached first and caught up like
any site. A site over its fall-behind limit, or a stall site whose backlog the spool
cannot hold, gets a cycle with writers held (dmrepl.replication.hold) from before the cut
until it has applied the cut, for at most its `stall_limit`; a caught-up synchronous site
joins its mirror at the end of such a cycle (`sync` runs it right after the catch-up).
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack, nullcontext, suppress
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from dmrepl import blockio, builder, delta, phases
from dmrepl.changes import next_cut_seq, require_running
from dmrepl.config import Config, GroupSpec
from dmrepl.cut import (
    HeldCut,
    check_pits,
    cow_devices,
    gate_counters,
    held_cut,
    recover,
    recover_cows,
)
from dmrepl.errors import InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import group_lock
from dmrepl.policy import Policy
from dmrepl.ranges import Extent, union
from dmrepl.replication import backlog, capture, synchronous
from dmrepl.replication.capture import ProgressFactory, no_progress
from dmrepl.replication.hold import WriterHold, writers_held
from dmrepl.replication.plan import (
    Capture,
    CyclePlan,
    Observed,
    Seed,
    SiteView,
    deliveries,
    finalize,
    plan_cycle,
    prunable,
)
from dmrepl.replication.synchronous import LegsState
from dmrepl.roles import require_primary
from dmrepl.signals import Say
from dmrepl.sites import (
    Delivery,
    Receiver,
    SiteContext,
    SiteFailure,
    SiteState,
    open_site,
)
from dmrepl.sites.base import FAILED_STATES, SpooledDelta, SpoolReader
from dmrepl.spool import Spool
from dmrepl.state import CutRecord, SiteMode, StateStore, TransferRecord
from dmrepl.statedir import StateDir

Inspect = Callable[[HeldCut, int], None]  # (the held cut, its number)
AWAIT_POLL_S = 1.0  # how often a stall site that is down is asked again while writers wait
MIRRORED = "synchronous: its replicas are mirror legs"


@dataclass
class SiteReport:
    site: str
    transport: str
    state: SiteState
    cursor: int | None
    delivered: list[Delivery] = field(default_factory=list)
    seeded: blockio.CopyStats | None = None
    detail: str = ""
    mirrored: bool = False  # synchronous: its replicas are mirror legs at the cut
    joinable: bool = False  # synchronous, detached, holds the new cut, the mirrors are sound


@dataclass
class SyncResult:
    group: str
    cut: CutRecord
    recovered: list[str]
    changed_bytes: int  # written since the spool head, at era-block granularity
    spooled_bytes: int  # size of the delta added to the spool (0 if none)
    spool_bytes: int  # spool use after the cycle
    sites: list[SiteReport]
    held_s: float = 0.0  # how long writers were held for draining or joining sites
    joined: tuple[str, ...] = ()  # synchronous sites that joined their mirrors


def sync(
    runner: Runner,
    config: Config,
    group: str,
    *,
    seed_sites: tuple[str, ...] = (),
    target_zeroed: bool = False,
    say: Say = print,
    progress: ProgressFactory = no_progress,
) -> SyncResult:
    """One replication cycle of `group` (and a (re-)seed of `seed_sites`)."""
    spec = checked_request(config, group, seed_sites)  # before the lock: nothing is touched
    with group_lock(config.state_dir, group, "sync"):
        store = StateStore(config.state_dir)
        try:
            result = _one_cycle(
                runner, config, spec, store, say, progress, seed_sites, target_zeroed
            )
            joining = tuple(site.site for site in result.sites if site.joinable)
            if joining:
                # Caught up: one more cut, shipped while writers are held, then the mirror.
                say(f"{', '.join(joining)} caught up: joining the mirror with writers held")
                joined = _one_cycle(runner, config, spec, store, say, progress, (), False, joining)
                result = _both(result, joined)
        except Exception:
            with suppress(sqlite3.Error, OSError):  # the cycle's own error is the one to show
                count_cycle(store, group, CycleResult.FAILED)
            raise
        else:
            behind = any(site.state != SiteState.IN_SYNC for site in result.sites)
            count_cycle(store, group, CycleResult.SITES_BEHIND if behind else CycleResult.OK)
            return result
        finally:
            store.close()


class CycleResult(StrEnum):
    """How a `sync` of a group ended, as `dmrepl_cycles_total` counts it."""

    OK = "ok"  # a cut, and every site holds it (exit 0)
    SITES_BEHIND = "sites_behind"  # a cut, which some site did not get
    FAILED = "failed"  # an error: no cut, or one not shipped


def count_cycle(store: StateStore, group: str, result: CycleResult) -> None:
    """Count a cycle's result and note when it ended (dmrepl.metrics reads both)."""
    store.tally(group, "", {f"cycles_{result}": 1}, stamp={f"last_{result}": time.time()})


def _both(first: SyncResult, then: SyncResult) -> SyncResult:
    """A `sync` that ran a join cycle after the first: the second's outcome, with what the
    first delivered, seeded and recovered."""
    earlier = {site.site: site for site in first.sites}
    for site in then.sites:
        before = earlier[site.site]
        site.delivered[:0] = before.delivered
        site.seeded = site.seeded or before.seeded
    return replace(
        then,
        recovered=first.recovered + then.recovered,
        changed_bytes=first.changed_bytes + then.changed_bytes,
    )


def _one_cycle(
    runner: Runner,
    config: Config,
    spec: GroupSpec,
    store: StateStore,
    say: Say,
    progress: ProgressFactory,
    seed_sites: tuple[str, ...],
    target_zeroed: bool,
    join: tuple[str, ...] = (),
) -> SyncResult:
    cycle = Cycle(runner, config, spec, store, say, progress)
    try:
        return cycle.run(set(seed_sites), target_zeroed, join=join)
    finally:
        cycle.close()


def checked_request(config: Config, group: str, seed_sites: tuple[str, ...]) -> GroupSpec:
    """The group of a `sync` or `seed`, once its sites and devices are known to be usable."""
    (spec,) = config.select(group)
    require_primary(config, group, "replicate")
    if not spec.sites:
        raise InvalidInput(
            f"group {group} has no sites to replicate to",
            hint=f"add a [group.{group}.site.NAME] table to {config.path}",
        )
    for name in seed_sites:
        spec.site(name)
    builder.require_devices(spec, "seed" if seed_sites else "sync", config.path)
    return spec


class Cycle:
    """One cycle's driver: observes, plans, and carries the plan out."""

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
        state_dir = StateDir(config.state_dir)
        self.spool = Spool(state_dir, spec.name, spec.spool_bytes)
        context = SiteContext.of(self.stacks, state_dir, say)
        self.sites = {s.name: open_site(s, context) for s in spec.sites}
        self.reports = {
            s.name: SiteReport(s.name, s.transport, SiteState.UNKNOWN, None) for s in spec.sites
        }
        self.cursors: dict[str, int | None] = {}  # the cursors this cycle knows, kept current
        self.cleanup = ExitStack()
        self.specs = {s.name: s for s in spec.sites}
        self.mirrored: set[str] = set()  # synchronous sites whose legs are joined and healthy
        self.owed: dict[str, dict[str, list[Extent]]] = {}  # placed by `reverse`, not yet sent
        self.captured: dict[Path, int] = {}  # spool files this cycle wrote -> stream checksum

    def run(
        self,
        force_seed: set[str],
        target_zeroed: bool,
        *,
        join: tuple[str, ...] = (),
        inspect: Inspect | None = None,
    ) -> SyncResult:
        """One cycle; `join`: synchronous sites to join their mirrors at its end (writers
        held); `inspect` runs once every site was shipped to, with the cut still held (its
        `-pit` images and metadata snapshots: `dmrepl verify`)."""
        with ExitStack() as kept:  # with `inspect`, the cut is held until it has run
            return self._run(force_seed, target_zeroed, join, inspect, kept)

    def _run(
        self,
        force_seed: set[str],
        target_zeroed: bool,
        join: tuple[str, ...],
        inspect: Inspect | None,
        kept: ExitStack,
    ) -> SyncResult:
        recovered = recover(self.runner, self.stacks, self.observed, self.say)
        recovered += recover_cows(self.runner, self.stacks, self.config.state_dir, self.say)
        latest = self.store.cuts(self.spec.name, limit=1)
        for orphan in self.spool.remove_orphans(latest[0].seq if latest else 0):
            recovered.append(f"removed {orphan.name} (capture of a cut never recorded)")
        # Decided from the store's cursors before any site is asked, so that writers are
        # held as early as possible: the backlog cannot grow while the sites answer.
        drains = self._drains(latest[0].seq if latest else None)
        held_for = sorted({*drains, *join})
        seq = next_cut_seq(self.store, self.spec.name, self.sites.values())
        self.spool.prepare()
        held_s = 0.0
        joined: tuple[str, ...] = ()
        with ExitStack() as holding:
            hold = None
            if held_for:
                bound = min(self.specs[name].stall_limit_s for name in held_for)
                self.say(
                    f"holding writers until {', '.join(held_for)} has the cut (at most {bound:g} s)"
                )
                hold = holding.enter_context(
                    writers_held(self.runner, self.stacks, bound, self.say)
                )
            self._synchronous_legs(force_seed)
            observed = self.observe(recovered, force_seed)
            if hold is not None:
                held_for = self._not_waited_for(held_for, observed, hold)
                observed = self._await_stalled(observed, held_for, recovered, hold)
                observed = self._seeds_deferred(observed, held_for)
                hold.check()
            plan = plan_cycle(observed)
            keep = kept if inspect is not None else None
            record, changed, the_cut = self._cut(
                plan, observed, seq, target_zeroed, hold, set(held_for), keep
            )
            self._mark_mirrored(seq)
            for name in held_for:
                self._ship(name, seq)
            if hold is not None:
                joined = self._join(join, seq, hold)
                hold.release()
                held_s = hold.held_s
                self.say(f"writers held {held_s * 1000:.0f} ms")
                self._drop_unfinished({n: r for n, r in drains.items() if n in held_for}, seq, hold)
        for name in self.sites:
            if name not in held_for and name not in self.mirrored:
                self._ship(name, seq)
        if inspect is not None:
            inspect(the_cut, seq)
        self._release_enforced(seq)
        self._joinable(seq)
        spool = self.spool.chain_deltas()
        self.spool.delete(prunable(spool, list(self.cursors.values())))
        remaining = self.spool.chain_deltas()
        return SyncResult(
            group=self.spec.name,
            cut=record,
            recovered=recovered,
            changed_bytes=changed,
            spooled_bytes=sum(f.size for f in remaining if f.seq == seq),
            spool_bytes=sum(f.size for f in remaining),
            sites=list(self.reports.values()),
            held_s=held_s,
            joined=joined,
        )

    def _cut(
        self,
        plan: CyclePlan,
        observed: Observed,
        seq: int,
        target_zeroed: bool,
        hold: WriterHold | None,
        protected: set[str],
        keep: ExitStack | None = None,
    ) -> tuple[CutRecord, int, HeldCut]:
        """Cut, capture into the spool, record the cut, mark the seeds; (record, changed,
        the cut). The cut is released before returning, unless `keep` is given: then when
        `keep` closes.

        `protected`: sites writers are held for, whose unapplied deltas are not evicted.
        The cut's steps run under the hold's lock: its bound cannot resume the gates half
        way through them, and once it has, the cut suspends them itself."""
        with self.cleanup:  # unpublished captures are deleted on the way out
            with ExitStack() as resources:
                holder = keep if keep is not None else resources
                cow = holder.enter_context(
                    cow_devices(self.runner, self.stacks, self.config.state_dir)
                )
                with hold.while_held() if hold is not None else nullcontext(False) as held_now:
                    held = holder.enter_context(
                        held_cut(
                            self.runner, self.stacks, cow_for=cow, say=self.say,
                            gates_held=held_now,
                        )
                    )  # fmt: skip
                changed, publishers, marks = self._capture(held, seq, plan, observed, protected)
                self._seed_by_compare(held, seq, plan, target_zeroed, marks)
                check_pits(self.runner, held)  # an overflowed image voids everything read
                phases.reached("captured")
                for publish in publishers:
                    publish()
            record = self.store.record_cut(
                self.spec.name, held.eras, held.stall_s, seq=seq, counters=held.counters
            )
            # A seed is marked only once its cut is recorded: a site never holds an unknown cut.
            for name, mark in marks.items():
                try:
                    mark(seq)
                except SiteFailure as exc:
                    self._site_failed(name, exc)
                    continue
                self._set_cursor(name, seq)
        return record, changed, held

    def close(self) -> None:
        """Close every site's connection (a remote receiver then exits)."""
        for site in self.sites.values():
            site.close()

    # -- 1. observe (and let each site finish what an interrupted run committed)

    def observe(self, recovered: list[str], force_seed: set[str]) -> Observed:
        views = [
            self._observe_site(name, recovered, name in force_seed)
            for name in self.sites
            if name not in self.mirrored  # marked at the cut: their mirror legs have it
        ]
        return Observed(tuple(views), tuple(self.spool.chain_deltas()), self.spec.spool_bytes)

    def _observe_site(self, name: str, recovered: list[str], force_seed: bool) -> SiteView:
        site, report = self.sites[name], self.reports[name]
        known = self.store.site(self.spec.name, name)
        stored = None if known is None else known.seq
        self.cursors[name] = stored
        compare = site.compare_seeder() is not None
        try:
            site.check()
            held = None
            if not force_seed:  # a seed overwrites everything anyway
                replayed = site.recover()
                if replayed is not None:
                    recovered.append(
                        f"site {name}: finished applying cut {replayed.seq} from its journal"
                    )
                held = site.held()
        except SiteFailure as exc:
            self._site_failed(name, exc)
            return SiteView(name, False, stored, self._known(stored), force_seed, compare)
        except OSError as exc:
            self._failed(name, SiteState.DOWN, str(exc))
            return SiteView(name, False, stored, self._known(stored), force_seed, compare)
        if force_seed:
            return SiteView(name, True, stored, self._known(stored), True, compare)
        if held is not None and held != stored:
            self._set_cursor(name, held)  # the site's own record is the truth
        elif held is None and stored is not None:
            self.store.forget_cursor(
                self.spec.name, name, "the site's journal records no applied cut"
            )
            self.cursors[name] = None
        report.cursor = held
        known_cut = self._known(held)
        if held is not None and not known_cut:
            # The store lost it (state.db deleted, or corrupt and rebuilt): without the
            # cut's eras nothing can be listed since it, so the site is compared whole.
            how = "by compare" if compare else "with a full image"
            report.detail = (
                f"holds cut {held}, which the state store does not know "
                f"(state.db lost or rebuilt): re-seeding {how}"
            )
            self.store.set_site_state(self.spec.name, name, SiteState.NEEDS_SEED, report.detail)
            self.say(f"site {name}: {report.detail}")
        owed = self.store.owed(self.spec.name, name) if held is not None else {}
        if owed:
            self.owed[name] = owed
            sectors = sum(e.length for extents in owed.values() for e in extents)
            self.say(
                f"site {name}: owed {sectors * 512} bytes the old primary wrote after cut "
                f"{held} (`dmrepl reverse`): it resyncs with them"
            )
        return SiteView(name, True, held, known_cut, False, compare, owed=bool(owed))

    def _known(self, cut: int | None) -> bool:
        return cut is not None and self.store.cut(self.spec.name, cut) is not None

    # -- 2. capture while the cut is held

    def _capture(
        self, held: HeldCut, seq: int, plan: CyclePlan, observed: Observed, protected: set[str]
    ) -> tuple[int, list[Callable[[], None]], dict[str, Callable[[int], None]]]:
        """Stage the chain delta, resync deltas and full-image seeds under temporary names.
        Returns the bytes changed since the head, the publishers, and the seeds' marks."""
        phases.reached("capture")
        changed = 0
        publishers: list[Callable[[], None]] = []
        bases: dict[int, CutRecord] = {}
        final: Capture = finalize(plan, observed, 0)
        if plan.head is not None:
            base = self._cut_record(plan.head, bases)
            ranges = capture.changed_since(self.runner, held, base)
            changed = capture.total_bytes(ranges)
            head = capture.header(self.spec.name, held, seq, base)
            size = capture.encoded_size(head, ranges)
            final = finalize(plan, observed, size, protected=frozenset(protected))
            if final.over_cap:
                self.say(
                    f"the delta of cut {seq} ({size} bytes) exceeds the spool cap "
                    f"({self.spool.cap_bytes} bytes): sites resync from this cut instead"
                )
            for evicted in final.evict:
                self.say(f"spool full: evicted {evicted.path.name}")
            self.spool.delete(final.evict)
            if final.chain_delta:
                target = self.spool.path(seq, plan.head)
                publishers.append(self._stage(held, head, ranges, target))
        for name, cursor in final.resyncs.items():
            base = self._cut_record(cursor, bases)
            ranges = capture.changed_since(self.runner, held, base)
            for device, extents in self.owed.get(name, {}).items():
                ranges[device] = union(ranges.get(device, []), extents)
            self.say(
                f"site {name}: resync from cut {cursor} ({capture.total_bytes(ranges)} bytes "
                "changed)"
            )
            self.reports[name].state = SiteState.RESYNCING
            head = capture.header(self.spec.name, held, seq, base)
            publishers.append(
                self._stage(held, head, ranges, self.spool.own_path(name, seq, cursor))
            )
        marks: dict[str, Callable[[int], None]] = {}
        for name, how in plan.seeds.items():
            if how is not Seed.FULL:
                continue
            self._start_seed(name, seq)
            head = capture.header(self.spec.name, held, seq, None)
            publishers.append(self._stage(held, head, None, self.spool.own_path(name, seq, None)))
        return changed, publishers, marks

    def _seed_by_compare(
        self,
        held: HeldCut,
        seq: int,
        plan: CyclePlan,
        target_zeroed: bool,
        marks: dict[str, Callable[[int], None]],
    ) -> None:
        """Copy the cut's images onto the replicas of sites seeded in place."""
        images = {d.stack.device.name: d.pit.path for d in held.devices if d.pit is not None}
        total = sum(s.origin_sectors * 512 for s in self.stacks)
        for name, how in plan.seeds.items():
            seeder = self.sites[name].compare_seeder()
            if how is not Seed.COMPARE or seeder is None:
                continue
            self._start_seed(name, seq)
            try:
                seeded = seeder.seed(
                    images,
                    target_zeroed=target_zeroed,
                    progress=self.progress(f"seed {name}", total),
                )
            except SiteFailure as exc:
                self._site_failed(name, exc)
                continue
            self.reports[name].seeded = seeded
            self.store.tally(self.spec.name, name, {"applied_bytes": seeded.written})
            marks[name] = seeder.mark_seeded

    def _start_seed(self, name: str, seq: int) -> None:
        self.reports[name].state = SiteState.SEEDING
        self.say(f"site {name}: initial copy from cut {seq}")

    def _stage(
        self, held: HeldCut, head: delta.DeltaHeader, ranges: capture.Ranges | None, target: Path
    ) -> Callable[[], None]:
        publish, summary = capture.stage(held, head, ranges, target, self.cleanup, self.progress)
        self.captured[target] = summary.stream_crc
        return publish

    def _cut_record(self, seq: int, cache: dict[int, CutRecord]) -> CutRecord:
        if seq not in cache:
            record = self.store.cut(self.spec.name, seq)
            assert record is not None, f"the plan used cut {seq}, which the store does not know"
            cache[seq] = record
        return cache[seq]

    # -- 4. ship

    def _ship(self, name: str, seq: int) -> None:
        """Deliver, in cut order, what takes the site from its cursor to `seq`."""
        site, report = self.sites[name], self.reports[name]
        if report.state in FAILED_STATES:
            return
        own = self.spool.own_deltas(name)
        cursor = self.cursors.get(name)
        if cursor is None and not own:
            return
        steps = deliveries(cursor, seq, self.spool.chain_deltas(), own)
        if steps is None:
            report.state = SiteState.BEHIND
            report.detail = f"at cut {cursor}; the spool no longer reaches it"
            self.store.set_site_state(self.spec.name, name, SiteState.BEHIND, report.detail)
            return
        for step in steps:
            if not self._deliver(site, step.path):
                return
        self.spool.delete(own)
        report.state = SiteState.IN_SYNC

    def _deliver(self, site: Receiver, path: Path) -> bool:
        """Send one spooled delta; False (and the site reported) if it failed."""
        try:
            size = path.stat().st_size
            if isinstance(site, SpoolReader):  # on this host: the file itself, not a copy
                delivery = site.receive_spooled(SpooledDelta(path, size, self.captured.get(path)))
            else:
                with path.open("rb", buffering=blockio.CHUNK_BYTES) as source:
                    delivery = site.receive(source)
        except delta.CorruptDelta as exc:
            # Set aside, so the next cycle resyncs the site from a fresh cut instead.
            os.rename(path, path.with_name(path.name + ".corrupt"))
            message = f"{path.name} failed its checks in transit: {exc.message}"
            self._failed(site.name, SiteState.BROKEN, message)
            return False
        except SiteFailure as exc:
            self._site_failed(site.name, exc)
            return False
        except OSError as exc:
            self._failed(site.name, SiteState.DOWN, str(exc))
            return False
        self.reports[site.name].delivered.append(delivery)
        if self.owed.pop(site.name, None) is not None:
            self.store.paid(self.spec.name, site.name)  # its resync carried them
        phases.reached("cursor")
        self._set_cursor(site.name, delivery.seq)
        moved = delivery.transfer
        shipped = size if moved is None else moved.stream_bytes
        self.store.tally(
            self.spec.name,
            site.name,
            {"shipped_bytes": shipped, "applied_bytes": delivery.data_bytes, "deliveries": 1},
        )
        if moved is not None:
            self.store.record_transfer(
                self.spec.name,
                site.name,
                TransferRecord(
                    time.time(), delivery.seq, moved.resumed_from, moved.stream_bytes,
                    moved.wire_bytes, moved.seconds,
                ),
            )  # fmt: skip
        return True

    # -- policies: synchronous legs, fall-behind limits, stall

    def _synchronous_legs(self, force_seed: set[str]) -> None:
        """Find the synchronous sites whose legs are joined in sound mirrors (they are
        marked at the cut). If any site's legs failed, or a joined site is re-seeded, every
        synchronous site leaves the mirrors (a failed write leaves its region to the origin
        alone, so no joined replica can be trusted): each catches up by era from the last
        cut it was marked at."""
        specs = [s for s in self.spec.sites if s.policy == Policy.SYNCHRONOUS]
        if not specs:
            return
        mirrors = synchronous.read_mirrors(self.runner, self.stacks, self.observed)
        legs = {s.name: synchronous.site_legs(s, mirrors) for s in specs}
        failed = [n for n, seen in legs.items() if seen.state is LegsState.FAILED]
        reseeded = [n for n in force_seed if n in legs and legs[n].state is LegsState.JOINED]
        if not failed and not reseeded:
            self.mirrored = {n for n, seen in legs.items() if seen.state is LegsState.JOINED}
            return
        why = "; ".join(
            [f"{n}: {legs[n].describe_failure()}" for n in failed]
            + [f"re-seeding {n}" for n in reseeded]
        )
        attached = [n for n, seen in legs.items() if seen.state is not LegsState.DETACHED]
        self._detach_all(attached, why)

    def _detach_all(self, sites: list[str], why: str) -> None:
        synchronous.detach_all(self.runner, self.stacks)
        for name in sites:
            text = f"left the mirror ({why}): asynchronous from its last cut until caught up"
            self.say(f"site {name}: {text}")
            self.store.record(self.spec.name, "", "synchronous", f"site {name} {text}")

    def _mark_mirrored(self, seq: int) -> None:
        """Joined sites whose mirrors are still sound after the cut held it at the cut (a
        failed leg stays marked until a reload, so sound now means sound at the cut)."""
        if not self.mirrored:
            return
        mirrors = synchronous.read_mirrors(self.runner, self.stacks, self.observed)
        legs = {n: synchronous.site_legs(self.specs[n], mirrors) for n in self.mirrored}
        broken = {n: seen for n, seen in legs.items() if seen.state is not LegsState.JOINED}
        if broken:
            why = "; ".join(f"{n}: {seen.describe_failure()}" for n, seen in broken.items())
            self._detach_all(sorted(self.mirrored), f"during the cycle: {why}")
            for name in sorted(self.mirrored):
                detail = f"left the mirror at cut {seq}; catches up by era next cycle"
                self.reports[name].state, self.reports[name].detail = SiteState.BEHIND, detail
                self.store.set_site_state(self.spec.name, name, SiteState.BEHIND, detail)
            self.mirrored = set()
            return
        for name in sorted(self.mirrored):
            report = self.reports[name]
            seeder = self.sites[name].compare_seeder()
            assert seeder is not None  # a synchronous site is a blockdev site
            try:
                seeder.mark_seeded(seq)
            except SiteFailure as exc:
                self._site_failed(name, exc)
                continue
            self._set_cursor(name, seq)
            report.state, report.mirrored = SiteState.IN_SYNC, True
            report.detail = MIRRORED

    def _joinable(self, seq: int) -> None:
        """Flag the detached synchronous sites that now hold cut `seq`, when every mirror
        is sound (`sync` then runs a join cycle for them)."""
        candidates = [
            name
            for name, spec in self.specs.items()
            if spec.policy == Policy.SYNCHRONOUS
            and name not in self.mirrored
            and self.cursors.get(name) == seq
            and self.reports[name].state is SiteState.IN_SYNC
        ]
        if not candidates:
            return
        mirrors = synchronous.read_mirrors(self.runner, self.stacks, self.observed)
        problems = synchronous.mirror_problems(mirrors)
        waiting = f"asynchronous until the mirrors are sound ({'; '.join(problems)})"
        for name in candidates:
            if problems:
                self.reports[name].detail = waiting
            else:
                self.reports[name].joinable = True

    def _join(self, join: tuple[str, ...], seq: int, hold: WriterHold) -> tuple[str, ...]:
        """Make the caught-up sites' replicas mirror legs while writers are still held (so
        each replica is exactly its origin: no copy is needed)."""
        ready = [n for n in join if self.cursors.get(n) == seq and n not in self.mirrored]
        for name in sorted(set(join) - set(ready)):
            self._not_joined(name, f"not at cut {seq}")
        if not ready:
            return ()
        with hold.while_held() as held:
            if not held:
                for name in ready:
                    self._not_joined(name, "writers were released before the join")
                return ()
            joining = {
                path
                for name in ready
                for path in synchronous.replicas_of(self.specs[name]).values()
            }
            why = synchronous.join(self.runner, self.stacks, self.observed, joining)
        if why is not None:
            for name in ready:
                self._not_joined(name, why)
            return ()
        for name in ready:
            text = f"joined the mirror at cut {seq}: synchronous"
            self.say(f"site {name}: {text}")
            self.store.record(self.spec.name, "", "synchronous", f"site {name} {text}")
            self.reports[name].mirrored = True
            self.reports[name].detail = MIRRORED
        return tuple(ready)

    def _not_joined(self, name: str, why: str) -> None:
        detail = f"holds the newest cut but did not join the mirror ({why}); retried next sync"
        self.say(f"site {name}: {detail}")
        self.reports[name].detail = detail

    def _drains(self, latest: int | None) -> dict[str, str]:
        """Sites writers are held for this cycle, and why: over a fall-behind limit, or a
        stall site whose backlog the spool may not hold (from the store's cursors: the
        sites are asked later). Logs and counts each switch."""
        drains: dict[str, str] = {}
        for spec in backlog.watched(self.spec):
            name = spec.name
            record = self.store.site(self.spec.name, name)
            if record is None or record.seq is None:
                continue  # seeded first
            cursor = record.seq
            if record.state in FAILED_STATES and spec.policy != Policy.STALL:
                continue  # an asynchronous site that was down is never waited for
            mode = self.store.site_mode(self.spec.name, name).mode
            if mode is SiteMode.DROPPED:
                if cursor == latest:
                    self._switch(name, SiteMode.NORMAL, "caught up after being dropped")
                continue  # not held for again until it has caught up
            reason = backlog.over_limit(self.store, self.spec, spec, cursor)
            if reason is None:
                continue
            if mode is not SiteMode.ENFORCED:
                self._switch(name, SiteMode.ENFORCED, reason)
            drains[name] = reason
        return drains

    def _not_waited_for(
        self, held_for: list[str], observed: Observed, hold: WriterHold
    ) -> list[str]:
        """Drop from `held_for` the asynchronous sites that are down (only a stall site is
        waited for); release the writers at once if no site is left to hold them for."""
        down = {v.name for v in observed.sites if not v.reachable}
        kept = [n for n in held_for if n not in down or self.specs[n].policy == Policy.STALL]
        for name in sorted(set(held_for) - set(kept)):
            self.say(f"site {name}: down; writers are not held for it")
        if not kept:
            hold.release()
        return kept

    def _seeds_deferred(self, observed: Observed, held_for: list[str]) -> Observed:
        """While writers are held, other sites are not seeded: a full copy would use up the
        bound the held sites need. They are planned as unreachable this cycle."""
        views = []
        for view in observed.sites:
            seeding = view.cursor is None or not view.cursor_known or view.force_seed
            if view.name in held_for or not view.reachable or not seeding:
                views.append(view)
                continue
            views.append(replace(view, reachable=False))
            deferred = (
                f"seed deferred to the next cycle: writers are held for {', '.join(held_for)}"
            )
            self.reports[view.name].detail = deferred
        return Observed(tuple(views), observed.spool, observed.cap_bytes)

    def _await_stalled(
        self, observed: Observed, held_for: list[str], recovered: list[str], hold: WriterHold
    ) -> Observed:
        """Wait (writers held) for stall sites that are down, until they answer or the
        bound passes; returns the observation with those that came back."""
        waiting = {v.name for v in observed.sites if v.name in held_for and not v.reachable}
        views = {v.name: v for v in observed.sites}
        while waiting and hold.active:
            time.sleep(AWAIT_POLL_S)
            hold.check()
            for name in sorted(waiting):
                try:
                    self.sites[name].check()  # quietly: it was reported down once
                except (SiteFailure, OSError):
                    continue
                view = self._observe_site(name, recovered, False)
                if view.reachable:
                    self.say(f"site {name}: reachable again")
                    self.reports[name].state, self.reports[name].detail = SiteState.UNKNOWN, ""
                    views[name] = view
                    waiting.discard(name)
        return Observed(tuple(views.values()), observed.spool, observed.cap_bytes)

    def _drop_unfinished(self, drained: Mapping[str, str], seq: int, hold: WriterHold) -> None:
        """Sites writers were held for that did not get the cut (the bound passed, or the
        delivery failed): dropped, so that no later cycle holds writers for them, or keeps
        the spool past its cap for them, until they have caught up."""
        for name in drained:
            if self.cursors.get(name) == seq:
                continue
            why = (
                f"writers were held {hold.bound_s:g} s (stall_limit)"
                if hold.expired
                else f"{self.reports[name].state}: {self.reports[name].detail}"
            )
            self._switch(
                name,
                SiteMode.DROPPED,
                f"did not get cut {seq} ({why}): writers go on; it resyncs when back",
            )

    def _release_enforced(self, seq: int) -> None:
        """Sites driven synchronously that are at or under their limits again."""
        now = gate_counters(s.device.name for s in self.stacks)
        for name, spec in self.specs.items():
            if self.store.site_mode(self.spec.name, name).mode is not SiteMode.ENFORCED:
                continue
            cursor = self.cursors.get(name)
            behind = backlog.site_backlog(self.store, self.spec.name, cursor, now)
            if behind is None or backlog.over_limit(self.store, self.spec, spec, cursor):
                continue
            limits = spec.fall_behind.describe() if spec.fall_behind.limited else "the spool's"
            self._switch(
                name,
                SiteMode.NORMAL,
                f"at cut {cursor}, {behind.ios} writes ({behind.bytes} bytes) behind: "
                f"within its limits ({limits})",
            )

    def _switch(self, site: str, mode: SiteMode, reason: str) -> None:
        words = {
            SiteMode.ENFORCED: "driven synchronously (writers held while it catches up)",
            SiteMode.NORMAL: f"back to its policy ({self.specs[site].policy})",
            SiteMode.DROPPED: "dropped",
        }[mode]
        self.say(f"site {site}: {words}: {reason}")
        self.store.switch_mode(self.spec.name, site, mode, reason)
        self.store.record(self.spec.name, "", "policy", f"site {site} {words}: {reason}")

    # -- bookkeeping

    def _set_cursor(self, site: str, seq: int) -> None:
        self.store.set_cursor(self.spec.name, site, seq)
        self.cursors[site] = seq
        self.reports[site].cursor = seq

    def _site_failed(self, site: str, exc: SiteFailure) -> None:
        self._failed(site, exc.state, exc.message)

    def _failed(self, site: str, state: SiteState, message: str) -> None:
        report = self.reports[site]
        report.state, report.detail = state, message
        self.store.set_site_state(self.spec.name, site, state, message)
        self.say(f"site {site}: {state}: {message}")
