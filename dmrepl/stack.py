"""The device stack of one protected device (DESIGN.md section 2), as pure values.

    origin                                       the data
      [<name>-mirror  mirror origin + legs]      local legs, and synchronous sites' replicas
      <name>-orig     snapshot-origin            lets a cut take a point-in-time snapshot
      <name>-era      era <name>-meta <name>-orig <block>
      <name>          linear <name>-era 0        the gate users mount
    <name>-meta       linear <metadata> <offset> the carved metadata area
    <name>-access     linear <name>-meta 0       read path for era_invalidate

Every layer carries the dm UUID `DMREPL-<layer>-<group>.<device>`; names in the
config may not contain dots, so the UUID parses back unambiguously.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from itertools import combinations

from dmrepl.config import DEFAULT_REGION, DeviceSpec, MirrorSpec
from dmrepl.dm import UUID_PREFIX, mapper_path
from dmrepl.tables import (
    Era,
    Linear,
    Mirror,
    Snapshot,
    SnapshotOrigin,
    TableLine,
    Target,
    render_table,
)
from dmrepl.units import parse_size_sectors


class Layer(Enum):
    """Layers in creation order; the value is the dm-name suffix and UUID tag."""

    META = "meta"
    ACCESS = "access"
    MIRROR = "mirror"
    ORIGIN = "orig"
    ERA = "era"
    GATE = "gate"
    PIT = "pit"  # not built by `up`: exists only while a cut is being captured


@dataclass(frozen=True)
class LayerSpec:
    """One dm device of a stack as it should be."""

    layer: Layer
    name: str
    uuid: str
    length: int
    target: Target
    # Other tables the layer may run with and still be as configured: the mirror layer
    # with synchronous sites' replicas joined as legs.
    accepted: tuple[Target, ...] = ()

    @property
    def path(self) -> str:
        return mapper_path(self.name)

    @property
    def table(self) -> str:
        return render_table([TableLine(0, self.length, self.target)])


@dataclass(frozen=True)
class StackSpec:
    """The whole stack of one device, in creation order."""

    device: DeviceSpec
    origin_sectors: int
    metadata_sectors: int
    layers: tuple[LayerSpec, ...]

    def get(self, layer: Layer) -> LayerSpec | None:
        return next((spec for spec in self.layers if spec.layer is layer), None)

    def require(self, layer: Layer) -> LayerSpec:
        spec = self.get(layer)
        if spec is None:
            raise KeyError(f"{self.device.name} has no {layer.value} layer")
        return spec


def mirror_target(device: DeviceSpec, joined: tuple[str, ...]) -> Target:
    """The table of a device's mirror layer with the synchronous replicas `joined` as legs.

    Joined replicas were brought to the origin's exact content while writers were held,
    so the mirror is loaded `nosync` (no copy). With neither local legs nor joined
    replicas the layer is a linear pass-through (a mirror needs two legs).

    No handle_errors: with it, a write failing on one leg is held until userspace
    (dmeventd) reconfigures the mirror, and a plain suspend then fails it with EIO
    (dm-raid1.c do_failures/hold_bio). Without it the write completes on the surviving
    legs and status marks the failed leg 'D' until the table is reloaded.
    """
    local = device.mirror.legs if device.mirror else ()
    legs = ((device.origin, 0), *((leg, 0) for leg in (*local, *joined)))
    if len(legs) == 1:
        return Linear(device.origin, 0)
    mirror = device.mirror or MirrorSpec((), "core", None, int(parse_size_sectors(DEFAULT_REGION)))
    return Mirror(
        log=mirror.log,
        log_device=mirror.log_device,
        region_sectors=mirror.region_sectors,
        legs=legs,
        sync="nosync" if joined else None,
    )


# The largest `-pit` chunk: dm-snapshot splits every bio at its chunk size
# (max_io_len), so a capture reading 1 MiB pieces through 4 KiB chunks issues 256
# bios per piece. Measured on user-mode Linux 6.1 (O_DIRECT, 1 MiB reads of a
# loop-backed origin): 4 KiB chunks 1.5x the origin's time, 64 KiB and larger the same.
MAX_PIT_CHUNK_SECTORS = 128


def pit_chunk_sectors(block_sectors: int) -> int:
    """The `-pit` chunk for an era block: the block, at most 64 KiB (a power of two).

    A chunk is also what one first write copies out while a cut is held, so it is never
    larger than the era block, the granularity the replication already works in.
    """
    return min(MAX_PIT_CHUNK_SECTORS, 1 << (block_sectors.bit_length() - 1))


def pit_spec(stack: StackSpec, cow: str) -> LayerSpec:
    """The point-in-time snapshot of a cut: of the device under `-orig`, COW on `cow`.

    Transient (N): it lives only while a cut is captured, so nothing needs to survive a
    reload. dm-snapshot pairs it with the snapshot-origin on the same device.
    """
    below = stack.require(Layer.ORIGIN).target
    assert isinstance(below, SnapshotOrigin)
    device = stack.device
    return LayerSpec(
        Layer.PIT,
        layer_name(device.name, Layer.PIT),
        layer_uuid(device.group, device.name, Layer.PIT),
        stack.origin_sectors,
        Snapshot(below.device, cow, "N", pit_chunk_sectors(device.block_sectors)),
    )


def layer_name(device: str, layer: Layer) -> str:
    return device if layer is Layer.GATE else f"{device}-{layer.value}"


def layer_uuid(group: str, device: str, layer: Layer) -> str:
    return f"{UUID_PREFIX}{layer.value}-{group}.{device}"


def parse_layer_uuid(uuid: str) -> tuple[Layer, str, str] | None:
    """(layer, group, device) from a dmrepl UUID; None for anything else."""
    if not uuid.startswith(UUID_PREFIX):
        return None
    tag, _, rest = uuid[len(UUID_PREFIX) :].partition("-")
    group, dot, device = rest.partition(".")
    try:
        layer = Layer(tag)
    except ValueError:
        return None
    if not dot or not group or not device:
        return None
    return layer, group, device


def plan_stack(device: DeviceSpec, origin_sectors: int, metadata_sectors: int) -> StackSpec:
    """The layers of `device` over an origin of `origin_sectors` and its metadata area."""

    def spec(layer: Layer, length: int, target: Target) -> LayerSpec:
        return LayerSpec(
            layer,
            layer_name(device.name, layer),
            layer_uuid(device.group, device.name, layer),
            length,
            target,
        )

    meta = spec(Layer.META, metadata_sectors, Linear(device.metadata, device.metadata_offset))
    layers = [meta, spec(Layer.ACCESS, metadata_sectors, Linear(meta.path, 0))]
    below_origin = device.origin
    if device.mirror or device.sync_replicas:
        joined_forms = tuple(
            mirror_target(device, legs)
            for count in range(1, len(device.sync_replicas) + 1)
            for legs in combinations(device.sync_replicas, count)
        )
        target = mirror_target(device, ())
        layers.append(replace(spec(Layer.MIRROR, origin_sectors, target), accepted=joined_forms))
        below_origin = layers[-1].path
    layers.append(spec(Layer.ORIGIN, origin_sectors, SnapshotOrigin(below_origin)))
    era = spec(Layer.ERA, origin_sectors, Era(meta.path, layers[-1].path, device.block_sectors))
    layers += [era, spec(Layer.GATE, origin_sectors, Linear(era.path, 0))]
    return StackSpec(device, origin_sectors, metadata_sectors, tuple(layers))
