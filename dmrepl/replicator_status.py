"""`dmrepl status --format replicator`: a group's status in dm-replicator's words.

The lines `dmsetup status` printed for the 2009 patches' targets (docs/replication.md,
"Status in the replicator's words"); the 2009 code is the reference for the forms:

    <group>-replicator: 0 <log_size> replicator <link>... <ios>/<sectors>/<log_size>
    <device>: 0 <sectors> replicator-dev <log maj:min> <dev_nr> <device on link>...

- `<link>` per site link, slink 0 first: `<S|A>,<outstanding ios>,<outstanding sectors>`.
  S: every write reaches the site before it completes (healthy mirror legs) or writers are
  held for it (over a fall-behind limit); A otherwise. `-` for a count dmrepl does not know
  (a site never seeded, or gate counters not readable).
- `<ios>/<sectors>/<log_size>`: the outstanding writes summed over the links whose counts
  are known (as the ring buffer summed them), and the spool's cap in sectors (the log size
  `dmrepl export-table` gives the ring buffer).
- `<log maj:min>`: dmrepl has no replicator control device; its log is the spool, so this is
  the device of the filesystem holding the state directory (`0:0` before it exists).
- `<device on link>`: `<A|R|W>,<in sync>[+]/<regions>` for a synchronous site's mirror leg
  (its health: A alive, R a read failed, W any other failure; the counts are the mirror's,
  `+` while it resynchronises), `<A|W>,-` where there is no dirty log (slink 0, asynchronous
  sites, a synchronous site that is not a leg), W when the site is down, misconfigured or
  broken.

Site links are numbered as `dmrepl export-table` numbers them (every site has a number,
`dir` and `ssh` sites too); devices in configuration order from 0. Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from dmrepl.config import GroupSpec
from dmrepl.replication.status import SiteStatus
from dmrepl.replicator_table import link_numbers
from dmrepl.status import Health

# A leg's health in dm-replicator's letters; every failure not listed is a write error (W).
_ACCESS = {Health.ALIVE: "A", Health.READ_FAILED: "R"}
# Site states in which no copy can be written to the site: a link that is down.
_LINK_DOWN = frozenset({"down", "misconfigured", "broken"})


@dataclass(frozen=True)
class SiteLink:
    """One site link of the `replicator` line."""

    number: int
    site: str  # "" for slink 0: the local devices
    synchronous: bool  # S (else A)
    ios: int | None  # outstanding writes (None: unknown)
    sectors: int | None

    def render(self) -> str:
        return f"{'S' if self.synchronous else 'A'},{_count(self.ios)},{_count(self.sectors)}"


@dataclass(frozen=True)
class DeviceOnLink:
    """A device on one site link, in its `replicator-dev` line."""

    access: str  # A (accessible), R (read error) or W (write error or link down)
    regions: tuple[int, int] | None  # (in sync, regions) of its dirty log; None: none

    def render(self) -> str:
        if self.regions is None:
            return f"{self.access},-"
        in_sync, regions = self.regions
        return f"{self.access},{in_sync}{'+' if in_sync < regions else ''}/{regions}"


@dataclass(frozen=True)
class ReplicatedDevice:
    """One `replicator-dev` line."""

    name: str  # the gate's dm name
    number: int
    sectors: int
    links: tuple[DeviceOnLink, ...]  # in the order of the group's links


@dataclass(frozen=True)
class ReplicatorStatus:
    """A group as dm-replicator's two targets reported it."""

    group: str
    log_device: str  # MAJOR:MINOR
    log_sectors: int
    links: tuple[SiteLink, ...]  # slink 0 first, then by number
    devices: tuple[ReplicatedDevice, ...]
    skipped: tuple[str, ...]  # devices without a line, and why

    @property
    def name(self) -> str:
        return f"{self.group}-replicator"


LOCAL_LINK = SiteLink(0, "", synchronous=False, ios=0, sectors=0)
LOCAL_DEVICE = DeviceOnLink("A", None)


def replicator_status(
    group: GroupSpec,
    sites: Sequence[SiteStatus],
    gate_sectors: Mapping[str, int | None],
    log_device: str,
) -> ReplicatorStatus:
    """The group's status lines from its sites' status and its running devices.

    `gate_sectors`: each device's size when its stack is running (None or absent: not
    running; it gets no line, and `skipped` says so)."""
    numbers = link_numbers(group)
    by_name = {site.site: site for site in sites if site.group == group.name}
    ordered = sorted((numbers[s.name], by_name[s.name]) for s in group.sites)
    links = [LOCAL_LINK] + [
        SiteLink(number, site.site, site.mode == "S", site.outstanding_ios,
                 site.outstanding_sectors)
        for number, site in ordered
    ]  # fmt: skip
    devices, skipped = [], []
    for number, device in enumerate(group.devices):
        sectors = gate_sectors.get(device.name)
        if sectors is None:
            skipped.append(f"{device.name}: its stack is not running (no replicator-dev line)")
            continue
        on_links = [LOCAL_DEVICE] + [device_on_link(site, device.name) for _, site in ordered]
        devices.append(ReplicatedDevice(device.name, number, sectors, tuple(on_links)))
    return ReplicatorStatus(
        group.name, log_device, group.spool_bytes // 512, tuple(links), tuple(devices),
        tuple(skipped),
    )  # fmt: skip


def device_on_link(site: SiteStatus, device: str) -> DeviceOnLink:
    """A device on a site's link: its mirror leg's health and the mirror's regions when the
    site's replica of it is a leg; otherwise no dirty log, W when the site is down."""
    health = None if site.legs is None else site.legs.health.get(device)
    if health is not None and site.legs is not None and device in site.legs.regions:
        return DeviceOnLink(_ACCESS.get(health, "W"), site.legs.regions[device])
    return DeviceOnLink("W" if site.state in _LINK_DOWN else "A", None)


def render_replicator_status(status: ReplicatorStatus) -> list[str]:
    """The `replicator` line, then one `replicator-dev` line per running device."""
    known = [link for link in status.links if link.ios is not None and link.sectors is not None]
    ios = sum(link.ios or 0 for link in known)
    sectors = sum(link.sectors or 0 for link in known)
    links = " ".join(link.render() for link in status.links)
    lines = [
        f"{status.name}: 0 {status.log_sectors} replicator {links} "
        f"{ios}/{sectors}/{status.log_sectors}"
    ]
    for device in status.devices:
        on_links = " ".join(link.render() for link in device.links)
        lines.append(
            f"{device.name}: 0 {device.sectors} replicator-dev {status.log_device} "
            f"{device.number} {on_links}"
        )
    return lines


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)
