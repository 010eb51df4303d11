"""Synchronous sites: the replica as a leg of each device's mirror layer.

A joined replica receives every write before the write completes (dm-raid1 writes all
legs and completes once every leg has answered). A leg that fails a write is marked `D`
by the kernel and, without `handle_errors`, the write still completes on the origin:
the application never sees the failure. The cycle then detaches the site's legs (the
site falls back to tracked asynchronous mode at the last cut its legs were seen healthy
at), catches it up by era like any site, and joins it again while writers are held, so
the join needs no copy: at that moment the replica is exactly the origin.

Reading a mirror's status is safe while the era device is active; only era devices block
on a status when suspended.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from dmrepl import dm, probe
from dmrepl.errors import DmreplError, ParseError
from dmrepl.executor import Runner
from dmrepl.stack import Layer, StackSpec, mirror_target
from dmrepl.status import Health, MirrorStatus, parse_mirror_status, parse_status_line
from dmrepl.tables import Mirror, TableLine, parse_table, render_table


class LegsState(StrEnum):
    JOINED = "joined"  # every device mirrors onto the site's replica, no leg failed
    FAILED = "failed"  # some leg failed (or only some devices have one): detach, catch up
    DETACHED = "detached"  # no device mirrors onto it: the site follows by cycles


@dataclass(frozen=True)
class SiteLegs:
    """A synchronous site's legs across the group's devices."""

    site: str
    state: LegsState
    health: Mapping[str, Health | None]  # device -> its leg's health (None: not a leg now)
    regions: Mapping[str, tuple[int, int]]  # device -> (in sync, regions) of its mirror

    def describe_failure(self) -> str:
        bad = [
            f"{device} {'not a leg' if health is None else health.name.lower().replace('_', ' ')}"
            for device, health in self.health.items()
            if health is not Health.ALIVE
        ]
        return ", ".join(bad)


class MirrorLayerMissing(DmreplError):
    """A synchronous site's group runs without the mirror layer it needs."""


def _mirror_name(stack: StackSpec) -> str:
    layer = stack.get(Layer.MIRROR)
    if layer is None:  # the config gives every device of a group with one the layer
        raise MirrorLayerMissing(f"{stack.device.name} has no mirror layer")
    return layer.name


def running_legs(table: str) -> tuple[str, ...]:
    """The legs (as MAJOR:MINOR) of a running mirror layer; () when it is a linear."""
    lines = parse_table(table)
    if len(lines) != 1 or not isinstance(lines[0].target, Mirror):
        return ()
    return tuple(device for device, _ in lines[0].target.legs)


def mirror_status(runner: Runner, name: str) -> MirrorStatus | None:
    """The status of a mirror layer; None when it runs as a linear pass-through."""
    line = parse_status_line(runner.run(dm.status(name)).stdout)
    if line.target != "mirror":
        return None
    return parse_mirror_status(line.params)


def observe_legs(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    observed: Mapping[str, dm.ObservedDevice],
    site: str,
    replicas: Mapping[str, str],
) -> SiteLegs:
    """Where a synchronous site's replicas stand in the mirror layers (one status each)."""
    mirrors: dict[str, MirrorStatus | None] = {}
    for stack in stacks:
        name = _mirror_name(stack)
        if name not in observed:
            raise MirrorLayerMissing(
                f"site {site} is synchronous but {name} is not running",
                hint=f"rebuild the stack with its mirror layer: `dmrepl down "
                f"{stack.device.group}` then `dmrepl up {stack.device.group}`",
            )
        mirrors[stack.device.name] = mirror_status(runner, name)
    numbers = {device: probe.dev_id_of(path) for device, path in replicas.items()}
    return legs_in_mirrors(site, numbers, mirrors)


def legs_in_mirrors(
    site: str, replicas: Mapping[str, str | None], mirrors: Mapping[str, MirrorStatus | None]
) -> SiteLegs:
    """A synchronous site's legs as the mirror statuses show them (pure).

    `replicas`: device -> its replica's MAJOR:MINOR (None: no such device node);
    `mirrors`: device -> its mirror layer's status (None: a linear, no legs). Joined when
    every device has the replica as a healthy leg, detached when none has it as a leg,
    failed otherwise (a leg marked, or legs on only some devices).
    """
    health: dict[str, Health | None] = {}
    regions: dict[str, tuple[int, int]] = {}
    for device, replica in replicas.items():
        mirror = mirrors.get(device)
        if mirror is None:
            health[device] = None
            continue
        regions[device] = (mirror.in_sync_regions, mirror.regions)
        found = [leg.health for leg in mirror.legs if replica is not None and leg.device == replica]
        health[device] = found[0] if found else None
    values = list(health.values())
    if all(h is Health.ALIVE for h in values):
        state = LegsState.JOINED
    elif all(h is None for h in values):
        state = LegsState.DETACHED
    else:
        state = LegsState.FAILED
    return SiteLegs(site, state, health, regions)


def leg_failed(runner: Runner, stacks: tuple[StackSpec, ...], replicas: Mapping[str, str]) -> bool:
    """Whether any of the replicas' legs has failed a write since it joined (a leg's mark
    stays until the table is reloaded, so healthy now means healthy all along)."""
    for stack in stacks:
        name = _mirror_name(stack)
        status = mirror_status(runner, name)
        replica = probe.dev_id_of(replicas[stack.device.name])
        if status is None or replica is None:
            return True
        match = [leg for leg in status.legs if leg.device == replica]
        if not match or match[0].health is not Health.ALIVE:
            return True
    return False


def set_legs(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    joined: Mapping[str, tuple[str, ...]],
) -> None:
    """Reload each device's mirror layer with the replicas `joined[device]` as its legs
    (in configured order). A suspend of the mirror flushes what is in flight on it."""
    for stack in stacks:
        name = _mirror_name(stack)
        legs = tuple(r for r in stack.device.sync_replicas if r in joined[stack.device.name])
        table = mirror_target(stack.device, legs)
        layer = stack.require(Layer.MIRROR)
        runner.run(dm.load(name, render_table([TableLine(0, layer.length, table)])))
        runner.run(dm.suspend(name))
        runner.run(dm.resume(name))


def joined_replicas(
    stacks: tuple[StackSpec, ...], observed: Mapping[str, dm.ObservedDevice]
) -> dict[str, tuple[str, ...]]:
    """The synchronous replicas each device's mirror layer has as legs now."""
    joined: dict[str, tuple[str, ...]] = {}
    for stack in stacks:
        layer = stack.get(Layer.MIRROR)
        running = observed.get(layer.name) if layer else None
        try:
            legs = running_legs(running.table) if running else ()
        except ParseError:
            legs = ()
        joined[stack.device.name] = tuple(
            r for r in stack.device.sync_replicas if probe.dev_id_of(r) in legs
        )
    return joined
