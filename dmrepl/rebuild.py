"""`dmrepl apply`: rebuild or roll a device forward from the delta files of a `dir` site.

A full image (`<group>.<seq>.full.delta`) holds every non-zero chunk of a cut;
the target is zeroed first, then the image applied. Each later delta whose base
is the cut reached so far is applied in turn. Every file is verified end to end
before anything of it is written.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dmrepl import blockio, delta
from dmrepl.errors import InvalidInput
from dmrepl.signals import Say
from dmrepl.sites import listed_deltas

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device


@dataclass(frozen=True)
class ApplyResult:
    applied: list[int]  # cut seqs, in order
    cut: int  # the cut the targets now hold
    data_bytes: int


def apply_dir(
    directory: Path,
    group: str,
    targets: Mapping[str, str],
    *,
    from_cut: int | None = None,
    to_cut: int | None = None,
    say: Say = print,
) -> ApplyResult:
    """Bring `targets` (device name -> path) to cut `to_cut` (default: the newest reachable).

    From a full image, or, with `from_cut`, from targets that already hold that cut.
    """
    files = listed_deltas(directory, group)
    if not files:
        raise InvalidInput(f"{directory} holds no delta files of group {group}")
    by_base = {base: (seq, path) for seq, base, path in files if base is not None}
    if from_cut is None:
        fulls = [(s, p) for s, b, p in files if b is None and (to_cut is None or s <= to_cut)]
        if not fulls:
            raise InvalidInput(
                f"{directory} holds no full image of group {group}"
                + (f" at or before cut {to_cut}" if to_cut is not None else ""),
                hint="give --from-cut with the cut the targets already hold",
            )
        steps = [fulls[-1]]
    else:
        steps = []
    at = steps[0][0] if steps else from_cut
    while at in by_base and (to_cut is None or by_base[at][0] <= to_cut):
        steps.append(by_base[at])
        at = by_base[at][0]
    if to_cut is not None and at != to_cut:
        raise InvalidInput(f"the deltas in {directory} do not reach cut {to_cut} (stop at {at})")
    applied: list[int] = []
    total = 0
    with ExitStack() as fds:
        opened: dict[str, int] = {}
        for name, target in targets.items():
            opened[name] = os.open(target, os.O_RDWR)
            fds.callback(os.close, opened[name])
        for seq, delta_path in steps:
            total += _apply_file(delta_path, group, opened, say)
            applied.append(seq)
        for fd in opened.values():
            os.fsync(fd)
    assert at is not None
    return ApplyResult(applied, at, total)


def _apply_file(path: Path, group: str, targets: Mapping[str, int], say: Say) -> int:
    with path.open("rb", buffering=blockio.CHUNK_BYTES) as stream:
        header, summary = delta.verify(stream, str(path))
    if header.group != group:
        raise InvalidInput(f"{path} belongs to group {header.group}, not {group}")
    names = [d.name for d in header.devices]
    if set(names) != set(targets):
        raise InvalidInput(
            f"{path} holds devices {', '.join(names)}; targets given for "
            f"{', '.join(sorted(targets))}",
            hint="give --to NAME=DEVICE for every device of the group",
        )
    for device in header.devices:
        size = blockio.size_bytes(targets[device.name])
        if size != device.sectors * 512:
            raise InvalidInput(
                f"target for {device.name} is {size} bytes; the delta's device is "
                f"{device.sectors * 512} bytes",
                hint="a target must be exactly the size of the origin",
            )
    say(f"applying cut {header.seq} from {path.name} ({summary.data_bytes} bytes)")
    if header.base_seq is None:
        for device in header.devices:
            _zero(targets[device.name], device.sectors * 512)
    with path.open("rb", buffering=blockio.CHUNK_BYTES) as stream:
        header = delta.read_header(stream, str(path))
        fds = [targets[d.name] for d in header.devices]
        for record in delta.records(stream, header, str(path)):
            blockio.write_at(fds[record.device], record.offset, record.data)
    return summary.data_bytes


def _zero(fd: int, length: int) -> None:
    """Zero a whole target: BLKZEROOUT on a block device, truncation on a file."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", 0, length))
    else:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, length)
