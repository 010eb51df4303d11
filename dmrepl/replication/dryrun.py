"""`dmrepl sync --dry-run`: what the next cycle would do, from a read-only observation.

Observes as the cycle does (the stacks, each site's check and own record, the spool, the
state store opened read-only), plans with the same pure `plan_cycle`, and lists the cut's
exact commands (`cut_steps`). Nothing is created, changed or run that changes anything:
no lock is taken, a journal an interrupted run committed is reported rather than
finished, and leftovers of a killed cut are reported rather than repaired.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmrepl import builder
from dmrepl.changes import next_cut_seq, require_running
from dmrepl.config import Config, GroupSpec, SiteSpec
from dmrepl.cut import cow_file, cut_steps
from dmrepl.executor import Runner
from dmrepl.ops import Op
from dmrepl.policy import Policy
from dmrepl.replication import backlog, synchronous
from dmrepl.replication.cycle import checked_request
from dmrepl.replication.plan import CyclePlan, Observed, SiteView, plan_cycle
from dmrepl.replication.synchronous import LegsState
from dmrepl.sites import RecordUnreadable, SiteContext, SiteFailure, SiteState, open_site
from dmrepl.spool import Spool
from dmrepl.stack import Layer, layer_name
from dmrepl.state import SiteMode, StateStore
from dmrepl.statedir import StateDir


@dataclass(frozen=True)
class SitePreview:
    name: str
    transport: str
    failure: SiteState | None  # down, misconfigured or broken; None: reachable
    cursor: int | None  # the cut it holds (once an interrupted apply is finished)
    detail: str


@dataclass(frozen=True)
class Preview:
    group: str
    next_cut: int
    sites: tuple[SitePreview, ...]
    plan: CyclePlan
    spool_bytes: int
    cap_bytes: int
    repairs: tuple[str, ...]  # what a killed cut left, which the cycle repairs first
    before_cut: tuple[Op, ...]  # copy-on-write set-up, the empty -pit devices
    cut: tuple[Op, ...]  # writers wait for these
    after_cut: tuple[Op, ...]  # releasing the cut once captured


def preview(
    runner: Runner, config: Config, group: str, *, seed_sites: tuple[str, ...] = ()
) -> Preview:
    """What `sync` (or `seed --site`) of `group` would do now."""
    spec = checked_request(config, group, seed_sites)
    found = builder.survey(runner, [spec], check=False)
    builder.require_surveyed(spec, found, "sync", config.path)
    stacks = found.stacks
    require_running(stacks, found.observed)
    state_dir = StateDir(config.state_dir)
    context = SiteContext.of(stacks, state_dir)
    sites = {s.name: open_site(s, context) for s in spec.sites}
    store = StateStore.open_readonly(config.state_dir)
    synchronous_sites = [s for s in spec.sites if s.policy == Policy.SYNCHRONOUS]
    mirrors = synchronous.read_mirrors(runner, stacks, found.observed) if synchronous_sites else {}
    legs = {s.name: synchronous.site_legs(s, mirrors).state for s in synchronous_sites}
    try:
        previews, views = [], []
        for name, site in sites.items():
            if legs.get(name) is LegsState.JOINED and name not in seed_sites:
                note = "synchronous: its replicas are mirror legs; marked at the cut"
                previews.append(SitePreview(name, site.spec.transport, None, None, note))
                continue
            known = None if store is None else store.site(group, name)
            stored = None if known is None else known.seq
            failure: SiteState | None = None
            detail, cursor = "", stored
            try:
                site.check()
                cursor = site.held()
                pending = site.recorded()
            except SiteFailure as exc:
                failure, detail, reachable = exc.state, exc.message, False
            except RecordUnreadable as exc:
                failure, detail, reachable = SiteState.DOWN, str(exc), False
            else:
                reachable = True
                if pending is not None and pending != cursor:
                    detail = f"finishes applying cut {pending} from its journal first"
                    cursor = pending
            note = _policy_note(store, spec, site.spec, stored, legs.get(name))
            detail = "; ".join(text for text in (detail, note) if text)
            cut_known = cursor is not None and store is not None and store.cut(group, cursor)
            views.append(
                SiteView(
                    name,
                    reachable,
                    cursor,
                    cursor_known=bool(cut_known),
                    force_seed=name in seed_sites,
                    compare_seed=site.compare_seeder() is not None,
                )
            )
            previews.append(SitePreview(name, site.spec.transport, failure, cursor, detail))
        spool = Spool(state_dir, group, spec.spool_bytes).chain_deltas()
        plan = plan_cycle(Observed(tuple(views), tuple(spool), spec.spool_bytes))
        seq = next_cut_seq(store, group, sites.values())
    finally:
        if store is not None:
            store.close()
        for site in sites.values():
            site.close()
    cows = {
        s.device.name: s.device.cow or f"<loop device of {cow_file(config.state_dir, s)}>"
        for s in stacks
    }
    steps = cut_steps(stacks, cows)
    setup = tuple(
        Op(("losetup", "--find", "--show", str(cow_file(config.state_dir, s))))
        for s in stacks
        if s.device.cow is None
    )
    repairs = tuple(
        f"{name} was left {why} by an interrupted cut"
        for s in stacks
        for name, why in _leftovers(s.device.name, [layer.name for layer in s.layers], found)
    )
    return Preview(
        group=group,
        next_cut=seq,
        sites=tuple(previews),
        plan=plan,
        spool_bytes=sum(f.size for f in spool),
        cap_bytes=spec.spool_bytes,
        repairs=repairs,
        before_cut=setup + tuple(step.op for step in steps if not step.stalls),
        cut=tuple(step.op for step in steps if step.stalls),
        after_cut=tuple(s.release for s in reversed(steps) if s.release is not None),
    )


def _policy_note(
    store: StateStore | None,
    group: GroupSpec,
    site: SiteSpec,
    cursor: int | None,
    legs: LegsState | None,
) -> str:
    """What the site's policy makes the cycle do (mirror legs, writers held)."""
    if legs is LegsState.FAILED:
        return (
            "a mirror leg failed or a mirror is out of sync: every synchronous site leaves the "
            "mirror, catches up by era, then rejoins"
        )
    if legs is LegsState.DETACHED:
        return "synchronous once caught up: joins the mirror with writers held"
    if store is None or site not in backlog.watched(group):
        return ""
    if store.site_mode(group.name, site.name).mode is SiteMode.DROPPED:
        return "dropped after holding writers for its stall_limit: not waited for until back"
    reason = backlog.over_limit(store, group, site, cursor)
    if reason is None:
        return ""
    return f"writers would be held until it has the cut ({reason})"


def _leftovers(device: str, layers: list[str], found: builder.Survey) -> list[tuple[str, str]]:
    """Layers a killed cut left suspended, and a stale `-pit` image, from the observation."""
    observed = found.observed
    left = [(n, "suspended") for n in layers if n in observed and observed[n].suspended]
    pit = layer_name(device, Layer.PIT)
    if pit in found.observed:
        left.append((pit, "behind (a stale point-in-time image)"))
    return left
