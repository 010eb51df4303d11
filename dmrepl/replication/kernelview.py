"""What `dmrepl status` reads of the kernel for the sites' modes: the gates' write counters
and the synchronous sites' mirror legs.

Runs no command: the counters come from sysfs, the replicas' numbers from their device
nodes, and the mirror statuses from the `builder.status` the command already read (which
never asks a suspended device for its status). A stack that is not running, or whose mirror
layer is suspended, leaves its group's legs unread, and says why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from dmrepl import probe
from dmrepl.builder import DeviceState
from dmrepl.config import Config, GroupSpec
from dmrepl.cut import gate_counters
from dmrepl.policy import Policy, WriteCounters
from dmrepl.replication.status import KernelView
from dmrepl.replication.synchronous import SiteLegs, legs_in_mirrors, replicas_of
from dmrepl.stack import Layer


def observe_kernel(config: Config, group: str | None, states: Sequence[DeviceState]) -> KernelView:
    """The gates' write counters now and every synchronous site's legs, for the selected
    groups; `states` is what `builder.status` read of their stacks."""
    counters: dict[str, Mapping[str, WriteCounters]] = {}
    legs: dict[tuple[str, str], SiteLegs] = {}
    unread: dict[str, str] = {}
    for spec in config.select(group):
        counters[spec.name] = gate_counters(d.name for d in spec.devices)
        synchronous = [site for site in spec.sites if site.policy == Policy.SYNCHRONOUS]
        if not synchronous:
            continue
        by_device = {state.device: state for state in states if state.group == spec.name}
        blocked = _mirrors_unread(spec, by_device)
        if blocked:
            unread[spec.name] = "; ".join(blocked)
            continue
        mirrors = {name: state.mirror for name, state in by_device.items()}
        for site in synchronous:
            replicas = replicas_of(site)
            numbers = {d.name: _dev_id(replicas.get(d.name)) for d in spec.devices}
            legs[(spec.name, site.name)] = legs_in_mirrors(site.name, numbers, mirrors)
    return KernelView(counters, legs, unread)


def _mirrors_unread(spec: GroupSpec, states: Mapping[str, DeviceState]) -> list[str]:
    """Why the mirror statuses of `spec` do not show its legs: a device whose stack was not
    surveyed, is not running, or whose mirror layer is suspended (its status not read)."""
    problems = []
    for device in spec.devices:
        state = states.get(device.name)
        if state is None:
            problems.append(f"the devices of {device.name} cannot be probed")
        elif not state.running:
            problems.append(f"the stack of {device.name} is not running")
        else:
            problems += [
                f"{layer.name} is suspended"
                for layer in state.layers
                if layer.layer == Layer.MIRROR.value and layer.suspended
            ]
    return problems


def _dev_id(path: str | None) -> str | None:
    return None if path is None else probe.dev_id_of(path)
