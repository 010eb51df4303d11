"""Synchronous sites: the replica as a leg of each device's mirror layer.

A joined replica receives every write before the write completes (dm-raid1 writes all
legs and completes once every leg has answered). A leg that fails a write is marked `D`
by the kernel and, without `handle_errors`, the write still completes on the other legs:
the application never sees the failure. But the failed write also marks its region out of
sync (dm-raid1 do_failures), and later writes to such a region go to the first leg, the
origin, alone (do_writes) until the table is reloaded: every other leg, each joined
replica included, then misses them. So a site counts as joined only while every leg of
every device's mirror is healthy and every region in sync; on any failure the cycle
detaches every synchronous site of the group, each catches up by era from the last cut it
was recorded at, and rejoins while writers are held (no copy: the replica is then exactly
the origin, and the mirror is loaded `nosync`).

Reading a mirror's status is safe while the era device is active; only era devices block
on a status when suspended.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from enum import StrEnum

from dmrepl import dm, probe
from dmrepl.config import SiteSpec
from dmrepl.errors import DmreplError
from dmrepl.executor import Runner
from dmrepl.stack import Layer, StackSpec, mirror_target
from dmrepl.status import Health, MirrorStatus, parse_mirror_status, parse_status_line
from dmrepl.tables import TableLine, render_table


class LegsState(StrEnum):
    JOINED = "joined"  # every device mirrors onto the site's replica, every mirror sound
    FAILED = "failed"  # a leg failed, a mirror is not in sync, or only some devices have it
    DETACHED = "detached"  # no device mirrors onto it: the site follows by cycles


@dataclass(frozen=True)
class SiteLegs:
    """A synchronous site's legs across the group's devices."""

    site: str
    state: LegsState
    health: Mapping[str, Health | None]  # device -> its leg's health (None: not a leg now)
    regions: Mapping[str, tuple[int, int]]  # device -> (in sync, regions) of its mirror
    unsound: tuple[str, ...] = ()  # why a mirror holding its leg cannot be trusted

    def describe_failure(self) -> str:
        bad = [
            f"{device} {'not a leg' if health is None else health.name.lower().replace('_', ' ')}"
            for device, health in self.health.items()
            if health is not Health.ALIVE
        ]
        return ", ".join([*bad, *self.unsound])


class MirrorLayerMissing(DmreplError):
    """A synchronous site's group runs without the mirror layer it needs."""


def replicas_of(site: SiteSpec) -> Mapping[str, str]:
    """Group device -> replica path of a synchronous (blockdev) site."""
    replicas: Mapping[str, str] = getattr(site, "replicas", {})
    return replicas


def _mirror_name(stack: StackSpec) -> str:
    layer = stack.get(Layer.MIRROR)
    if layer is None:  # the config gives every device of a group with one the layer
        raise MirrorLayerMissing(f"{stack.device.name} has no mirror layer")
    return layer.name


def mirror_status(runner: Runner, name: str) -> MirrorStatus | None:
    """The status of a mirror layer; None when it runs as a linear pass-through."""
    line = parse_status_line(runner.run(dm.status(name)).stdout)
    if line.target != "mirror":
        return None
    return parse_mirror_status(line.params)


def read_mirrors(
    runner: Runner, stacks: tuple[StackSpec, ...], observed: Mapping[str, dm.ObservedDevice]
) -> dict[str, MirrorStatus | None]:
    """Each device's mirror status (one `dmsetup status` each)."""
    mirrors: dict[str, MirrorStatus | None] = {}
    for stack in stacks:
        name = _mirror_name(stack)
        if name not in observed:
            group = stack.device.group
            raise MirrorLayerMissing(
                f"group {group} has a synchronous site but {name} is not running",
                hint=f"rebuild the stack with its mirror layer: `dmrepl down {group}` then "
                f"`dmrepl up {group}`",
            )
        mirrors[stack.device.name] = mirror_status(runner, name)
    return mirrors


def unsound(device: str, mirror: MirrorStatus) -> list[str]:
    """Why a mirror's legs may not all hold what the origin holds (empty: they do)."""
    problems = [
        f"{device}: leg {leg.device} {leg.health.name.lower().replace('_', ' ')}"
        for leg in mirror.legs
        if leg.health is not Health.ALIVE
    ]
    if not mirror.in_sync:
        problems.append(
            f"{device}: mirror {mirror.in_sync_regions}/{mirror.regions} regions in sync"
        )
    return problems


def mirror_problems(mirrors: Mapping[str, MirrorStatus | None]) -> list[str]:
    """`unsound` of every mirror (a linear layer has nothing to trust)."""
    return [p for device, m in mirrors.items() if m is not None for p in unsound(device, m)]


def legs_in_mirrors(
    site: str, replicas: Mapping[str, str | None], mirrors: Mapping[str, MirrorStatus | None]
) -> SiteLegs:
    """A synchronous site's legs as the mirror statuses show them (pure).

    `replicas`: device -> its replica's MAJOR:MINOR (None: no such device node);
    `mirrors`: device -> its mirror layer's status (None: a linear, no legs). Joined when
    every device has the replica as a healthy leg of a sound mirror (`unsound`), detached
    when none has it as a leg, failed otherwise.
    """
    health: dict[str, Health | None] = {}
    regions: dict[str, tuple[int, int]] = {}
    problems: list[str] = []
    for device, replica in replicas.items():
        mirror = mirrors.get(device)
        if mirror is None:
            health[device] = None
            continue
        regions[device] = (mirror.in_sync_regions, mirror.regions)
        found = [leg.health for leg in mirror.legs if replica is not None and leg.device == replica]
        health[device] = found[0] if found else None
        if found:
            problems += unsound(device, mirror)
    values = list(health.values())
    if all(h is Health.ALIVE for h in values) and not problems:
        state = LegsState.JOINED
    elif all(h is None for h in values):
        state = LegsState.DETACHED
    else:
        state = LegsState.FAILED
    return SiteLegs(site, state, health, regions, tuple(problems))


def site_legs(site: SiteSpec, mirrors: Mapping[str, MirrorStatus | None]) -> SiteLegs:
    """`legs_in_mirrors` of a configured site (its replicas' numbers from their nodes)."""
    numbers = {device: probe.dev_id_of(path) for device, path in replicas_of(site).items()}
    return legs_in_mirrors(site.name, numbers, mirrors)


def _reload(runner: Runner, stack: StackSpec, joined: tuple[str, ...]) -> None:
    """Load the mirror layer with `joined` as its synchronous legs; a suspend makes it live
    (flushing what is in flight on it) and the resume is run whatever happens."""
    layer = stack.require(Layer.MIRROR)
    target = mirror_target(stack.device, joined)
    runner.run(dm.load(layer.name, render_table([TableLine(0, layer.length, target)])))
    try:
        runner.run(dm.suspend(layer.name))
    finally:
        runner.run(dm.resume(layer.name))


def detach_all(runner: Runner, stacks: tuple[StackSpec, ...]) -> None:
    """Reload every mirror layer without synchronous replicas. Local `mirror_legs` then
    resync from the origin: a failed write may have left regions to the origin alone.
    The replicas' page caches are dropped: the mirror wrote them below the cache, and a
    later compare or apply must read what is on them."""
    for stack in stacks:
        _reload(runner, stack, ())
    for stack in stacks:
        for replica in stack.device.sync_replicas:
            drop_page_cache(replica)


def join(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    observed: Mapping[str, dm.ObservedDevice],
    joining: Collection[str],
) -> str | None:
    """Reload each mirror, `nosync`, with the replicas `joining` as legs beside those it
    has; call with writers held, once those replicas hold exactly what the origin holds.
    Returns why it did not (None: joined): a mirror not sound now (a leg failed, regions
    out of sync). The legs it has are read from the same statuses."""
    mirrors = read_mirrors(runner, stacks, observed)
    problems = mirror_problems(mirrors)
    if problems:
        return "; ".join(problems)
    for stack in stacks:
        status = mirrors[stack.device.name]
        legs = {leg.device for leg in status.legs} if status is not None else set()
        joined = tuple(
            r for r in stack.device.sync_replicas if r in joining or probe.dev_id_of(r) in legs
        )
        _reload(runner, stack, joined)
    return None


def drop_page_cache(path: str) -> None:
    """Forget the cached pages of a block device (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
