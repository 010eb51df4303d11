"""`dmrepl apply`: rebuild or roll a device forward from the delta files of a `dir` site.

A full image (`<group>.<seq>.full.delta`) holds every non-zero chunk of a cut;
the target is zeroed first, then the image applied. Each later delta whose base
is the cut reached so far is applied in turn.

Nothing is written before the whole chain has been checked: every file end to
end, its name against its header (cut, base cut, full or incremental), each
step's eras against the step before, and the targets (distinct, not in use,
exactly each device's size). While writing, the targets are between two cuts;
an error or a signal then stops with a message that says which cuts, and how to
finish (records hold absolute data, so applying a delta again is harmless). A
kill -9 or a crash cannot say it: a durable record (dmrepl.applylog) does, and
the next apply onto the same targets reports it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dmrepl import applylog, blockio, delta, deltafiles, safefile
from dmrepl.deltafiles import DeltaFile
from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.signals import Say, SignalLatch, deferred_signals

BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range of a block device
SYS_BLOCK = Path("/sys/block")

_NOTHING_WRITTEN = "nothing was written to the targets"


class ChainMismatch(DmreplError):
    """A delta file does not fit the chain: its name and header disagree, or eras do not link."""

    exit_code = ExitCode.CORRUPT


class TargetProblem(DmreplError):
    """A target is missing, of the wrong kind, or cannot be opened."""

    exit_code = ExitCode.DEVICE_MISSING


class TargetInUse(DmreplError):
    """A target block device is mounted, held by another device, or used as swap."""

    exit_code = ExitCode.DEVICE_IN_USE


class ApplyStopped(DmreplError):
    """Writing the targets failed or was interrupted; the message says what they hold."""

    exit_code = ExitCode.FAILURE


@dataclass(frozen=True)
class ApplyResult:
    applied: list[int]  # cut seqs, in order
    cut: int  # the cut the targets now hold
    data_bytes: int


@dataclass(frozen=True)
class _Step:
    """One delta file of the chain, verified, with what identifies the bytes verified."""

    path: Path
    header: delta.DeltaHeader
    summary: delta.DeltaSummary
    identity: tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


def apply_dir(
    directory: Path,
    group: str,
    targets: Mapping[str, str],
    *,
    from_cut: int | None = None,
    to_cut: int | None = None,
    dry_run: bool = False,
    say: Say = print,
) -> ApplyResult:
    """Bring `targets` (device name -> path) to cut `to_cut` (default: the newest reachable).

    From a full image, or, with `from_cut`, from targets that already hold that cut.
    Checks everything first (see the module docstring); raises before writing a byte.
    `dry_run`: every check, then what would be applied, and nothing written.
    """
    for option, value in (("--from-cut", from_cut), ("--cut", to_cut)):
        if value is not None and value < 0:
            raise InvalidInput(f"{option} {value} is not a cut (cuts are numbered from 1)")
    _check_directory(directory)
    unfinished = _check_unfinished(targets, from_cut, say)
    planned = _plan(directory, group, from_cut, to_cut)
    if unfinished is not None and not planned:
        raise InvalidInput(
            f"an earlier apply onto these targets did not finish: {unfinished.describe()}; "
            "applying nothing would leave them so",
            hint=f"apply at least cut {unfinished.writing} (leave out --cut, or give a later one)",
        )
    if to_cut is None:
        _note_unreachable(directory, group, planned[-1].seq if planned else from_cut, say)
    with ExitStack() as fds:
        opened = _open_targets(targets, fds)
        steps = _verified_chain(planned, group)
        for step in steps:
            _check_devices(step, targets, opened)
        if dry_run:
            applied = [step.header.seq for step in steps]
            data = sum(step.summary.data_bytes for step in steps)
            for step in steps:
                say(f"would apply cut {step.header.seq} from {step.path.name} "
                    f"({step.summary.data_bytes} bytes)")  # fmt: skip
            return ApplyResult(applied, applied[-1] if applied else from_cut or 0, data)
        return _write_chain(steps, opened, from_cut, say, record=(group, targets))


def _check_directory(directory: Path) -> None:
    if not directory.exists():
        raise InvalidInput(f"{directory} does not exist", hint="give the dir site's directory")
    if not directory.is_dir():
        raise InvalidInput(f"{directory} is not a directory", hint="give the dir site's directory")


def _plan(directory: Path, group: str, from_cut: int | None, to_cut: int | None) -> list[DeltaFile]:
    """The files of the chain, picked and linked by their names (checked against headers later).

    The shortest route (deltafiles.routes): a compacted directory may hold a merged delta
    beside the two it replaces, until its next prune deletes them."""
    files = deltafiles.list_files(directory, group)
    if not files:
        raise InvalidInput(f"{directory} holds no delta files of group {group}")
    if from_cut is None:
        if not any(f.base_seq is None and (to_cut is None or f.seq <= to_cut) for f in files):
            restorable = deltafiles.routes(files).cuts
            raise InvalidInput(
                f"{directory} holds no full image of group {group}"
                + (f" at or before cut {to_cut}" if to_cut is not None else ""),
                hint=(f"cuts it can restore: {describe_cuts(restorable)}; " if restorable else "")
                + "give --from-cut with the cut the targets already hold",
            )
    elif to_cut != from_cut and not any(f.base_seq == from_cut for f in files):
        starts = sorted({f.base_seq for f in files if f.base_seq is not None})
        known = ", ".join(str(b) for b in starts) or "none"
        raise InvalidInput(
            f"{directory} holds no delta of group {group} from cut {from_cut}",
            hint=f"deltas there start at cuts: {known}; give the cut the targets hold",
        )
    found = deltafiles.routes(files, from_cut)
    reached = found.cuts
    target = reached[-1] if to_cut is None else to_cut
    steps = found.to(target)
    if steps is not None:
        return steps
    below = [cut for cut in reached if cut < target]
    available = f"cuts it can restore{'' if from_cut is None else f' from cut {from_cut}'}: "
    hint = available + describe_cuts(reached)
    if not reached or target > reached[-1]:
        stop = f" (stop at {below[-1]})" if below else ""
        raise InvalidInput(f"the deltas in {directory} do not reach cut {target}{stop}", hint=hint)
    raise InvalidInput(
        f"{directory} cannot restore cut {target} of group {group}: no chain of delta files "
        "ends there (the site's keep grid no longer keeps it, or it was never delivered)",
        hint=hint,
    )


def describe_cuts(cuts: list[int]) -> str:
    """Sorted cuts for a message, runs shortened: `1-4, 7, 9-12` (`none` for none)."""
    runs: list[list[int]] = []
    for cut in cuts:
        if runs and cut == runs[-1][-1] + 1:
            runs[-1].append(cut)
        else:
            runs.append([cut])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs) or "none"


def _note_unreachable(directory: Path, group: str, reached: int | None, say: Say) -> None:
    """Say so when newer files exist than the cut the chain reaches (a delta is missing)."""
    newest = deltafiles.list_files(directory, group)[-1]
    if reached is not None and newest.seq > reached:
        say(
            f"note: the chain stops at cut {reached}: no delta in {directory} starts there, "
            f"so {newest.path.name} (cut {newest.seq}) cannot be reached"
        )


def _verified_chain(planned: list[DeltaFile], group: str) -> list[_Step]:
    """Verify every file end to end and that it is the step its name says, linking to the last."""
    steps: list[_Step] = []
    for seq, base, path in ((f.seq, f.base_seq, f.path) for f in planned):
        with _open_delta(path) as stream:
            header, summary = delta.verify(stream, str(path))
            info = os.fstat(stream.fileno())
        step = _Step(path, header, summary, _identity(info))
        if header.group != group:
            raise InvalidInput(f"{path} belongs to group {header.group}, not {group}")
        _check_name(step, seq, base)
        if steps:
            _check_link(steps[-1], step)
        steps.append(step)
    return steps


def _open_delta(path: Path) -> BinaryIO:
    """A delta file to read: a regular file (a FIFO would block forever, a directory fails)."""
    try:
        return safefile.open_regular_for_reading(path, buffering=blockio.CHUNK_BYTES)
    except safefile.UnsafePath as exc:
        raise delta.CorruptDelta(
            str(path),
            0,
            "not a regular file",
            message=f"{exc.message}: it cannot be a delta",
            hint=f"move it out of the directory; {_NOTHING_WRITTEN}",
        ) from None
    except OSError as exc:
        raise InvalidInput(
            f"cannot read {path}: {exc.strerror}",
            hint=f"check its permissions (or run as root); {_NOTHING_WRITTEN}",
        ) from None


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _describe(seq: int, base: int | None) -> str:
    return f"cut {seq} (full image)" if base is None else f"cut {seq} from cut {base}"


def _check_name(step: _Step, seq: int, base: int | None) -> None:
    header = step.header
    if (header.seq, header.base_seq) != (seq, base):
        raise ChainMismatch(
            f"{step.path}: its name says {_describe(seq, base)}, its header says "
            f"{_describe(header.seq, header.base_seq)}",
            hint=f"the file was renamed or belongs elsewhere; {_NOTHING_WRITTEN}",
        )
    for device in header.devices:
        if (device.base_era is None) != (header.base_seq is None):
            kind = "a full image" if header.base_seq is None else "an incremental delta"
            raise ChainMismatch(
                f"{step.path}: {kind}, but device {device.name} has base era {device.base_era}",
                hint=f"the file was not written by dmrepl's capture; {_NOTHING_WRITTEN}",
            )
        if device.base_era is not None and device.base_era > device.target_era + 1:
            raise ChainMismatch(
                f"{step.path}: device {device.name} goes from era {device.base_era} "
                f"back to era {device.target_era}",
                hint=_NOTHING_WRITTEN,
            )


def _check_link(previous: _Step, step: _Step) -> None:
    """`step` must continue exactly where `previous` ended: same devices, next era."""
    before = {d.name: d for d in previous.header.devices}
    after = {d.name: d for d in step.header.devices}
    if {n: d.sectors for n, d in before.items()} != {n: d.sectors for n, d in after.items()}:
        raise ChainMismatch(
            f"{step.path}: its devices ({_devices(step.header)}) differ from those of "
            f"{previous.path.name} ({_devices(previous.header)})",
            hint="the group's devices changed: rebuild from a newer full image; "
            + _NOTHING_WRITTEN,
        )
    for name, device in after.items():
        expected = before[name].target_era + 1
        if device.base_era != expected:
            raise ChainMismatch(
                f"{step.path}: device {name} starts at era {device.base_era}, but "
                f"{previous.path.name} ends at era {before[name].target_era} "
                f"(so the next delta must start at era {expected})",
                hint="the files come from different generations of the group (a state store "
                f"rebuilt, or a mix of archives); {_NOTHING_WRITTEN}",
            )


def _devices(header: delta.DeltaHeader) -> str:
    return ", ".join(f"{d.name} {d.sectors * 512} B" for d in header.devices)


def _open_targets(targets: Mapping[str, str], fds: ExitStack) -> dict[str, int]:
    """Open every target read-write; block devices exclusively (refused while mounted or held)."""
    opened: dict[str, int] = {}
    seen: dict[tuple[int, int], str] = {}
    for name, path in targets.items():
        fd = _open_target(name, path)
        fds.callback(os.close, fd)
        info = os.fstat(fd)
        key = (0, info.st_rdev) if stat.S_ISBLK(info.st_mode) else (info.st_dev, info.st_ino)
        if key in seen:
            raise InvalidInput(
                f"the targets of {seen[key]} and {name} are the same device ({path})",
                hint=f"give each device its own target; {_NOTHING_WRITTEN}",
            )
        seen[key] = name
        opened[name] = fd
    return opened


def _open_target(name: str, path: str) -> int:
    try:
        probe = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TargetProblem(
            f"target for {name}: {path} does not exist", hint="check the --to path"
        ) from None
    except OSError as exc:
        raise TargetProblem(f"target for {name}: cannot open {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(probe).st_mode
    finally:
        os.close(probe)
    is_device = stat.S_ISBLK(mode)
    if not is_device and not stat.S_ISREG(mode):
        raise TargetProblem(
            f"target for {name}: {path} is {safefile.describe_kind(mode)}",
            hint="a target is a block device (or an image file) exactly the origin's size",
        )
    flags = os.O_RDWR | os.O_CLOEXEC | (os.O_EXCL if is_device else 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise TargetInUse(
                f"target for {name}: {path} is in use (mounted, swap, or held by another device)",
                hint=f"unmount it or stop what holds it; {_NOTHING_WRITTEN}",
            ) from None
        raise TargetProblem(
            f"target for {name}: cannot open {path} to write: {exc.strerror}",
            hint="run as root (or as the owner of the target)",
        ) from None
    info = os.fstat(fd)
    if stat.S_ISBLK(info.st_mode) != is_device:  # replaced in between
        os.close(fd)
        raise TargetProblem(f"target for {name}: {path} changed while it was opened")
    loops = [] if is_device else loops_backed_by(info)
    if loops:
        os.close(fd)
        raise TargetInUse(
            f"target for {name}: {path} is attached to {', '.join(loops)}",
            hint=f"detach it (losetup -d) or give the loop device; {_NOTHING_WRITTEN}",
        )
    return fd


def loops_backed_by(info: os.stat_result) -> list[str]:
    """The loop devices whose backing file is the file `info` describes (e.g. /dev/loop3)."""
    found = []
    for backing in sorted(SYS_BLOCK.glob("loop*/loop/backing_file")):
        try:
            other = os.stat(backing.read_text().rstrip("\n"))
        except OSError:  # detached meanwhile, or a deleted file: not ours
            continue
        if (other.st_dev, other.st_ino) == (info.st_dev, info.st_ino):
            found.append(f"/dev/{backing.parent.parent.name}")
    return found


def _check_devices(step: _Step, targets: Mapping[str, str], opened: Mapping[str, int]) -> None:
    names = [d.name for d in step.header.devices]
    if set(names) != set(targets):
        raise InvalidInput(
            f"{step.path} holds devices {_some(names)}; targets given for {_some(sorted(targets))}",
            hint="give --to NAME=DEVICE for every device of the group",
        )
    for device in step.header.devices:
        size = blockio.size_bytes(opened[device.name])
        if size != device.sectors * 512:
            raise InvalidInput(
                f"target for {device.name} is {size} bytes; the delta's device is "
                f"{device.sectors * 512} bytes",
                hint="a target must be exactly the size of the origin",
            )


def _some(names: list[str], limit: int = 10) -> str:
    """Names for a message: all, or the first `limit` and how many more (a header may list
    65535 devices, report case D28)."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:limit])} and {len(names) - limit} more"


def _check_unfinished(
    targets: Mapping[str, str], from_cut: int | None, say: Say
) -> applylog.InProgress | None:
    """Say what an earlier apply onto these targets left, if it never finished (a kill -9, a
    crash); refuse a --from-cut the targets cannot hold."""
    unfinished = applylog.read(targets)
    if unfinished is None:
        return None
    wanted = "apply from the full image (without --from-cut)"
    if unfinished.held is not None:
        wanted = f"give --from-cut {unfinished.held}, or apply from the full image"
    if from_cut is not None and from_cut != unfinished.held:
        raise InvalidInput(
            f"an earlier apply onto these targets did not finish: {unfinished.describe()}; "
            f"they do not hold cut {from_cut}",
            hint=wanted,
        )
    say(f"an earlier apply onto these targets did not finish: {unfinished.describe()}")
    return unfinished


def _write_chain(
    steps: list[_Step],
    targets: Mapping[str, int],
    start: int | None,
    say: Say,
    record: tuple[str, Mapping[str, str]],
) -> ApplyResult:
    """Apply the verified steps in order; on failure say exactly what the targets hold.

    While a step is written, a durable record (dmrepl.applylog) says so, for the next
    apply to report if this one is killed.
    """
    group, paths = record
    warned = False
    applied: list[int] = []
    total = 0
    at = start
    with deferred_signals() as latch:
        for step in steps:
            header = step.header
            _stop_between_steps(latch, at, header.seq)
            size = step.summary.data_bytes
            say(f"applying cut {header.seq} from {step.path.name} ({size} bytes)")
            stream, reread = _reopen(step, at)
            with stream:
                in_progress = applylog.started(group, paths, at, header.seq, step.path.name)
                problem = applylog.write(in_progress)
                if problem is not None and not warned:
                    say(
                        f"warning: cannot keep a record of this apply ({problem}); if it is "
                        "killed, nothing will say what the targets hold"
                    )
                    warned = True
                try:
                    _write_step(stream, reread, str(step.path), targets, latch)
                except (OSError, DmreplError) as exc:
                    raise _stopped(exc, at, step) from None
            applylog.clear(paths)  # the targets hold a whole cut again
            applied.append(header.seq)
            total += step.summary.data_bytes
            at = header.seq
    assert at is not None
    return ApplyResult(applied, at, total)


def _stop_between_steps(latch: SignalLatch, at: int | None, next_seq: int) -> None:
    try:
        latch.check()
    except DmreplError as exc:
        held = "nothing was written to the targets" if at is None else f"the targets hold cut {at}"
        stopped = ApplyStopped(
            f"apply stopped before cut {next_seq}: {exc.message.split(';')[0]}; {held}",
            hint="run `dmrepl apply` again to go on"
            + ("" if at is None else f" (with --from-cut {at})"),
        )
        stopped.exit_code = ExitCode.INTERRUPTED
        raise stopped from None


def _reopen(step: _Step, at: int | None) -> tuple[BinaryIO, delta.DeltaHeader]:
    """The step's file again, after its header; refused if it is not the file verified."""
    stream = _open_delta(step.path)
    try:
        same = _identity(os.fstat(stream.fileno())) == step.identity
        header = delta.read_header(stream, str(step.path)) if same else step.header
        same = same and header == step.header
    except BaseException:
        stream.close()
        raise
    if not same:
        stream.close()
        held = "nothing was written to the targets" if at is None else f"the targets hold cut {at}"
        raise delta.CorruptDelta(
            str(step.path), 0, "changed since it was verified",
            message=f"{step.path} changed since it was verified; {held}",
            hint="something else writes to the directory; stop it and apply again",
        )  # fmt: skip
    return stream, header


def _write_step(
    stream: BinaryIO,
    header: delta.DeltaHeader,
    source: str,
    targets: Mapping[str, int],
    latch: SignalLatch,
) -> None:
    """Write one verified delta (positioned after its header) to the targets, then fsync."""
    fds = [targets[d.name] for d in header.devices]
    if header.base_seq is None:
        for device, fd in zip(header.devices, fds, strict=True):
            latch.check()
            _zero(fd, device.sectors * 512)
    for record in delta.records(stream, header, source):
        latch.check()
        blockio.write_at(fds[record.device], record.offset, record.data)
    for fd in fds:
        os.fsync(fd)


def _stopped(exc: OSError | DmreplError, at: int | None, step: _Step) -> ApplyStopped:
    """What the targets hold after `step` failed half way, and how to finish."""
    reason = exc.message if isinstance(exc, DmreplError) else (exc.strerror or str(exc))
    name = step.path.name
    if at is None:
        held = (
            f"the targets hold no complete cut: {name} (a full image, cut {step.header.seq}) "
            "was partly written"
        )
        finish = "run the same `dmrepl apply` again"
    else:
        held = (
            f"the targets are between cut {at} and cut {step.header.seq}: they held cut {at}, "
            f"and {name} was partly written"
        )
        finish = f"run `dmrepl apply` again with --from-cut {at}"
    stopped = ApplyStopped(
        f"apply stopped: {reason}; {held}",
        hint=f"{finish} (applying a delta again is harmless); until then, do not use the targets",
    )
    if isinstance(exc, DmreplError) and exc.exit_code is ExitCode.INTERRUPTED:
        stopped.exit_code = ExitCode.INTERRUPTED
    elif isinstance(exc, delta.CorruptDelta):
        stopped.exit_code = ExitCode.CORRUPT
    return stopped


def _zero(fd: int, length: int) -> None:
    """Zero a whole target: BLKZEROOUT on a block device, truncation on a file."""
    if stat.S_ISBLK(os.fstat(fd).st_mode):
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", 0, length))
    else:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, length)
