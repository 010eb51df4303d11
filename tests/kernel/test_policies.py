"""The replicator's site-link policies on the real kernel: synchronous mirror legs, their
failure and rejoin, fall-behind limits and the stall policy."""

from __future__ import annotations

import mmap
import os
import time
from collections.abc import Callable
from contextlib import ExitStack

from dmrepl import dm
from dmrepl.executor import Runner
from dmrepl.probe import write_counters
from tests.kernel.stacks import Bed

MiB = 2**20
BLOCK = 64 * 1024
SECTORS_16M = 16 * MiB // 512


def write_direct(path: str, offset: int, data: bytes) -> float:
    """Write `data` at `offset` with O_DIRECT|O_SYNC; returns the seconds it took."""
    aligned = mmap.mmap(-1, len(data))  # O_DIRECT wants an aligned buffer
    aligned.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        started = time.monotonic()
        os.pwrite(fd, aligned, offset)
        return time.monotonic() - started
    finally:
        os.close(fd)
        aligned.close()


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 4 * MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def reload(runner: Runner, name: str, table: str) -> None:
    """Swap the live table of dm device `name` (under a mirror leg: I/O waits meanwhile)."""
    runner.run(dm.load(name, table))
    runner.run(dm.suspend(name))
    runner.run(dm.resume(name))


def test_synchronous_site_has_every_write_before_it_completes(
    bed: Bed,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    bed.add_device("sa", origin_mib=16)
    replica = make_loop("sa-replica", 16 * MiB)
    delay_ms = 60
    slow = make_dm("slow", f"0 {SECTORS_16M} delay {replica} 0 {delay_ms}")
    cleanup.callback(bed.teardown)  # the stack goes before the device under its leg
    bed.add_site("dr", replicas={"sa": slow}, policy="synchronous")
    bed.cli("up")
    gate = "/dev/mapper/sa"
    before = [write_direct(gate, i * BLOCK, os.urandom(4096)) for i in range(5)]
    first = bed.cli("sync", bed.group)
    assert "site dr: joined the mirror at cut 2: synchronous" in first.stderr, first.stderr
    latencies = [write_direct(gate, i * BLOCK + 8192, os.urandom(4096)) for i in range(20)]
    print(
        f"4 KiB O_DIRECT write to the gate: before joining max {max(before) * 1000:.1f} ms; "
        f"synchronous min {min(latencies) * 1000:.1f} ms, "
        f"mean {sum(latencies) / len(latencies) * 1000:.1f} ms (replica delay {delay_ms} ms)"
    )
    assert min(latencies) >= delay_ms / 1000 * 0.95
    burst = os.urandom(3 * MiB)
    write_direct(gate, 5 * MiB, burst)
    # No cycle ran since: the mirror leg has every write.
    assert read_all(replica) == read_all(gate)
    again = bed.cli("sync", bed.group)
    assert "joined the mirror" not in again.stderr
    assert "synchronous: its replicas are mirror legs" in again.stdout
    status = bed.cli("status", bed.group, "--json")
    assert '"in sync"' in status.stdout


def test_failed_leg_goes_asynchronous_and_rejoins_after_catching_up_by_era(
    bed: Bed,
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    bed.add_device("sb", origin_mib=16)
    replica = make_loop("sb-replica", 16 * MiB)
    leg = make_dm("leg", f"0 {SECTORS_16M} linear {replica} 0")
    cleanup.callback(bed.teardown)  # the stack goes before the device under its leg
    bed.add_site("dr", replicas={"sb": leg}, policy="synchronous")
    bed.cli("up")
    gate = "/dev/mapper/sb"
    assert "joined the mirror" in bed.cli("sync", bed.group).stderr
    write_direct(gate, 0, os.urandom(BLOCK))  # block 0, through the mirror
    reload(runner, leg.removeprefix("/dev/mapper/"), f"0 {SECTORS_16M} error\n")
    changed_blocks = {0}
    for block in (3, 7, 8, 100):  # the application's writes succeed on the origin
        write_direct(gate, block * BLOCK, os.urandom(BLOCK))
        changed_blocks.add(block)
    mirror = runner.run(dm.status("sb-mirror")).stdout
    assert " D" in mirror.split(" 1 ", 1)[-1] or "DA" in mirror or "AD" in mirror, mirror
    reload(runner, leg.removeprefix("/dev/mapper/"), f"0 {SECTORS_16M} linear {replica} 0\n")
    counters = write_counters(replica)
    assert counters is not None
    caught_up = bed.cli("sync", bed.group)
    after = write_counters(replica)
    assert after is not None
    written = (after.sectors - counters.sectors) * 512
    print(
        f"catch-up wrote {written} bytes to the replica for {len(changed_blocks)} changed "
        f"blocks of {BLOCK} bytes"
    )
    assert "left the mirror" in caught_up.stderr, caught_up.stderr
    assert "joined the mirror" in caught_up.stderr, caught_up.stderr
    assert written == len(changed_blocks) * BLOCK
    assert read_all(replica) == read_all(gate)
    table = runner.run(dm.table("sb-mirror")).stdout
    assert table.startswith(f"0 {SECTORS_16M} mirror core 2 ") and " nosync " in table, table
    write_direct(gate, 50 * BLOCK, os.urandom(BLOCK))
    assert read_all(replica) == read_all(gate)
