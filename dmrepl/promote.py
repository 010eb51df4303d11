"""`dmrepl promote`: at a receiver (DR) host, its replicas of a group become the group's
devices (failover).

Order matters. The promotion is recorded first (`<state>/promoted/<group>.json`), so that the
receiver refuses every new session of the old primary from then on; a session still
delivering is stopped (with `--force`; without it, promotion refuses while one runs: the old
primary still holds the group). Then the journal is replayed, so the replicas are whole at
the last cut they received completely, and dmrepl's own stack is built over them, so change
tracking starts at once. A replica with no whole cut is never promoted (the record is then
taken back).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from dmrepl import builder, deltafiles, replica
from dmrepl.config import Config
from dmrepl.errors import DmreplError, InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import Busy, holder_of, takeover_lock
from dmrepl.safefile import private_dir
from dmrepl.signals import Say
from dmrepl.sites.base import Delivery
from dmrepl.state import StateStore
from dmrepl.statedir import StateDir


@dataclass(frozen=True)
class Promotion:
    group: str
    site: str
    cut: int  # the cut the replicas held when they became the group's devices
    replayed: Delivery | None  # a committed delivery finished first
    stopped: list[int]  # pids of a receiver session that was still delivering
    gates: dict[str, str]  # device -> the gate to mount


def promoted_cut(config: Config, group: str) -> int | None:
    """The cut at which `group` was promoted on this host, if it was."""
    try:
        record = json.loads(StateDir(config.state_dir).promoted(group).read_text())
    except (OSError, ValueError):
        return None
    cut = record.get("cut") if isinstance(record, dict) else None
    return cut if isinstance(cut, int) else None


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
    if promoted_cut(config, group) is not None:
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
    private_dir(marker.parent, what="state_dir", strict_from=state.root)
    _record(marker, {"group": group, "site": site, "time": time.time()})
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
    _record(marker, {"group": group, "site": site, "cut": held, "time": time.time()})
    builder.up(runner, config, group, say=say)
    store = StateStore(config.state_dir)
    try:
        store.record(group, "", "promoted", f"replicas of site {site} at cut {held}")
    finally:
        store.close()
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


def _record(marker: Path, record: dict[str, object]) -> None:
    """Write the promotion record whole and durably (a crash leaves the old one or this)."""
    text = json.dumps(record).encode()
    deltafiles.write_durably(marker.parent, marker.name, lambda out: out.write(text))
