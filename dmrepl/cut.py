"""Point-in-time cuts of a write-ordered group (DESIGN.md section 4) and their change lists.

A cut suspends every gate of the group (flushing in-flight I/O and freezing a
mounted filesystem), takes a metadata snapshot on every era device (which also
closes the current era), optionally creates a `-pit` snapshot of every origin,
and resumes the gates. Writers stall only for those steps. While the cut is
held, `era_invalidate` reads the metadata snapshots; afterwards the snapshots
are dropped and the `-pit` devices removed, always.

Era arithmetic: a take that moved era e to e+1 means every write before the cut
carries an era <= e and every write after it an era >= e+1. The cut records e;
whoever has applied that cut next asks for `written-since(e + 1)`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from dmrepl import dm, era, loop, probe, safefile, sizing
from dmrepl.dm import mapper_path
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.executor import Runner
from dmrepl.ops import Op
from dmrepl.policy import WriteCounters
from dmrepl.ranges import Extent, blocks_to_sectors
from dmrepl.signals import Say, SignalLatch, deferred_signals
from dmrepl.stack import Layer, LayerSpec, StackSpec, layer_name, pit_spec
from dmrepl.statedir import StateDir
from dmrepl.status import parse_snapshot_status, parse_status_line

DIGEST_WAIT_S = 60.0  # how long a cut waits for the digest (below systemd's 90 s stop timeout)
DIGEST_POLL_S = 0.25


class CowOverflow(DmreplError):
    """A `-pit` snapshot ran out of copy-on-write space: its image is no longer the cut."""


class MetadataFull(DmreplError):
    """dm-era has not digested earlier eras: a cut now could fill its metadata device."""

    exit_code = ExitCode.METADATA_FULL


@dataclass(frozen=True)
class DeviceCut:
    stack: StackSpec
    era: int  # the last era before the cut
    pit: LayerSpec | None  # the point-in-time image, when the cut has one


@dataclass(frozen=True)
class HeldCut:
    """A cut whose metadata snapshots (and `-pit` images) exist until it is released."""

    devices: tuple[DeviceCut, ...]
    stall_s: float  # how long the gates were suspended (by the cut itself)
    latch: SignalLatch
    counters: dict[str, WriteCounters]  # each gate's write counters at the cut
    steps: tuple[tuple[str, float], ...] = ()  # each stalled step and its seconds, in order
    stalled_from: float = 0.0  # time.monotonic() when the first stalled step began

    @property
    def eras(self) -> dict[str, int]:
        return {d.stack.device.name: d.era for d in self.devices}


def recover(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    observed: Mapping[str, dm.ObservedDevice],
    say: Say,
) -> list[str]:
    """Repair what a killed cut left behind; returns what was done.

    `observed` is the caller's fresh `dm.observe` (each dmsetup call is a process
    start, so the cycle observes once). A suspended gate, `-orig`, era or mirror device
    is resumed; a stale `-pit` is removed (its COW is then unused); a metadata
    snapshot still held is dropped.
    """
    done: list[str] = []

    def act(text: str, op: Op) -> None:
        say(text)
        runner.run(op)
        done.append(text)

    for stack in stacks:
        pit = layer_name(stack.device.name, Layer.PIT)
        for layer in (Layer.MIRROR, Layer.ORIGIN, Layer.ERA, Layer.GATE):  # bottom up
            spec = stack.get(layer)
            name = "" if spec is None else spec.name
            if name in observed and observed[name].suspended:
                act(f"resume {name} (left suspended by an interrupted cut)", dm.resume(name))
        if pit in observed:
            if observed[pit].suspended and observed[pit].table:  # no table: never resumable
                runner.run(dm.resume(pit))
            act(f"remove stale {pit}", dm.remove(pit))
        era_name = stack.require(Layer.ERA).name
        # Resumed above if it was suspended, so asking its status cannot block.
        if era_name in observed and era.read_status(runner, era_name, checked=False).snapshot_held:
            act(
                f"drop the metadata snapshot left held on {era_name}",
                dm.message(era_name, "drop_metadata_snap"),
            )
    return done


@dataclass(frozen=True)
class CutStep:
    """One command of a cut, with what undoes it when the cut fails (`undo`) and what
    releases it once the cut is no longer needed (`release`). A step that `stalls` runs
    while writers are held (as an ioctl, `Runner.run_dm`); the others run before."""

    op: Op
    undo: Op | None = None  # run if a later step fails (in reverse order)
    release: Op | None = None  # run when the held cut is released (in reverse order)
    stalls: bool = True


def cut_steps(
    stacks: tuple[StackSpec, ...],
    cow_for: Mapping[str, str] | None,
    *,
    gates_held: bool = False,
) -> list[CutStep]:
    """The commands of a cut, in order (pure: `dmrepl sync --dry-run` prints these).

    With `cow_for` (device -> COW device) each `-pit` device is first created empty, before
    writers stall. Gates are then suspended (freezing writers, flushing in-flight I/O); every
    era closes its era and pins its metadata; each `-pit` gets its snapshot table, loaded and
    made live while its snapshot-origin is suspended, as dm-snapshot requires; finally the
    gates resume. With `gates_held` the caller holds the gates suspended already
    (dmrepl.replication.hold) and the cut leaves them so.
    """
    pits = (
        {}
        if cow_for is None
        else {s.device.name: pit_spec(s, cow_for[s.device.name]) for s in stacks}
    )
    steps: list[CutStep] = []
    for pit in pits.values():  # 0. the images' devices, no table yet: nothing is registered
        steps.append(
            CutStep(dm.create_empty(pit.name, pit.uuid), release=dm.remove(pit.name), stalls=False)
        )
    for stack in () if gates_held else stacks:  # 1. freeze writers (flushes in-flight I/O)
        gate = stack.require(Layer.GATE).name
        steps.append(CutStep(dm.suspend(gate), undo=dm.resume(gate)))
    for stack in stacks:  # 2. close the era and pin its metadata (era stays active)
        name = stack.require(Layer.ERA).name
        drop = dm.message(name, "drop_metadata_snap")
        steps.append(CutStep(dm.message(name, "take_metadata_snap"), release=drop))
    for stack in stacks if pits else ():  # 3. the point-in-time images
        pit = pits[stack.device.name]
        origin = stack.require(Layer.ORIGIN).name
        steps.append(CutStep(dm.suspend(origin), undo=dm.resume(origin)))
        steps.append(CutStep(dm.load(pit.name, pit.table)))
        steps.append(CutStep(dm.resume(pit.name)))
        steps.append(CutStep(dm.resume(origin)))
    for stack in () if gates_held else reversed(stacks):  # 4. writers go on
        steps.append(CutStep(dm.resume(stack.require(Layer.GATE).name)))
    return steps


@contextmanager
def held_cut(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    *,
    cow_for: Callable[[StackSpec], str] | None = None,
    say: Say = print,
    gates_held: bool = False,
) -> Iterator[HeldCut]:
    """Take a cut of every stack at once (`cut_steps`) and hold it for the body.

    With `cow_for` (device -> COW device), each device also gets a `-pit` image.
    Any failure, SIGINT or SIGTERM undoes every step in reverse; whatever happens,
    gates are resumed before the body runs (unless `gates_held`: the caller holds
    them) and everything is released after it. The gates' write counters are read
    while they are suspended, so they count exactly the writes before the cut.
    The stalled steps are ioctls (`Runner.run_dm`); each one's time is in `HeldCut.steps`.
    """
    wait_for_metadata_room(runner, stacks, say=say, patient=not gates_held)
    cows = None if cow_for is None else {s.device.name: cow_for(s) for s in stacks}
    names = [s.device.name for s in stacks]
    steps = cut_steps(stacks, cows, gates_held=gates_held)
    gates_suspended = sum(not step.stalls for step in steps) + (0 if gates_held else len(stacks))
    with (
        deferred_signals() as latch,
        ExitStack() as release,
        opened_gate_counters(names) as read_counters,
    ):
        started: float | None = None
        timings: list[tuple[str, float]] = []
        pending: list[Op] = []  # what undoes the steps taken so far (resumes of suspends)
        counters = read_counters() if gates_held else {}
        try:
            for index, step in enumerate(steps):
                if not gates_held and index == gates_suspended:  # every gate is suspended
                    counters = read_counters()
                    timings.append(("read the gates' write counters", time.monotonic()))
                latch.check()
                if step.stalls:
                    started = time.monotonic() if started is None else started
                    runner.run_dm(step.op)
                    timings.append((step_label(step.op), time.monotonic()))
                else:
                    runner.run(step.op)
                if step.op in pending:
                    pending.remove(step.op)  # the step was that undo itself: a resume
                if step.undo is not None:
                    pending.append(step.undo)
                if step.release is not None:
                    release.callback(runner.run_best_effort, step.release)
        except BaseException:
            for op in reversed(pending):
                runner.run_best_effort(op)
            raise
        ended = time.monotonic()
        stall = 0.0 if started is None else ended - started
        say(f"cut taken; writers stalled {stall * 1000:.0f} ms")
        pits = (
            {}
            if cows is None
            else {s.device.name: pit_spec(s, cows[s.device.name]) for s in stacks}
        )
        for pit in pits.values():
            if not os.path.exists(pit.path):  # udev makes it on some hosts, or not in time
                runner.run(dm.mknodes(pit.name))
        devices = tuple(
            DeviceCut(stack, _last_era(runner, stack), pits.get(stack.device.name))
            for stack in stacks
        )
        yield HeldCut(
            devices, stall, latch, counters, _durations(started, timings), started or ended
        )
        latch.check()


def wait_for_metadata_room(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    *,
    say: Say,
    patient: bool = True,
    timeout_s: float = DIGEST_WAIT_S,
    poll_s: float = DIGEST_POLL_S,
) -> float:
    """Wait until every era device has the free metadata a cut may need; the seconds waited.

    Each take archives the current writeset, which dm-era's worker then digests
    into the era array one bit at a time (in the test guest about 0.3 s for
    8 Mi era blocks). Cuts taken faster pile archived writesets up, each as
    large as the device's bitmap, and a full metadata device makes dm-era fail
    writes. Not `patient` (the caller already holds the writers): look once.
    Raises `MetadataFull` when the room has not come after `timeout_s`.
    """
    started = time.monotonic()
    for stack in stacks:
        name = stack.require(Layer.ERA).name
        need = sizing.cut_headroom_blocks(stack.origin_sectors, stack.device.block_sectors)
        told = False
        while True:
            status = era.read_status(runner, name, checked=False)
            free = status.metadata_total_blocks - status.metadata_used_blocks
            if free >= need:
                break
            if not patient or time.monotonic() - started >= timeout_s:
                raise MetadataFull(
                    f"{name}: {free} metadata blocks free, and a cut may need {need}: dm-era"
                    " has not yet digested earlier eras, and a cut now could fill its metadata"
                    " (dm-era then fails writes)",
                    hint="retry later; take cuts less often, or give the device larger era"
                    " blocks or more metadata (`dmrepl size` prints what it needs)",
                )
            if not told:
                say(f"{name}: waiting for dm-era to digest earlier eras ({free} metadata blocks"
                    f" free, a cut may need {need})")  # fmt: skip
                told = True
            time.sleep(poll_s)
    return time.monotonic() - started


def step_label(op: Op) -> str:
    """A stalled step in a few words: `suspend ca`, `message ca-era take_metadata_snap`."""
    return " ".join(op.argv[1:3] + op.argv[4:])


def _durations(
    started: float | None, ends: list[tuple[str, float]]
) -> tuple[tuple[str, float], ...]:
    """Each step's seconds from the end times of the steps in a row."""
    durations, previous = [], started or 0.0
    for label, end in ends:
        durations.append((label, end - previous))
        previous = end
    return tuple(durations)


def gate_counters(devices: Iterable[str]) -> dict[str, WriteCounters]:
    """The block-layer write counters of the named devices' gates now (a gate whose sysfs
    cannot be read, a stack not up, is left out: a backlog is then unknown, never guessed)."""
    found = {
        name: probe.write_counters(mapper_path(layer_name(name, Layer.GATE))) for name in devices
    }
    return {name: counters for name, counters in found.items() if counters is not None}


@contextmanager
def opened_gate_counters(
    devices: Iterable[str],
) -> Iterator[Callable[[], dict[str, WriteCounters]]]:
    """`gate_counters` opened ahead: the reader it yields costs one system call a gate."""
    with ExitStack() as close:
        fds = {}
        for name in devices:
            fd = probe.open_write_counters(mapper_path(layer_name(name, Layer.GATE)))
            if fd is not None:
                close.callback(os.close, fd)
                fds[name] = fd

        def read() -> dict[str, WriteCounters]:
            found = {name: probe.read_write_counters(fd) for name, fd in fds.items()}
            return {name: counters for name, counters in found.items() if counters is not None}

        yield read


def _last_era(runner: Runner, stack: StackSpec) -> int:
    """The cut's last era, read once the gates are resumed (outside the writers' stall).

    The take moved the era one past it, and only the next take moves it again.
    Unchecked status: a cut never suspends an era device, and `recover` resumed
    any that an interrupted run left suspended.
    """
    return era.read_status(runner, stack.require(Layer.ERA).name, checked=False).current_era - 1


def cow_file(state_dir: Path, stack: StackSpec) -> Path:
    """The sparse file backing a device's `-pit` COW while a cut is held (no `cow` device)."""
    return StateDir(state_dir).cow_file(stack.device.group, stack.device.name)


def leaked_cow_loops(
    stacks: tuple[StackSpec, ...], state_dir: Path, attached: list[probe.LoopDevice]
) -> list[probe.LoopDevice]:
    """Loop devices a killed run left attached to these stacks' COW files.

    A loop still held (by a live `-pit`) is not leaked; `recover` removes stale
    `-pit` images first. Other groups' COW files are never matched: their cycles
    run under their own locks.
    """
    ours = {str(cow_file(state_dir.resolve(), s)) for s in stacks if s.device.cow is None}
    return [loop for loop in attached if loop.backing_file in ours and not loop.holders]


def recover_cows(
    runner: Runner,
    stacks: tuple[StackSpec, ...],
    state_dir: Path,
    say: Say,
    attached: list[probe.LoopDevice] | None = None,
) -> list[str]:
    """Detach the COW loops a killed cut left behind and delete their files; returns what
    was done. Call after `recover` (which removes the stale `-pit` images holding them)."""
    done: list[str] = []
    found = probe.loop_devices() if attached is None else attached
    for leaked in leaked_cow_loops(stacks, state_dir, found):
        gone = " (deleted)" if leaked.deleted else ""
        text = (
            f"detach {leaked.node} (COW loop on {leaked.backing_file}{gone} of an interrupted cut)"
        )
        say(text)
        runner.run(loop.detach(leaked.node))
        done.append(text)
    for stack in stacks:
        path = cow_file(state_dir, stack)
        if stack.device.cow is None and path.exists():
            path.unlink()
            done.append(f"removed {path} (left by an interrupted cut)")
    return done


@contextmanager
def cow_devices(
    runner: Runner, stacks: tuple[StackSpec, ...], state_dir: Path
) -> Iterator[Callable[[StackSpec], str]]:
    """Copy-on-write devices for `-pit` images, as configured per device.

    `cow = "/dev/..."` is used as it is. Otherwise a sparse file of `cow_size`
    (default: the origin's size, so it can never overflow; it only takes the
    space of what is overwritten while the cut is held) under `<state>/cow/`
    is attached to a loop device, and detached and deleted afterwards.
    """
    with ExitStack() as cleanup:
        chosen: dict[str, str] = {}
        for stack in stacks:
            device = stack.device
            if device.cow is not None:
                chosen[device.name] = device.cow
                continue
            path = cow_file(state_dir, stack)
            safefile.private_dir(path.parent, what="state_dir", strict_from=state_dir)
            sectors = device.cow_sectors or stack.origin_sectors
            loop.create_sparse_file(path, sectors * 512)
            cleanup.callback(path.unlink, missing_ok=True)
            chosen[device.name] = loop.attach(runner, path)
            cleanup.callback(runner.run_best_effort, loop.detach(chosen[device.name]))
        yield lambda stack: chosen[stack.device.name]


def check_pits(runner: Runner, held: HeldCut) -> None:
    """Raise CowOverflow if any `-pit` lost its image (Invalid/Overflow COW)."""
    for cut in held.devices:
        if cut.pit is None:
            continue
        status = parse_snapshot_status(
            parse_status_line(runner.run(dm.status(cut.pit.name)).stdout).params
        )
        if status.full:
            raise CowOverflow(
                f"{cut.pit.name}: the copy-on-write space ran out ({status.state.value}); "
                "its image is no longer the cut and was not used",
                hint="give the device a larger cow_size (or cow device) and run again",
            )


def list_changes(
    runner: Runner, held: HeldCut, since: Mapping[str, int]
) -> dict[str, list[Extent]]:
    """Sector ranges written between era `since[device]` and the cut, per device.

    Read from the held metadata snapshots, coalesced and clamped at the device end.
    """
    changes: dict[str, list[Extent]] = {}
    for cut in held.devices:
        name = cut.stack.device.name
        first = since[name]
        if first > cut.era + 1:
            raise DmreplError(
                f"{name}: era {first} is after this cut (whose last era is {cut.era})",
                hint="ask for an era or cut from before this one",
            )
        held.latch.check()
        blocks = era.written_since(runner, cut.stack.require(Layer.ACCESS).path, first)
        changes[name] = list(
            blocks_to_sectors(blocks, cut.stack.device.block_sectors, cut.stack.origin_sectors)
        )
    return changes
