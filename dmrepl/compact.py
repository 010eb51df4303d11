"""Compaction at a `dir` site: merge two consecutive delta files into one, and prune a
directory to the cuts its `keep` grid keeps (the decisions are dmrepl.retention's).

Records hold absolute data and a later record wins, so the deltas A->B and B->C make one
delta A->C: every record of B->C, and of A->B what B->C does not overwrite. A full image
followed by a delta makes a full image of the later cut. The merge streams: it reads the
second file once for its extents (kept as two arrays of sector numbers per device, not its
data), then copies the first file's uncovered pieces and the second file's records.
Every input is verified while it is read; a failure leaves nothing behind.

The merged file is published durably (dmrepl.deltafiles) before either input is deleted,
so a crash at any point leaves every kept cut restorable; `dmrepl apply` takes the
shortest route, and the next prune deletes what the merge left.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from dmrepl import blockio, delta, deltafiles, retention, safefile
from dmrepl.deltafiles import DeltaFile
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.signals import Say

SECTOR = delta.SECTOR_BYTES


class MergeMismatch(DmreplError):
    """Two delta files do not follow each other (cuts, devices or eras), so they cannot
    be merged."""

    exit_code = ExitCode.CORRUPT


@dataclass(frozen=True)
class _Covered:
    """Sorted, disjoint sector ranges [starts[i], ends[i]) of one device."""

    starts: array[int]
    ends: array[int]

    def gaps(self, offset: int, end: int) -> Iterator[tuple[int, int]]:
        """The parts of [offset, end) that no range covers."""
        at = offset
        i = bisect_right(self.ends, offset)
        while i < len(self.starts) and self.starts[i] < end:
            if self.starts[i] > at:
                yield at, self.starts[i]
            at = max(at, self.ends[i])
            i += 1
        if at < end:
            yield at, end


def _open(path: Path) -> BinaryIO:
    return safefile.open_regular_for_reading(path, buffering=blockio.CHUNK_BYTES)


def _covered(path: Path) -> tuple[delta.DeltaHeader, dict[int, _Covered]]:
    """Verify the delta at `path` and return its header and the sectors it writes."""
    source = str(path)
    ranges: dict[int, list[tuple[int, int]]] = {}
    with _open(path) as stream:
        header = delta.read_header(stream, source)
        for record in delta.records(stream, header, source):
            ranges.setdefault(record.device, []).append((record.offset, record.end))
    covered = {}
    for device, spans in ranges.items():
        spans.sort()
        starts, ends = array("Q"), array("Q")
        for start, end in spans:
            if ends and start <= ends[-1]:
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        covered[device] = _Covered(starts, ends)
    del ranges
    return header, covered


def merged_header(first: delta.DeltaHeader, second: delta.DeltaHeader) -> delta.DeltaHeader:
    """The header of the delta that does what `first` and then `second` do."""
    where = f"cut {first.seq} and cut {second.seq} of group {first.group}"
    if first.group != second.group or second.base_seq != first.seq:
        raise MergeMismatch(
            f"cannot merge {where}: the second starts at cut {second.base_seq}, "
            f"not at cut {first.seq}",
            hint="nothing was deleted; move the file that does not belong out of the directory",
        )
    before = {d.name: d for d in first.devices}
    devices = []
    for device in second.devices:
        earlier = before.pop(device.name, None)
        if earlier is None or earlier.sectors != device.sectors:
            raise MergeMismatch(f"cannot merge {where}: their devices differ")
        if device.base_era != earlier.target_era + 1:
            raise MergeMismatch(
                f"cannot merge {where}: device {device.name} ends at era "
                f"{earlier.target_era} and starts again at era {device.base_era}"
            )
        devices.append(
            delta.DeltaDevice(device.name, device.sectors, earlier.base_era, device.target_era)
        )
    if before:
        raise MergeMismatch(f"cannot merge {where}: their devices differ")
    return delta.DeltaHeader(
        first.group, second.seq, first.base_seq, tuple(devices), second.created
    )


def merge(directory: Path, first: DeltaFile, second: DeltaFile) -> DeltaFile:
    """Write, durably, the file that does what `first` and then `second` do; both stay.

    Raises CorruptDelta (an input fails its checks) or MergeMismatch; then no file is left.
    """
    later_header, covered = _covered(second.path)
    with _open(first.path) as stream:
        earlier_header = delta.read_header(stream, str(first.path))
        header = merged_header(earlier_header, later_header)
        # The merged header lists the devices as `second` does: its indices are the same.
        index = {d.name: i for i, d in enumerate(header.devices)}
        first_index = [index[d.name] for d in earlier_header.devices]
        name = deltafiles.file_name(header.group, header.seq, header.base_seq)

        def fill(out: BinaryIO) -> None:
            writer = delta.DeltaWriter(out, header)
            for record in delta.records(stream, earlier_header, str(first.path)):
                device = first_index[record.device]
                later = covered.get(device)
                if later is None:
                    writer.add(device, record.offset, record.data)
                    continue
                data = memoryview(record.data)
                for start, end in later.gaps(record.offset, record.end):
                    skip = start - record.offset
                    writer.add(device, start, data[skip * SECTOR : (end - record.offset) * SECTOR])
            _copy_records(second.path, later_header, writer)
            writer.finish()

        path = deltafiles.write_durably(directory, name, fill, buffering=blockio.CHUNK_BYTES)
    return DeltaFile(header.seq, header.base_seq, path, path.stat().st_size)


def _copy_records(path: Path, header: delta.DeltaHeader, writer: delta.DeltaWriter) -> None:
    """Every record of the delta at `path` (read again, and checked again) into `writer`."""
    with _open(path) as stream:
        again = delta.read_header(stream, str(path))
        if again != header:
            raise delta.CorruptDelta(str(path), 0, "changed while it was merged")
        for record in delta.records(stream, again, str(path)):
            writer.add(record.device, record.offset, record.data)


@dataclass(frozen=True)
class HeldCut:
    """A cut a `dir` site can restore: when it was taken and the files `apply` uses."""

    seq: int
    created: float  # Unix time, from the delta header
    files: tuple[str, ...]  # names, in the order they are applied
    full: bool  # a full image of this very cut is among the files


def held_cuts(directory: Path, group: str) -> list[HeldCut]:
    """Every cut of `group` the files in `directory` restore, oldest first (reads headers
    only; `dmrepl verify` checks the files end to end)."""
    files = deltafiles.list_files(directory, group)
    found = deltafiles.routes(files)
    times = creation_times([f for f in files if f.seq in found.last], {})
    held = []
    for cut in found.cuts:
        route = found.to(cut) or []
        full = any(f.seq == cut and f.base_seq is None for f in files)
        held.append(HeldCut(cut, times[cut], tuple(f.path.name for f in route), full))
    return held


def delete(path: Path) -> None:
    """Delete a delta file and make that durable."""
    path.unlink()
    deltafiles.fsync_directory(path.parent)


@dataclass
class Pruned:
    """What one prune did: files written and deleted, by name."""

    merged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def creation_times(files: list[DeltaFile], known: Mapping[int, float]) -> dict[int, float]:
    """Each cut's creation time from the header of one of its files (`known` ones are not
    read again)."""
    times = dict(known)
    for file in files:
        if file.seq in times:
            continue
        with _open(file.path) as stream:
            times[file.seq] = delta.read_header(stream, str(file.path)).created
    return times


def prune(directory: Path, group: str, grid: retention.Grid, say: Say) -> Pruned:
    """Compact `directory` to the cuts `grid` keeps, one durable step at a time.

    Raises CorruptDelta, MergeMismatch or OSError where a step fails; the steps done so
    far are complete, and every kept cut is restorable.
    """
    done = Pruned()
    times: dict[int, float] = {}
    # Every step shortens a kept cut's route or deletes a file: this bounds them.
    for _ in range(4 * len(deltafiles.list_files(directory, group)) + 4):
        files = deltafiles.list_files(directory, group)
        times = creation_times(files, times)
        step = retention.next_step(files, times, grid)
        if step is None:
            return done
        if isinstance(step, retention.Merge):
            made = merge(directory, step.first, step.second)
            say(
                f"merged {step.first.path.name} and {step.second.path.name} into "
                f"{made.path.name} (cut {step.first.seq} is no longer kept)"
            )
            done.merged.append(made.path.name)
        else:
            delete(step.file.path)
            say(f"deleted {step.file.path.name} (no kept cut needs it)")
            done.deleted.append(step.file.path.name)
    raise AssertionError(f"pruning {directory} did not settle")  # next_step converges
