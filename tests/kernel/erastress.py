"""Drive a dm-era device to its worst metadata use and report whether it survived.

Shared by the kernel test (tests/kernel/test_sizing_kernel.py) and the
benchmark (bench/metadata_sizing.py). The origin is a `zero` target of any size
(writes are discarded, so no data storage is needed); the metadata is a fresh,
all-zero loop file of exactly the size under test behind a linear device, as in
dmrepl's stack, so dm-era formats it.

The stress, with the kernel behaviour it relies on (drivers/md/dm-era-target.c
and drivers/md/persistent-data/, Debian 6.1). `checkpoint` and
`take_metadata_snap` archive the current writeset and start a new era, but only
flag the archive for digestion: the digest starts at the worker's next run
(kick_off_digest), which the next message, status read or unmarked write
causes. Two messages in a row therefore leave two archived writesets, the
first not yet digested. That is dmrepl's `DEFAULT_PENDING_WRITESETS` (2).
Every writeset takes as many metadata blocks empty as full (dm-array.c
insert_full_ablocks gives each array block of a new bitset its own block).
With `pending_writesets` P, steps 2 and 4 send P messages in a row instead of
two; those after the second race the digest, which runs between them.

1. Write one sector in every era block: every bit of the current writeset W0.
2. `checkpoint` (archives W0), then `take_metadata_snap` (archives the new
   W1, commits and pins the era array and the writeset btree holding W0 and
   W1). Wait until the worker has digested W0 into the era array: the live
   array is now a second full copy beside the snapshot's.
3. Write every era block again: a second full writeset.
4. `checkpoint`, `checkpoint`: two archived writesets pending, the first full;
   the second message's worker run starts the digest. Then stay idle. Digest
   steps never commit; only bio batches and messages (status too: it is an
   rpc) do. So the digest rewrites the whole era array in one transaction, and
   the blocks it frees are not reusable before the commit (the metadata space
   map allocates only blocks free in the last committed map,
   sm_ll_find_common_free_block): three era arrays at once. A status read
   reports the used count before it commits (process_rpc_calls), so the first
   one after the digest sees it. Steps 3 and 4 are repeated with twice the
   idle time until the count shows three arrays and stops growing: on a
   loaded host the digest can outlast the first idle time.
5. Steps 3 and 4 once more, idle as long as step 4 needed, but before the
   status read write one era block in every writeset array block (the
   bitset's 32576 bits a block): the worker
   marks them on disk, shadowing every block of the new writeset, in the same
   transaction as the uncommitted digest, and commits. No status read can see
   that peak (the bios commit before any rpc runs); only a run on a device that
   is too small shows it, by failing.
6. More `checkpoint`s in a row: archived writesets queue for digestion.
7. `drop_metadata_snap`, then take and drop it again many times, rewriting one
   era block per era array block while each snapshot is held.
8. `checkpoint`, then one write + fsync into block 0, now unmarked: the write
   completes only after the worker has marked it and committed.

The run fails on any write error, failed dmsetup message or status, or an error
from dm-era or persistent-data in the kernel log: a digest step that runs out
of metadata only logs "digest step failed" and stops digestion. After a failure
that was not itself a write error, every era block is written once more to see
whether writes now fail (EIO is what users see when the metadata is full).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import re
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dmrepl import dm, loop
from dmrepl.errors import DmreplError
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import command, probe
from dmrepl.sizing import (
    BITS_PER_BITSET_BLOCK,
    DEFAULT_PENDING_WRITESETS,
    ERAS_PER_ARRAY_BLOCK,
    SECTORS_PER_METADATA_BLOCK,
    era_array_blocks,
)
from dmrepl.status import parse_era_status, parse_status_line
from dmrepl.tables import Era, Linear, Zero, single

SECTOR = 512
QUIET_S = 0.3  # how long the used count must hold before the digest counts as done
IDLE_DIGEST_ATTEMPTS = 6  # idle times of 1, 2, 4, ... 32 s (or more) before giving up

MakeLoop = Callable[[str, int], str]  # (name, size in bytes) -> /dev/loopN
MakeDm = Callable[[str, str], str]  # (name, table text) -> /dev/mapper/NAME
Say = Callable[[str], object]

# Kernel log lines that mean the metadata (or its use) failed: dm-era's DMERRs and
# persistent-data's ("space map metadata: unable to allocate new metadata block", ...).
_KERNEL_ERROR = re.compile(
    r"device-mapper: (era|space map|block manager|transaction manager|btree|array|bitset)"
)


def _quiet(_text: str) -> None:
    """The default `say`: print nothing."""


# --- writes: many single-sector O_DIRECT writes per system call --------------------------

# x86_64 system call numbers and the native AIO ABI (include/uapi/linux/aio_abi.h).
_NR_IO_SETUP, _NR_IO_DESTROY, _NR_IO_GETEVENTS, _NR_IO_SUBMIT = 206, 207, 208, 209
_IOCB_CMD_PWRITE = 1
_IOCB_WORDS = 8  # struct iocb: 64 bytes, as 8 little-endian 64-bit words
_IOCB_OFFSET_WORD = 5  # aio_offset
_EVENT_WORDS = 4  # struct io_event: data, obj, res, res2
_EVENT_RES_WORD = 2


class SectorWriter:
    """Writes one sector at many offsets with Linux native AIO, thousands per io_submit.

    dm-era defers every write to a block not yet marked in the current era to
    its worker, which marks the whole deferred batch and commits once
    (process_deferred_bios). Synchronous writes cost one metadata commit each
    (about 20 ms in the emulated test VM); a batch of 4096 costs one.
    """

    def __init__(self, device: str, batch: int = 4096) -> None:
        if platform.machine() != "x86_64":
            raise OSError(errno.ENOSYS, "SectorWriter knows the AIO system calls of x86_64 only")
        self.batch = batch
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.syscall.restype = ctypes.c_long
        self._fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
        self._buffer = mmap.mmap(-1, mmap.PAGESIZE)  # page aligned, as O_DIRECT needs
        self._buffer.write(b"\xa5" * mmap.PAGESIZE)
        self._buffer_ref = ctypes.c_char.from_buffer(self._buffer)
        self._ctx = ctypes.c_ulong(0)
        self._syscall(_NR_IO_SETUP, ctypes.c_long(batch), ctypes.byref(self._ctx))
        # Word 2 = opcode | reqprio << 16 | fildes << 32, 3 = buffer, 4 = length, 5 = offset.
        iocb = [0, 0, _IOCB_CMD_PWRITE | (self._fd << 32), ctypes.addressof(self._buffer_ref)]
        iocb += [SECTOR, 0, 0, 0]
        self._words = (ctypes.c_int64 * (_IOCB_WORDS * batch))(*(iocb * batch))
        base = ctypes.addressof(self._words)
        self._pointers = (ctypes.c_void_p * batch)(
            *(base + 8 * _IOCB_WORDS * i for i in range(batch))
        )
        self._events = (ctypes.c_int64 * (_EVENT_WORDS * batch))()

    def _syscall(self, number: int, *args: object) -> int:
        result = int(self._libc.syscall(number, *args))
        if result < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"AIO system call {number}: {os.strerror(code)}")
        return result

    def write(self, offsets: range) -> None:
        """Write one sector at each byte offset; OSError (EIO, ...) if any write failed."""
        for start in range(0, len(offsets), self.batch):
            part = offsets[start : start + self.batch]
            self._words[_IOCB_OFFSET_WORD : _IOCB_WORDS * len(part) : _IOCB_WORDS] = list(part)
            self._submit_and_wait(len(part))

    def _submit_and_wait(self, count: int) -> None:
        submitted = 0
        while submitted < count:
            pointers = ctypes.byref(self._pointers, submitted * ctypes.sizeof(ctypes.c_void_p))
            submitted += self._syscall(
                _NR_IO_SUBMIT, self._ctx, ctypes.c_long(count - submitted), pointers
            )
        completed = 0
        failed: list[int] = []
        while completed < count:
            try:
                got = self._syscall(
                    _NR_IO_GETEVENTS,
                    self._ctx,
                    ctypes.c_long(1),
                    ctypes.c_long(count - completed),
                    ctypes.byref(self._events),
                    None,
                )
            except InterruptedError:
                continue
            results = self._events[_EVENT_RES_WORD : _EVENT_WORDS * got : _EVENT_WORDS]
            failed += [r for r in results if r != SECTOR]
            completed += got
        if failed:
            code = -failed[0] if failed[0] < 0 else errno.EIO
            raise OSError(code, f"{len(failed)} of {count} writes failed: {os.strerror(code)}")

    def close(self) -> None:
        self._syscall(_NR_IO_DESTROY, self._ctx)
        os.close(self._fd)
        del self._buffer_ref  # the mmap cannot close while a ctypes view exports it
        self._buffer.close()


def write_and_sync(device: str, offset: int) -> None:
    """One synchronous O_DIRECT sector write and an fsync (OSError on failure)."""
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, mmap.PAGESIZE) as buffer:
            os.pwrite(fd, memoryview(buffer)[:SECTOR], offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# --- devices ---------------------------------------------------------------------------


@contextmanager
def scratch_devices(
    runner: Runner, workdir: Path, prefix: str
) -> Iterator[tuple[MakeLoop, MakeDm]]:
    """Loop and dm device factories like the kernel tests' fixtures; all torn down on exit."""
    with ExitStack() as undo:

        def make_loop(name: str, size_bytes: int) -> str:
            path = workdir / f"{prefix}{name}.img"
            loop.create_sparse_file(path, size_bytes)
            undo.callback(path.unlink, missing_ok=True)
            device = loop.attach(runner, path)
            undo.callback(runner.run_best_effort, loop.detach(device))
            return device

        def make_dm(name: str, table: str) -> str:
            full = prefix + name
            # Registered before the create: a create whose resume fails (an era
            # device whose metadata is too small to format) leaves the device.
            undo.callback(remove_device, runner, full)
            runner.run(dm.create(full, table, uuid=f"{dm.UUID_PREFIX}stress-{full}"))
            return dm.mapper_path(full)

        yield make_loop, make_dm


def remove_device(runner: Runner, name: str) -> None:
    """Remove a dm device (if it exists), resuming it first if it was left suspended."""
    try:
        suspended = dm.is_suspended(runner, name)
    except CommandFailed:  # no such device: its create failed early, or the run abandoned it
        return
    if suspended:
        with suppress(CommandFailed):  # removal is still worth a try
            runner.run(dm.resume(name))
    runner.run_best_effort(dm.remove(name))


# --- the stress ------------------------------------------------------------------------


class StressFailed(Exception):
    """One step of the stress failed; carries the step and, for a write, the errno."""

    def __init__(self, step: str, detail: str, errno_: int | None = None) -> None:
        super().__init__(f"{step}: {detail}")
        self.step = step
        self.errno = errno_


@dataclass
class StressResult:
    """What one stress run saw. Block counts are 4 KiB metadata blocks."""

    origin_sectors: int
    block_sectors: int
    metadata_sectors: int
    era_blocks: int
    ok: bool = False
    error: str | None = None  # "<step>: <detail>" of the first failure
    failed_step: str | None = None
    write_errno: int | None = None  # errno of the failed write, or of the write probe after
    metadata_total_blocks: int = 0  # as the era status reports
    peak_used_blocks: int = 0  # the highest used count any status showed
    idle_digest_used_blocks: int = 0  # the used count right after the idle full rewrite
    idle_digest_attempts: int = 0  # rewrites until the idle digest's count settled
    idle_digest_seconds: float = 0.0  # the idle time that showed them
    samples: list[tuple[str, int]] = field(default_factory=list)  # (step, used blocks)
    kernel_errors: list[str] = field(default_factory=list)
    step_seconds: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def io_error(self) -> bool:
        """Writes failed with EIO (what users see when dm-era's metadata is full)."""
        return self.write_errno == errno.EIO

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["io_error"] = self.io_error
        return data


class _EraUnderTest:
    """The era device under stress: messages, status reads and writes, each a named step."""

    def __init__(self, runner: Runner, device: str, result: StressResult) -> None:
        self.runner = runner
        self.device = device
        self.name = os.path.basename(device)
        self.result = result
        self.lower: list[str] = []  # the dm devices under it (metadata, origin)
        self.writer = SectorWriter(device)

    def used(self, step: str) -> int:
        """Used metadata blocks from the era status. The read also commits (it is an rpc).

        A bare `dmsetup status`: the stress never suspends the era device, so
        era.read_status's suspended check (one more process, half a second in
        the emulated VM) is not needed.
        """
        try:
            line = parse_status_line(self.runner.run(dm.status(self.name)).stdout)
            status = parse_era_status(line.params)
        except DmreplError as exc:
            raise StressFailed(f"{step} (status)", exc.message) from exc
        used = status.metadata_used_blocks
        self.result.metadata_total_blocks = status.metadata_total_blocks
        self.result.samples.append((step, used))
        self.result.peak_used_blocks = max(self.result.peak_used_blocks, used)
        return used

    def message(self, text: str) -> None:
        try:
            self.runner.run(dm.message(self.name, text))
        except CommandFailed as exc:
            raise StressFailed(text, exc.stderr.strip() or exc.message) from exc

    def write(self, step: str, offsets: range) -> None:
        try:
            self.writer.write(offsets)
        except OSError as exc:
            raise StressFailed(step, exc.strerror or str(exc), exc.errno) from exc

    def wait_quiet(self, step: str, timeout_s: float) -> float:
        """Read the status until the used count has held for QUIET_S: digestion has stopped.

        While the worker digests a writeset with marked bits it shadows era
        array blocks again after every commit (each read is one), so the used
        count moves between reads; two reads in a row can still agree while a
        digest goes on, so the count must hold over several spaced reads.
        Returns the seconds until the count settled.
        """
        started = time.monotonic()
        previous, settled_at = self.used(step), started
        while time.monotonic() - started < timeout_s:
            time.sleep(QUIET_S / 3)
            current, now = self.used(step), time.monotonic()
            if current != previous:
                previous, settled_at = current, now
            elif now - settled_at >= QUIET_S:
                break
        return settled_at - started

    def close(self) -> None:
        self.writer.close()


def kernel_log_lines(runner: Runner) -> list[str]:
    return runner.run(probe("dmesg")).stdout.splitlines()


def mark_kernel_log() -> str:
    """Write a unique line into the kernel log and return it.

    A line count is no cursor: the log is a ring, and after many tests in one
    guest old lines fall out of it, so a count taken before a run can exceed the
    lines there after it.
    """
    mark = f"dmrepl-erastress-{uuid.uuid4().hex}"
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(mark + "\n")
    return mark


def kernel_log_since(runner: Runner, mark: str) -> list[str]:
    """Kernel log lines after the line holding `mark` (all lines if it rolled out)."""
    lines = kernel_log_lines(runner)
    starts = [i for i, line in enumerate(lines) if mark in line]
    return lines[starts[-1] + 1 :] if starts else lines


def stress_era(
    runner: Runner,
    make_loop: MakeLoop,
    make_dm: MakeDm,
    origin_sectors: int,
    block_sectors: int,
    metadata_sectors: int,
    *,
    checkpoints: int = 3,
    pending_writesets: int = DEFAULT_PENDING_WRITESETS,
    snapshot_cycles: int = 10,
    digest_timeout_s: float = 600.0,
    probe_writes: bool = True,
    say: Say = _quiet,
) -> StressResult:
    """Run the stress on a new era device over a zero origin; never raises for what the kernel did.

    The devices come from `make_loop`/`make_dm` (the kernel test fixtures, or
    `scratch_devices`) and are left for them to tear down.
    """
    era_blocks = -(-origin_sectors // block_sectors)  # calc_nr_blocks: rounded up
    result = StressResult(origin_sectors, block_sectors, metadata_sectors, era_blocks)
    started = time.monotonic()
    log_mark = mark_kernel_log()
    era_dev: _EraUnderTest | None = None
    try:
        try:
            era_dev = _create(make_loop, make_dm, runner, result)
            _run_steps(
                era_dev, checkpoints, pending_writesets, snapshot_cycles, digest_timeout_s, say
            )
        except StressFailed as failure:
            result.error = str(failure)
            result.failed_step = failure.step
            result.write_errno = failure.errno
        result.kernel_errors = [
            line for line in kernel_log_since(runner, log_mark) if _KERNEL_ERROR.search(line)
        ]
        if result.error is None and result.kernel_errors:
            result.error = f"kernel log: {result.kernel_errors[0]}"
            result.failed_step = "kernel log"
        if probe_writes and era_dev and result.error is not None and result.write_errno is None:
            result.write_errno = _write_probe(era_dev)
    finally:
        if era_dev is not None:
            era_dev.close()  # the device is busy while the writer holds it open
    if era_dev is not None and result.kernel_errors:
        _abandon(runner, [era_dev.name, *era_dev.lower])
    result.ok = result.error is None
    result.seconds = round(time.monotonic() - started, 2)
    say(
        f"stress: {era_blocks} era blocks of {block_sectors} sectors,"
        f" metadata {metadata_sectors} sectors: "
        + ("ok" if result.ok else f"FAILED ({result.error})")
        + f"; peak {result.peak_used_blocks} blocks, {result.seconds:.0f} s"
    )
    return result


def _create(
    make_loop: MakeLoop, make_dm: MakeDm, runner: Runner, result: StressResult
) -> _EraUnderTest:
    sectors = result.metadata_sectors
    meta_loop = make_loop("meta", sectors * SECTOR)  # a fresh sparse file reads as zeros
    meta = make_dm("meta", single(sectors, Linear(meta_loop, 0)))
    origin = make_dm("origin", single(result.origin_sectors, Zero()))
    table = single(result.origin_sectors, Era(meta, origin, result.block_sectors))
    try:
        device = make_dm("era", table)
    except CommandFailed as exc:  # too small even to format and size the era array
        raise StressFailed("create", exc.stderr.strip() or exc.message) from exc
    era_dev = _EraUnderTest(runner, device, result)
    era_dev.lower = [os.path.basename(meta), os.path.basename(origin)]
    era_dev.used("created")
    return era_dev


def _run_steps(
    era_dev: _EraUnderTest,
    checkpoints: int,
    pending: int,
    snapshot_cycles: int,
    digest_timeout_s: float,
    say: Say,
) -> None:
    result = era_dev.result
    block_bytes = result.block_sectors * SECTOR
    end = result.origin_sectors * SECTOR
    every_block = range(0, end, block_bytes)
    every_array_block = range(0, end, block_bytes * ERAS_PER_ARRAY_BLOCK)
    every_bitset_block = range(0, end, block_bytes * BITS_PER_BITSET_BLOCK)
    clock = time.monotonic()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.monotonic()
        result.step_seconds[step] = round(now - clock, 2)
        clock = now
        say(f"  {step}: {result.step_seconds[step]:.1f} s, used {result.samples[-1][1]}")

    era_dev.write("first pass", every_block)
    era_dev.used("first pass")
    lap("first pass")

    # No worker run between the first two messages: the snapshot pins W0
    # undigested and W1 (and, with more pending, the archives made while the
    # worker digests W0 a hundred bits a step).
    for _ in range(pending - 1):
        era_dev.message("checkpoint")
    era_dev.message("take_metadata_snap")
    digest_s = era_dev.wait_quiet("snapshot held, digesting", digest_timeout_s)
    lap("checkpoint + take + digest")

    # The idle digest must finish before anything commits, or the three era
    # arrays are never live at once. How long it takes is not observable (a
    # status read commits), so the first rewrite is repeated with twice the
    # idle time until the status shows at least the steady state plus two
    # more arrays, and no more than with half the idle time: the digest ended
    # inside it. The second, unobservable rewrite then idles as long.
    three_arrays = result.samples[0][1] + 2 * era_array_blocks(result.era_blocks)
    idle_s = 1.0 + 1.5 * digest_s
    shown = 0
    for attempt in range(1, IDLE_DIGEST_ATTEMPTS + 1):
        result.idle_digest_attempts = attempt
        previous, shown = (
            shown,
            _rewrite_then_idle(era_dev, "pass 2", pending, idle_s, digest_timeout_s, lap),
        )
        result.idle_digest_used_blocks = max(result.idle_digest_used_blocks, shown)
        if three_arrays <= shown <= previous:
            break
        idle_s *= 2
    result.idle_digest_seconds = round(idle_s, 2)
    _rewrite_then_idle(
        era_dev, "pass 3", pending, idle_s, digest_timeout_s, lap, every_bitset_block
    )

    for _ in range(checkpoints - 1):
        era_dev.message("checkpoint")
    era_dev.wait_quiet("checkpoints", digest_timeout_s)
    lap("checkpoints")

    era_dev.message("drop_metadata_snap")
    for cycle in range(1, snapshot_cycles + 1):
        era_dev.message("take_metadata_snap")
        era_dev.write(f"snapshot cycle {cycle}", every_array_block)
        era_dev.message("drop_metadata_snap")
    era_dev.used("snapshot cycles")
    lap("snapshot cycles")

    era_dev.message("checkpoint")  # block 0 is now unmarked in the new era
    try:
        write_and_sync(era_dev.device, 0)
    except OSError as exc:
        raise StressFailed("final write", exc.strerror or str(exc), exc.errno) from exc
    used = era_dev.used("final")
    if not 0 < used <= result.metadata_total_blocks:
        raise StressFailed("final status", f"used {used} of {result.metadata_total_blocks}")
    lap("final check")


def _rewrite_then_idle(
    era_dev: _EraUnderTest,
    step: str,
    pending: int,
    idle_s: float,
    digest_timeout_s: float,
    lap: Callable[[str], None],
    writeset_rewrite: range | None = None,
) -> int:
    """Write every era block, archive it with `pending` checkpoints, stay idle while it is digested.

    The second checkpoint's worker run starts the digest of the first archive
    (kick_off_digest) and commits after its first step, before any era array
    block is rewritten; staying idle for `idle_s` lets the rest of the digest
    run as one transaction. With `writeset_rewrite`, those blocks are written
    before the status read, shadowing the new writeset in that transaction.
    Returns the used count the first status read after the idle time showed.
    """
    end = era_dev.result.origin_sectors * SECTOR
    era_dev.write(step, range(0, end, era_dev.result.block_sectors * SECTOR))
    era_dev.used(step)
    lap(step)
    for _ in range(pending):
        era_dev.message("checkpoint")
    time.sleep(idle_s)
    if writeset_rewrite is None:
        used = era_dev.used("after idle digest")
    else:
        era_dev.write("writeset rewrite", writeset_rewrite)
        used = era_dev.used("after idle digest + writeset rewrite")
    era_dev.wait_quiet("digested", digest_timeout_s)
    lap(f"{step}: checkpoints + idle digest")
    return used


ABANDONED_PREFIX = "abandoned-"


def _abandon(runner: Runner, names: list[str]) -> None:
    """Leave an era device whose metadata failed in the kernel, under names no teardown knows.

    Removing it can panic the kernel (seen on Debian's user-mode Linux 6.1.176):
    after a commit fails in dm_bitset_flush ("metadata_commit: bitset flush
    failed"), a metadata block stays locked, and era_dtr's
    dm_block_manager_destroy hits dm-bufio's BUG on the leaked buffer. Only a
    device that is never destroyed is safe, so the era device and the devices
    under it (which it keeps busy) are renamed, and the fixtures' removal finds
    nothing. The guest's power-off ends them.
    """
    for name in names:
        runner.run_best_effort(command("dmsetup", "rename", name, ABANDONED_PREFIX + name))


def _write_probe(era_dev: _EraUnderTest) -> int | None:
    """After a failure: write every era block once more; the errno if writes fail now."""
    result = era_dev.result
    every_block = range(0, result.origin_sectors * SECTOR, result.block_sectors * SECTOR)
    try:
        era_dev.writer.write(every_block)
    except OSError as exc:
        return exc.errno
    return None


def metadata_blocks(metadata_sectors: int) -> int:
    """4 KiB metadata blocks dm-era can use on a device of `metadata_sectors`."""
    return metadata_sectors // SECTORS_PER_METADATA_BLOCK
