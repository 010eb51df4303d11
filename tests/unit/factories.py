"""Values for pure tests: configured devices and sites with overridable fields."""

from __future__ import annotations

import io
from pathlib import Path

from dmrepl import delta
from dmrepl.config import DeviceSpec, SiteSpec
from dmrepl.sites import Receiver, SiteContext, open_site
from dmrepl.sites.archive import DirSiteSpec
from dmrepl.sites.journaled import BlockdevSiteSpec
from dmrepl.statedir import StateDir


def device_spec(**extra: object) -> DeviceSpec:
    """Device `g/d`: origin /dev/vdb, metadata at the start of /dev/vdc, 64 KiB era blocks."""
    fields: dict[str, object] = dict(
        group="g", name="d", origin="/dev/vdb", metadata="/dev/vdc", metadata_offset=0,
        metadata_size=None, block_sectors=128, cow=None, cow_sectors=None, mirror=None,
    )  # fmt: skip
    fields.update(extra)
    return DeviceSpec(**fields)  # type: ignore[arg-type]


def blockdev_site(
    name: str = "dr", replicas: dict[str, str] | None = None, journal: str | None = None
) -> BlockdevSiteSpec:
    """A `blockdev` site of group `db` (replica of `data` at /dev/x unless given)."""
    return BlockdevSiteSpec(
        "db", name, "blockdev", "asynchronous", replicas or {"data": "/dev/x"}, journal
    )


def dir_site(path: Path, name: str = "vault", group: str = "db") -> DirSiteSpec:
    return DirSiteSpec(group, name, "dir", "asynchronous", str(path))


def receiver(spec: SiteSpec, state_dir: Path, devices: dict[str, int] | None = None) -> Receiver:
    """The site's Receiver, for a group of `devices` (name -> sectors; default none)."""
    return open_site(spec, SiteContext(devices or {}, StateDir(state_dir)))


def one_device_delta(
    group: str,
    device: str,
    sectors: int,
    seq: int,
    base: int | None,
    writes: list[tuple[int, bytes]],
) -> bytes:
    """A delta of a one-device group from cut `base` (None: a full image) to `seq`, holding
    `writes` (sector offset, data)."""
    header = delta.DeltaHeader(
        group=group,
        seq=seq,
        base_seq=base,
        devices=(delta.DeltaDevice(device, sectors, None if base is None else base + 1, seq),),
        created=0.0,
    )
    out = io.BytesIO()
    writer = delta.DeltaWriter(out, header)
    for offset, data in writes:
        writer.add(0, offset, data)
    writer.finish()
    return out.getvalue()
