"""Capturing deltas from a held cut: the change list since a base cut, the delta header,
and the bytes read from the `-pit` images into a file published only once the cut's
images were confirmed intact."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO, cast

from dmrepl import blockio, delta, deltafiles, safefile
from dmrepl.cut import HeldCut, list_changes
from dmrepl.executor import Runner
from dmrepl.ranges import Extent
from dmrepl.state import CutRecord

SECTOR = 512
Ranges = Mapping[str, list[Extent]]
# (description, total bytes) -> a callback taking bytes done since the last call.
ProgressFactory = Callable[[str, int], Callable[[int], object]]


def no_progress(_what: str, _total: int) -> Callable[[int], object]:
    return lambda _done: None


def changed_since(runner: Runner, held: HeldCut, base: CutRecord) -> dict[str, list[Extent]]:
    """Sector ranges written since cut `base`, per device, from the held metadata snapshots."""
    since = {d.stack.device.name: base.eras.get(d.stack.device.name, 0) + 1 for d in held.devices}
    return list_changes(runner, held, since)


def header(group: str, held: HeldCut, seq: int, base: CutRecord | None) -> delta.DeltaHeader:
    """The header of the delta from `base` (None: a full image) to the held cut `seq`."""
    return delta.DeltaHeader(
        group=group,
        seq=seq,
        base_seq=None if base is None else base.seq,
        devices=tuple(
            delta.DeltaDevice(
                name=d.stack.device.name,
                sectors=d.stack.origin_sectors,
                base_era=None if base is None else base.eras.get(d.stack.device.name, 0) + 1,
                target_era=d.era,
            )
            for d in held.devices
        ),
        created=time.time(),
    )


def total_bytes(ranges: Ranges | None) -> int:
    if not ranges:
        return 0
    return sum(extent.length for extents in ranges.values() for extent in extents) * SECTOR


def encoded_size(head: delta.DeltaHeader, ranges: Ranges) -> int:
    """The size of the delta file these ranges make, known before a byte is read."""
    lengths = [extent.length * SECTOR for extents in ranges.values() for extent in extents]
    return delta.encoded_size(head, lengths)


def stage(
    held: HeldCut,
    head: delta.DeltaHeader,
    ranges: Ranges | None,
    target: Path,
    cleanup: ExitStack,
    progress: ProgressFactory,
) -> tuple[Callable[[], None], delta.DeltaSummary]:
    """Capture into a partial file beside `target` now, fsynced; returns the callable that
    publishes it and what it holds (its stream checksum included). Anything unpublished is
    removed when `cleanup` closes."""
    partial = deltafiles.partial_path(target)
    cleanup.callback(partial.unlink, missing_ok=True)
    with safefile.open_new(partial, buffering=0) as file:
        out = blockio.GatherWriter(file.fileno())
        summary = write(cast(BinaryIO, out), held, head, ranges, progress)
        os.fsync(file.fileno())
    return lambda: deltafiles.publish(partial, target), summary


def write(
    out: BinaryIO,
    held: HeldCut,
    head: delta.DeltaHeader,
    ranges: Ranges | None,
    progress: ProgressFactory,
) -> delta.DeltaSummary:
    """Read the ranges (None: every non-zero chunk) from the `-pit` images into a delta."""
    writer = delta.DeltaWriter(out, head)
    report = progress(f"capture cut {head.seq}", total_bytes(ranges))
    for index, device in enumerate(held.devices):
        assert device.pit is not None
        with blockio.ExtentReader(device.pit.path) as image:
            wanted = (
                ranges[device.stack.device.name]
                if ranges is not None
                else [Extent(0, device.stack.origin_sectors)]
            )
            for offset, data in image.pieces(wanted):
                held.latch.check()
                if ranges is None and blockio.is_zero(data):
                    continue  # a full image leaves zero chunks out
                writer.add(index, offset, data)
                report(len(data))
    return writer.finish()
