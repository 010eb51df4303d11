"""Values for pure tests: a configured device with overridable fields."""

from __future__ import annotations

from dmrepl.config import DeviceSpec


def device_spec(**extra: object) -> DeviceSpec:
    """Device `g/d`: origin /dev/vdb, metadata at the start of /dev/vdc, 64 KiB era blocks."""
    fields: dict[str, object] = dict(
        group="g", name="d", origin="/dev/vdb", metadata="/dev/vdc", metadata_offset=0,
        metadata_size=None, block_sectors=128, cow=None, cow_sectors=None, mirror=None,
    )  # fmt: skip
    fields.update(extra)
    return DeviceSpec(**fields)  # type: ignore[arg-type]
