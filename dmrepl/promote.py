"""`dmrepl promote`: at a receiver (DR) host, its replicas of a group become the group's
devices (failover).

Order matters. The promotion is recorded first (`<state>/promoted/<group>.json`), so that the
receiver refuses every new session of the old primary from then on; a session still
delivering is stopped (with `--force`; without it, promotion refuses while one runs: the old
primary still holds the group). Then the journal is replayed, so the replicas are whole at
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
from dataclasses import dataclass

from dmrepl import builder, replica, roles
from dmrepl.config import Config
from dmrepl.cut import held_cut
from dmrepl.errors import DmreplError, InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import Busy, holder_of, takeover_lock
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


def promote(
    runner: Runner, config: Config, group: str, site: str, *, force: bool, say: Say = print
) -> Promotion:
    """Make this host's replicas of `group` (received for `site`) the group's devices."""
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
    state = StateDir(config.state_dir)
    lock = state.receive_lock(group, site)
    holder = None if force else holder_of(lock)
    if holder is not None:
        raise Busy(
            f"the old primary is delivering to site {site} now ({holder}): it still holds "
            f"group {group}",
            hint="stop its cycles first (planned failover), or give --force if it is lost",
        )
    marker = state.promoted(group)
    roles.write_record(state, marker, {"group": group, "site": site, "time": time.time()})
    try:
        with takeover_lock(lock, config.state_dir, "promote") as stopped:
            replayed, held = replica.replay(replicas)
        if held is None:
            raise DmreplError(
                f"the replicas of {group} hold no whole cut (never seeded, or a seed was cut "
                "short): nothing was promoted",
                hint="a replica is promoted only at a cut",
            )
    except BaseException:
        marker.unlink(missing_ok=True)
        raise
    roles.write_record(
        state, marker, {"group": group, "site": site, "cut": held, "time": time.time()}
    )
    builder.up(runner, config, group, say=say)
    _new_history(runner, config, group, held, say)
    store = StateStore(config.state_dir)
    try:
        store.record(group, "", "promoted", f"replicas of site {site} at cut {held}")
    finally:
        store.close()
    roles.remove_record(state.demoted(group))  # an old primary promoted again
    gates = {d.name: f"/dev/mapper/{d.name}" for d in config.groups[group].devices}
    return Promotion(group, site, held, replayed, stopped, gates)


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
