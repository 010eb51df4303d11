"""Planning up/down from wanted and observed state, without a kernel."""

from __future__ import annotations

import pytest

from dmrepl.config import MirrorSpec
from dmrepl.dm import ObservedDevice
from dmrepl.plan import StackMismatch, plan_down, plan_up
from dmrepl.probe import MetadataHeader, MetadataKind
from dmrepl.stack import Layer, StackSpec, layer_uuid, parse_layer_uuid, plan_stack
from dmrepl.tables import TableLine, normalise_table, render_table, table_devices
from tests.unit.factories import device_spec

IDS = {"/dev/vdb": "254:16", "/dev/vdc": "254:32", "/dev/vde": "254:64"}
EMPTY = MetadataHeader(MetadataKind.EMPTY)


def stack(**extra: object) -> StackSpec:
    return plan_stack(device_spec(**extra), origin_sectors=65536, metadata_sectors=2048)


def running(spec: StackSpec, **overrides: object) -> dict[str, ObservedDevice]:
    """Observed devices exactly as the kernel would show the stack (devices as numbers)."""
    ids = dict(IDS)
    observed = {}
    for index, layer in enumerate(spec.layers):
        ids[layer.path] = f"253:{index}"
        lines = (TableLine(0, layer.length, layer.target),)
        table = render_table(normalise_table(lines, {p: ids[p] for p in table_devices(lines)}))
        fields: dict[str, object] = dict(
            name=layer.name, uuid=layer.uuid, kernel_name=f"dm-{index}", suspended=False,
            open_count=1, table=table.strip(),
        )  # fmt: skip
        fields.update(overrides.get(layer.name, {}))  # type: ignore[call-overload]
        observed[layer.name] = ObservedDevice(**fields)  # type: ignore[arg-type]
    return observed


def resolver(spec: StackSpec) -> dict[str, str]:
    ids = dict(IDS)
    for index, layer in enumerate(spec.layers):
        ids[layer.path] = f"253:{index}"
    return ids


def test_fresh_stack_is_created_bottom_up_with_undo() -> None:
    spec = stack()
    plan = plan_up([spec], {}, {}, {"d": EMPTY}, resolve=IDS.get)
    assert [s.op.argv[:3] for s in plan.steps] == [
        ("dmsetup", "create", "d-meta"),
        ("dmsetup", "create", "d-access"),
        ("dmsetup", "create", "d-orig"),
        ("dmsetup", "create", "d-era"),
        ("dmsetup", "create", "d"),
    ]
    assert all(s.undo is not None and s.undo.argv[-1] == s.op.argv[2] for s in plan.steps)
    assert [s.creates for s in plan.steps] == ["d-meta", "d-access", "d-orig", "d-era", "d"]
    assert plan.steps[3].op.stdin == "0 65536 era /dev/mapper/d-meta /dev/mapper/d-orig 128\n"
    assert plan.notes == ("d: new metadata (dm-era formats it)",)


def test_mirror_layer_sits_between_origin_and_snapshot_origin() -> None:
    mirror = MirrorSpec(legs=("/dev/vde",), log="core", log_device=None, region_sectors=1024)
    spec = stack(mirror=mirror)
    assert [layer.layer for layer in spec.layers] == [
        Layer.META, Layer.ACCESS, Layer.MIRROR, Layer.ORIGIN, Layer.ERA, Layer.GATE
    ]  # fmt: skip
    assert (
        spec.require(Layer.MIRROR).table == "0 65536 mirror core 1 1024 2 /dev/vdb 0 /dev/vde 0\n"
    )
    assert spec.require(Layer.ORIGIN).table == "0 65536 snapshot-origin /dev/mapper/d-mirror\n"


def test_running_stack_that_matches_is_left_alone() -> None:
    spec = stack()
    ids = resolver(spec)
    plan = plan_up([spec], running(spec), {}, {"d": EMPTY}, resolve=ids.get)
    assert plan.empty
    assert plan.unchanged == ("d-meta", "d-access", "d-orig", "d-era", "d")


def test_suspended_layer_is_resumed_and_missing_layer_created() -> None:
    spec = stack()
    ids = resolver(spec)
    observed = running(spec, **{"d-era": {"suspended": True}})
    del observed["d"]
    plan = plan_up([spec], observed, {}, {"d": EMPTY}, resolve=ids.get)
    assert [s.op.argv[1:3] for s in plan.steps] == [("resume", "d-era"), ("create", "d")]


def test_layer_without_table_is_recreated() -> None:
    spec = stack()
    ids = resolver(spec)
    observed = running(spec, **{"d": {"table": ""}})
    plan = plan_up([spec], observed, {}, {"d": EMPTY}, resolve=ids.get)
    assert [s.op.argv[1:4] for s in plan.steps] == [
        ("remove", "--retry", "d"),
        ("create", "d", "--uuid"),
    ]


def test_differing_stack_is_refused_with_both_tables() -> None:
    spec = stack()
    ids = resolver(spec)
    changed = stack(block_sectors=256)
    with pytest.raises(StackMismatch) as caught:
        plan_up([changed], running(spec), {}, {"d": EMPTY}, resolve=ids.get)
    text = caught.value.context or ""
    assert "d-era differs from the configuration" in text
    assert "running: 0 65536 era 253:0 253:2 128" in text
    assert "wanted:  0 65536 era 253:0 253:2 256" in text


def test_foreign_name_and_foreign_metadata_are_refused() -> None:
    spec = stack()
    with pytest.raises(StackMismatch, match="2 problem"):
        plan_up(
            [spec], {}, {"d-era": "LVM-abc"}, {"d": MetadataHeader(MetadataKind.FOREIGN)},
            resolve=IDS.get,
        )  # fmt: skip


def test_fresh_zeroes_the_superblock_after_carving() -> None:
    spec = stack()
    plan = plan_up(
        [spec], {}, {}, {"d": MetadataHeader(MetadataKind.FOREIGN)}, resolve=IDS.get, fresh=True
    )
    assert plan.steps[1].op.argv[:3] == ("dd", "if=/dev/zero", "of=/dev/mapper/d-meta")


def test_existing_metadata_must_match_the_geometry() -> None:
    spec = stack()
    good = MetadataHeader(MetadataKind.ERA, block_sectors=128, era_blocks=512, current_era=7)
    plan = plan_up([spec], {}, {}, {"d": good}, resolve=IDS.get)
    assert plan.notes == ("d: reusing existing metadata (era 7)",)
    bad = MetadataHeader(MetadataKind.ERA, block_sectors=256, era_blocks=256, current_era=7)
    with pytest.raises(StackMismatch, match="1 problem") as caught:
        plan_up([spec], {}, {}, {"d": bad}, resolve=IDS.get)
    assert "made for 256 era blocks of 256 sectors" in (caught.value.context or "")


def test_down_removes_top_down_and_refuses_open_gate() -> None:
    spec = stack()
    closed = running(spec, d={"open_count": 0})
    plan = plan_down([spec], closed)
    assert [s.op.argv[-1] for s in plan.steps] == ["d", "d-era", "d-orig", "d-access", "d-meta"]
    with pytest.raises(StackMismatch, match="1 problem"):
        plan_down([spec], running(spec))
    forced = plan_down([spec], running(spec), force=True)
    assert all("--deferred" in s.op.argv for s in forced.steps)


def test_uuid_round_trip() -> None:
    uuid = layer_uuid("db", "data-1", Layer.ERA)
    assert uuid == "DMREPL-era-db.data-1"
    assert parse_layer_uuid(uuid) == (Layer.ERA, "db", "data-1")
    assert parse_layer_uuid("LVM-xyz") is None
    assert parse_layer_uuid("DMREPL-bogus-a.b") is None
    assert parse_layer_uuid("DMREPL-era-nodot") is None
