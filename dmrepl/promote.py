"""`dmrepl promote`: at a receiver (DR) host, its replicas of a group become the group's
devices (failover).

Without `--force` the old primary must have let go: no session of it may be delivering,
and where `[receive.GROUP.primary]` says how to reach it over ssh, it is asked
(`dmrepl role --json`) and must answer that it was demoted. `dmrepl switchover` asks for the
promotion itself, over its own session, once it has demoted its host (`promote_in_session`).

Order matters. The promotion is recorded first (`<state>/promoted/<group>.json`), so that the
receiver refuses every new session of the old primary from then on; with `--force` a
session still delivering is stopped. Then the journal is replayed, so the replicas are whole at
the last cut they received completely, and dmrepl's own stack is built over them, so change
tracking starts at once. A replica with no whole cut is never promoted (the record is then
taken back).

The promotion starts a new history of the group on this host: its state keeps that cut
alone (with the eras of a cut taken as the stack comes up), so its next cut follows it and
everything it writes from now on is listed since it; what this host's state knew of the
group before (an old primary promoted again after a failback) names another history and
goes, with the spool. An old primary is placed as a site at that cut by `dmrepl reverse`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from dmrepl import builder, replica, roles
from dmrepl.config import Config
from dmrepl.cut import held_cut
from dmrepl.errors import DmreplError, InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import Busy, holder_of, takeover_lock
from dmrepl.plan import Plan
from dmrepl.signals import Say
from dmrepl.sites.base import Delivery
from dmrepl.state import CutRecord, StateStore
from dmrepl.statedir import StateDir


@dataclass(frozen=True)
class Promotion:
    group: str
    site: str
    cut: int  # the cut the replicas held when they became the group's devices
    replayed: Delivery | None  # a committed delivery finished first
    stopped: list[int]  # pids of a receiver session that was still delivering
    gates: dict[str, str]  # device -> the gate to mount
    asked: str  # what the old primary answered, or why it was not asked


def promote(
    runner: Runner, config: Config, group: str, site: str, *, force: bool, say: Say = print
) -> Promotion:
    """Make this host's replicas of `group` (received for `site`) the group's devices.

    Without `force`, refused while the old primary delivers to this host, and, when
    `[receive.GROUP.primary]` says how to reach it, unless it answers that it no longer
    holds the group (it was demoted)."""
    replicas = _promotable(config, group, site)
    state = StateDir(config.state_dir)
    lock = state.receive_lock(group, site)
    asked = "not asked (--force)" if force else _old_primary_let_go(config, group, site)
    with (
        _promotion_recorded(state, group, site) as record,
        takeover_lock(lock, config.state_dir, "promote") as stopped,
    ):
        replayed, held = record(replica.replay(replicas))
    return _become_primary(runner, config, group, site, held, replayed, stopped, asked, say)


@dataclass(frozen=True)
class PromotionPreview:
    """What `promote --dry-run` found: the cut the replicas would hold (after the replay
    of `pending`), the old primary's answer, and the stack that `up` would build."""

    group: str
    site: str
    cut: int
    pending: int | None
    asked: str
    up: Plan


def preview(
    runner: Runner, config: Config, group: str, site: str, *, force: bool
) -> PromotionPreview:
    """Every check `promote` makes (the old primary asked too), and what it would do; reads
    only: the journal is not replayed, nothing is recorded or built."""
    replicas = _promotable(config, group, site)
    asked = "not asked (--force)" if force else _old_primary_let_go(config, group, site)
    journal = replica.journal_state(replicas)
    if journal.detail:
        raise DmreplError(f"the journal of site {site} cannot be read: {journal.detail}")
    cut = journal.pending if journal.pending is not None else journal.held
    if cut is None:
        raise DmreplError(
            f"the replicas of {group} hold no whole cut (never seeded, or a seed was cut "
            "short): promote would refuse them",
        )
    plan = builder.up(runner, config, group, dry_run=True)
    return PromotionPreview(group, site, cut, journal.pending, asked, plan)


def promote_in_session(
    runner: Runner, config: Config, group: str, site: str, say: Say
) -> Promotion:
    """A promotion the primary asks for over its own receiver session (`dmrepl switchover`,
    once it has demoted itself): the session already holds the receiver's lock."""
    replicas = _promotable(config, group, site)
    with _promotion_recorded(StateDir(config.state_dir), group, site) as record:
        replayed, held = record(replica.replay(replicas))
    asked = "asked for by the old primary, demoted (switchover)"
    return _become_primary(runner, config, group, site, held, replayed, [], asked, say)


def _promotable(config: Config, group: str, site: str) -> replica.Replicas:
    """This host's replicas of `group` from `site`, if they can become its devices."""
    if group not in config.receive:
        raise InvalidInput(
            f"{config.path} grants no replicas of group {group} ([receive.{group}])",
            hint="run promote on the DR host, with its receiver configuration",
        )
    replicas = replica.find(config, group, site)
    _check_group(config, group, replicas)
    if roles.promoted_cut(config, group) is not None:
        raise InvalidInput(
            f"group {group} was promoted on this host already",
            hint=f"if its stack is not running (an interrupted promote), `dmrepl up {group}`",
        )
    return replicas


def _old_primary_let_go(config: Config, group: str, site: str) -> str:
    """Refuse while the old primary delivers to this host or says it holds the group; what
    it answered (or why it was not asked)."""
    holder = holder_of(StateDir(config.state_dir).receive_lock(group, site))
    if holder is not None:
        raise Busy(
            f"the old primary is delivering to site {site} now ({holder}): it still holds "
            f"group {group}",
            hint="stop its cycles first (planned failover), or give --force if it is lost",
        )
    return _ask_old_primary(config, group)


def _ask_old_primary(config: Config, group: str) -> str:
    """What the old primary answered (refused if it still holds the group or cannot be
    asked), or why it was not asked."""
    address = config.receive[group].primary
    if address is None:
        return (
            f"not asked: [receive.{group}.primary] does not say how to reach it (only this "
            "receiver's lock was checked)"
        )
    try:
        answer = roles.ask(address, group)
    except roles.PrimaryUnreachable as exc:
        raise Busy(
            f"cannot ask the old primary whether it still holds group {group}: {exc.message}",
            hint="if it is lost, give --force (an unplanned failover)",
        ) from None
    said = f"the old primary ({answer.host}) answered: {answer.describe()}"
    if answer.holds_group:
        raise Busy(
            f"{said}: it still holds group {group}",
            hint=f"switch over from it (`dmrepl switchover {group} --to SITE` there), or give "
            "--force to fail over anyway",
        )
    return said


Replayed = tuple[Delivery | None, int | None]


@contextmanager
def _promotion_recorded(
    state: StateDir, group: str, site: str
) -> Iterator[Callable[[Replayed], tuple[Delivery | None, int]]]:
    """Record the promotion first (the receiver then refuses the old primary), and take it
    back if the replay fails or leaves no whole cut; the body passes the replay through."""
    marker = state.promoted(group)
    roles.write_record(state, marker, {"group": group, "site": site, "time": time.time()})

    def whole(replayed: Replayed) -> tuple[Delivery | None, int]:
        delivery, held = replayed
        if held is None:
            raise DmreplError(
                f"the replicas of {group} hold no whole cut (never seeded, or a seed was cut "
                "short): nothing was promoted",
                hint="a replica is promoted only at a cut",
            )
        return delivery, held

    try:
        yield whole
    except BaseException:
        marker.unlink(missing_ok=True)
        raise


def _become_primary(
    runner: Runner,
    config: Config,
    group: str,
    site: str,
    held: int,
    replayed: Delivery | None,
    stopped: list[int],
    asked: str,
    say: Say,
) -> Promotion:
    """The replicas hold cut `held`: record it, build the stack over them, start the
    group's new history here."""
    state = StateDir(config.state_dir)
    roles.write_record(
        state,
        state.promoted(group),
        {"group": group, "site": site, "cut": held, "time": time.time()},
    )
    builder.up(runner, config, group, say=say)
    _new_history(runner, config, group, held, say)
    store = StateStore(config.state_dir)
    try:
        store.record(group, "", "promoted", f"replicas of site {site} at cut {held}; {asked}")
    finally:
        store.close()
    roles.remove_record(state.demoted(group))  # an old primary promoted again
    gates = {d.name: f"/dev/mapper/{d.name}" for d in config.groups[group].devices}
    return Promotion(group, site, held, replayed, stopped, gates, asked)


def _check_group(config: Config, group: str, replicas: replica.Replicas) -> None:
    """The group must be configured here with the replicas as its origins."""
    spec = config.groups.get(group)
    if spec is None:
        raise InvalidInput(
            f"{config.path} has no [group.{group}] to promote the replicas into",
            hint=f"add [group.{group}.device.NAME] tables whose origin is each replica, and a "
            "metadata device for each (dmrepl tracks changes from the promotion on)",
        )
    origins = {d.name: d.origin for d in spec.devices}
    if origins != replicas.paths:
        raise InvalidInput(
            f"group {group}'s devices here must be its replicas: origins {origins}, "
            f"replicas {replicas.paths}",
            hint=f"make each [group.{group}.device.NAME] origin the replica of that device",
        )


def _new_history(runner: Runner, config: Config, group: str, cut: int, say: Say) -> None:
    """Make cut `cut` the group's only cut here, with the eras of a cut taken now (nothing
    has written to the new gates yet), and empty its spool."""
    (spec,) = config.select(group)
    found = builder.survey(runner, [spec], check=False)
    with held_cut(runner, found.stacks, say=say) as taken:
        baseline = CutRecord(group, cut, time.time(), taken.stall_s, taken.eras)
    store = StateStore(config.state_dir)
    try:
        store.new_epoch(group, baseline)
    finally:
        store.close()
    shutil.rmtree(StateDir(config.state_dir).spool(group), ignore_errors=True)
