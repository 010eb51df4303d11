"""Safety checks on probed facts: each unsafe case is refused with its own exit code."""

from __future__ import annotations

import dataclasses

import pytest

from dmrepl.config import DeviceSpec, MirrorSpec
from dmrepl.errors import ExitCode
from dmrepl.probe import BlockDevice
from dmrepl.safety import DeviceFacts, UnsafeStack, check_all, check_device
from tests.unit.factories import device_spec

GiB = 2 * 2**20  # sectors


def block(path: str, dev: str, size: int, **extra: object) -> BlockDevice:
    fields: dict[str, object] = dict(
        path=path, dev_id=dev, size_sectors=size, holders=(), mountpoints=(), disk_id=dev,
        start_sector=0,
    )  # fmt: skip
    fields.update(extra)
    return BlockDevice(**fields)  # type: ignore[arg-type]


def facts(device: DeviceSpec | None = None, **extra: object) -> DeviceFacts:
    fields: dict[str, object] = dict(
        spec=device or device_spec(), origin=block("/dev/vdb", "254:16", GiB),
        metadata=block("/dev/vdc", "254:32", GiB), legs=(), log_device=None, missing=(),
        own_holders=frozenset(),
    )  # fmt: skip
    fields.update(extra)
    return DeviceFacts(**fields)  # type: ignore[arg-type]


def codes(f: DeviceFacts) -> list[ExitCode]:
    return [p.code for p in check_device(f)]


def test_good_device_passes() -> None:
    assert check_device(facts()) == []
    check_all([facts()])


def test_missing_device() -> None:
    assert codes(facts(origin=None, missing=("g/d: origin /dev/vdb does not exist",))) == [
        ExitCode.DEVICE_MISSING
    ]


def test_mounted_origin() -> None:
    mounted = block("/dev/vdb", "254:16", GiB, mountpoints=("/srv",))
    problems = check_device(facts(origin=mounted))
    assert [p.code for p in problems] == [ExitCode.DEVICE_IN_USE]
    assert "mounted on /srv" in problems[0].text and "unmount" in problems[0].hint


def test_held_origin_unless_held_by_own_stack() -> None:
    held = block("/dev/vdb", "254:16", GiB, holders=("dm-3",))
    assert codes(facts(origin=held)) == [ExitCode.DEVICE_IN_USE]
    assert codes(facts(origin=held, own_holders=frozenset({"dm-3"}))) == []


def test_metadata_too_small_names_the_exact_minimum() -> None:
    problems = check_device(facts(device_spec(metadata_size=64)))
    assert [p.code for p in problems] == [ExitCode.METADATA_TOO_SMALL]
    assert "below the minimum" in problems[0].text
    assert "at least" in problems[0].hint and "sectors" in problems[0].hint


def test_metadata_area_past_device_end() -> None:
    small = block("/dev/vdc", "254:32", 1024)
    assert ExitCode.METADATA_TOO_SMALL in codes(facts(metadata=small))


def test_metadata_on_the_origin_overlaps() -> None:
    same = facts(device_spec(metadata="/dev/vdb"), metadata=block("/dev/vdb", "254:16", GiB))
    assert ExitCode.DEVICE_OVERLAP in codes(same)


def test_metadata_partition_of_origin_disk_overlaps() -> None:
    partition = block("/dev/vdb1", "254:17", 4096, disk_id="254:16", start_sector=2048)
    assert ExitCode.DEVICE_OVERLAP in codes(facts(metadata=partition))


def test_partitions_side_by_side_do_not_overlap() -> None:
    origin = block("/dev/vdb2", "254:18", GiB, disk_id="254:16", start_sector=1_000_000)
    meta = block("/dev/vdb1", "254:17", 65536, disk_id="254:16", start_sector=2048)
    assert codes(facts(origin=origin, metadata=meta)) == []


def test_two_metadata_areas_overlap() -> None:
    first = facts(device_spec(name="a", origin="/dev/vdb"))
    second = facts(
        device_spec(name="b", origin="/dev/vdd", metadata_offset=1024),
        origin=block("/dev/vdd", "254:48", GiB),
    )
    with pytest.raises(UnsafeStack) as caught:
        check_all([first, second])
    assert caught.value.exit_code == ExitCode.DEVICE_OVERLAP
    assert "metadata areas overlap" in (caught.value.context or "")
    # Far enough apart: fine.
    far = dataclasses.replace(
        second, spec=device_spec(name="b", origin="/dev/vdd", metadata_offset=GiB // 2)
    )
    check_all([first, far])


def test_small_mirror_leg_and_leg_on_origin() -> None:
    mirror = MirrorSpec(legs=("/dev/vde",), log="core", log_device=None, region_sectors=1024)
    small_leg = block("/dev/vde", "254:64", GiB // 2)
    assert codes(facts(device_spec(mirror=mirror), legs=(small_leg,))) == [ExitCode.INVALID_INPUT]
    leg_on_origin = block("/dev/vdb", "254:16", GiB)
    assert ExitCode.DEVICE_OVERLAP in codes(
        facts(device_spec(mirror=mirror), legs=(leg_on_origin,))
    )


def test_unsafe_stack_lists_every_problem_and_uses_first_code() -> None:
    mounted = block("/dev/vdb", "254:16", GiB, mountpoints=("/srv",), holders=("sda9",))
    with pytest.raises(UnsafeStack) as caught:
        check_all([facts(device_spec(metadata_size=64), origin=mounted)])
    assert caught.value.exit_code == ExitCode.DEVICE_IN_USE
    assert len(caught.value.problems) == 3
    assert "nothing was changed" in caught.value.message
