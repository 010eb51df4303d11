"""Checks that must pass before `up` touches anything. Pure: they read probed facts.

Every problem is collected (so the user sees all of them at once) with its own
exit code; `UnsafeStack` carries them and exits with the first one's code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from dmrepl.config import DeviceSpec
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.probe import BlockDevice
from dmrepl.sizing import SizingError, metadata_size
from dmrepl.units import format_sectors


@dataclass(frozen=True)
class Problem:
    code: ExitCode
    text: str
    hint: str


class UnsafeStack(DmreplError):
    """One or more safety checks failed; nothing was changed."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        self.exit_code = problems[0].code
        super().__init__(
            f"refusing to build: {len(problems)} safety check(s) failed; nothing was changed",
            context="\n".join(f"- {p.text}\n  hint: {p.hint}" for p in problems),
        )


@dataclass(frozen=True)
class DeviceFacts:
    """Probed facts for one configured device (None: missing, with the reason in `missing`)."""

    spec: DeviceSpec
    origin: BlockDevice | None
    metadata: BlockDevice | None
    legs: tuple[BlockDevice | None, ...]
    log_device: BlockDevice | None
    missing: tuple[str, ...]  # messages for devices that could not be probed
    own_holders: frozenset[str]  # kernel names (dm-N) of this stack's own layers


def required_metadata_sectors(spec: DeviceSpec, origin_sectors: int) -> tuple[int, int]:
    """(minimum, default) metadata area size in sectors for this device."""
    size = metadata_size(origin_sectors, spec.block_sectors)
    return size.required_sectors, size.rounded_sectors()


def metadata_area_sectors(spec: DeviceSpec, facts: DeviceFacts) -> int:
    """The metadata area to carve: configured, else the computed default (1 MiB aligned)."""
    assert facts.origin is not None
    if spec.metadata_size is not None:
        return spec.metadata_size
    _, default = required_metadata_sectors(spec, facts.origin.size_sectors)
    return default


def check_device(facts: DeviceFacts) -> list[Problem]:
    """Everything that must hold for one device before its stack is built."""
    spec = facts.spec
    problems = [
        Problem(ExitCode.DEVICE_MISSING, text, "check the path in the config")
        for text in facts.missing
    ]
    if facts.origin is None or facts.metadata is None:
        return problems
    origin, metadata = facts.origin, facts.metadata
    key = spec.key
    problems += _in_use(f"{key}: origin", origin, facts.own_holders)
    problems += _in_use(f"{key}: metadata device", metadata, facts.own_holders)
    try:
        minimum, _ = required_metadata_sectors(spec, origin.size_sectors)
    except SizingError as exc:
        return [*problems, Problem(ExitCode.INVALID_INPUT, f"{key}.block_size: {exc.message}", "")]
    area = metadata_area_sectors(spec, facts)
    if area < minimum:
        problems.append(
            Problem(
                ExitCode.METADATA_TOO_SMALL,
                f"{key}.metadata_size: {format_sectors(area)} is below the minimum "
                f"{format_sectors(minimum)} for a {format_sectors(origin.size_sectors)} origin "
                f"in {spec.block_sectors}-sector era blocks",
                f"set metadata_size to at least {minimum} sectors, or remove it to use "
                "dmrepl's default (see `dmrepl size`)",
            )
        )
    end = spec.metadata_offset + area
    if end > metadata.size_sectors:
        problems.append(
            Problem(
                ExitCode.METADATA_TOO_SMALL,
                f"{key}: metadata area [{spec.metadata_offset}, {end}) sectors does not fit on "
                f"{metadata.path} ({metadata.size_sectors} sectors)",
                "use a larger metadata device or a smaller metadata_offset",
            )
        )
    area_range = (spec.metadata_offset, end)
    if metadata.overlaps(origin, area_range, (0, origin.size_sectors)):
        problems.append(_overlap(f"{key}: metadata area overlaps the origin {origin.path}"))
    for leg in facts.legs:
        if leg is None:
            continue
        problems += _in_use(f"{key}: mirror leg", leg, facts.own_holders)
        if leg.size_sectors < origin.size_sectors:
            problems.append(
                Problem(
                    ExitCode.INVALID_INPUT,
                    f"{key}.mirror_legs: {leg.path} has {leg.size_sectors} sectors, "
                    f"smaller than the origin's {origin.size_sectors}",
                    "use a leg at least as large as the origin",
                )
            )
        for other, what in ((origin, "the origin"), (metadata, "the metadata device")):
            other_range = area_range if other is metadata else (0, other.size_sectors)
            if leg.overlaps(other, (0, origin.size_sectors), other_range):
                problems.append(_overlap(f"{key}: mirror leg {leg.path} overlaps {what}"))
    return problems


def check_all(devices: Iterable[DeviceFacts]) -> None:
    """Run every check, including overlaps between devices; raise UnsafeStack if any fail."""
    facts = list(devices)
    problems = [p for f in facts for p in check_device(f)]
    areas = [
        (f, (f.spec.metadata_offset, f.spec.metadata_offset + metadata_area_sectors(f.spec, f)))
        for f in facts
        if f.origin is not None and f.metadata is not None
    ]
    for i, (first, first_area) in enumerate(areas):
        for second, second_area in areas[i + 1 :]:
            assert first.metadata and second.metadata and first.origin and second.origin
            if first.metadata.overlaps(second.metadata, first_area, second_area):
                problems.append(
                    _overlap(f"{first.spec.key} and {second.spec.key}: metadata areas overlap")
                )
            if first.metadata.overlaps(second.origin, first_area, (0, second.origin.size_sectors)):
                problems.append(
                    _overlap(f"{first.spec.key}: metadata area overlaps {second.spec.key}'s origin")
                )
            if second.metadata.overlaps(first.origin, second_area, (0, first.origin.size_sectors)):
                problems.append(
                    _overlap(f"{second.spec.key}: metadata area overlaps {first.spec.key}'s origin")
                )
    if problems:
        raise UnsafeStack(problems)


def _in_use(what: str, device: BlockDevice, own: frozenset[str]) -> list[Problem]:
    problems = []
    if device.mountpoints:
        problems.append(
            Problem(
                ExitCode.DEVICE_IN_USE,
                f"{what} {device.path} is mounted on {', '.join(device.mountpoints)}",
                "unmount it first; dmrepl puts the gate /dev/mapper/<name> in its place",
            )
        )
    foreign = [h for h in device.holders if h not in own]
    if foreign:
        problems.append(
            Problem(
                ExitCode.DEVICE_IN_USE,
                f"{what} {device.path} is in use by {', '.join(foreign)} (see /sys/class/block/"
                f"{foreign[0]})",
                "stop what holds it (another dm stack, LVM, RAID) before protecting it",
            )
        )
    return problems


def _overlap(text: str) -> Problem:
    return Problem(
        ExitCode.DEVICE_OVERLAP,
        text,
        "place the metadata area (metadata, metadata_offset) where it cannot hit data",
    )
