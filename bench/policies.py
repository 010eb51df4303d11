"""Benchmark: the write latency a synchronous site adds, and what joining the mirror costs.

    .venv/bin/python -m bench.policies [--quick] [--json PATH]

The guest half builds one group of one 64 MiB device (loop-file origin, 64 KiB era blocks)
with one synchronous `blockdev` site whose replica is a loop device behind a dm `linear`
leg (so the leg can be given a `delay` table to stand for a link's round trip). Measured
in one run, side by side on the same gate, with the page cache out of the way (O_DIRECT):

1. 4 KiB writes with O_DIRECT|O_DSYNC (each waits for its data on stable storage, as a
   database commit does), and 1 MiB O_DIRECT writes (throughput), at random offsets:
   - before the site joins (the mirror layer is a `linear` pass-through),
   - with the replica joined as a mirror leg, local (loop device),
   - with the leg behind `delay` 1 ms and 5 ms (a LAN and a metro link).
2. The first `sync`: seed (full image through the journal) and the join (a cut shipped
   while writers are held, then the mirror reloaded `nosync`): how long writers were held.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.replication import loops
from bench.vmrun import run_guest_half
from dmrepl import dm
from dmrepl.executor import Runner

KiB = 1024
MiB = 1024 * KiB
ORIGIN = 64 * MiB
RESULTS_FILE = "policies.json"


def timed_writes(path: str, size: int, count: int, flags: int, rng: random.Random) -> list[float]:
    """Seconds each of `count` writes of `size` bytes at random aligned offsets took."""
    buffer = mmap.mmap(-1, size)
    buffer.write(os.urandom(size))
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | flags)
    took = []
    try:
        for _ in range(count):
            offset = rng.randrange(0, ORIGIN // size) * size
            started = time.perf_counter()
            os.pwrite(fd, buffer, offset)
            took.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        buffer.close()
    return took


def summary(took: list[float], size: int) -> dict[str, float]:
    ordered = sorted(took)
    return {
        "median_ms": statistics.median(took) * 1000,
        "p99_ms": ordered[int(len(ordered) * 0.99) - 1] * 1000,
        "mb_per_s": size * len(took) / sum(took) / 1e6,
    }


def measure(path: str, count: int, rng: random.Random) -> dict[str, dict[str, float]]:
    return {
        "4k_dsync": summary(timed_writes(path, 4 * KiB, count, os.O_DSYNC, rng), 4 * KiB),
        "1m_direct": summary(timed_writes(path, MiB, max(count // 10, 8), 0, rng), MiB),
    }


def run_guest(out: Path, count: int) -> int:
    from tests.kernel.stacks import Bed  # the kernel tests' config-over-loop-devices helper

    runner = Runner(timeout_s=900)
    workdir = Path(tempfile.mkdtemp(prefix="dmrepl-bench-", dir="/tmp"))
    rng = random.Random(20261202)
    payload: dict[str, Any] = {"kernel": os.uname().release, "writes": count}
    sectors = ORIGIN // 512
    leg = "bench-sync-leg"
    with loops(runner, workdir) as make_loop:
        replica = make_loop("replica", ORIGIN)
        runner.run(dm.create(leg, f"0 {sectors} linear {replica} 0\n", f"{dm.UUID_PREFIX}b-{leg}"))
        bed = Bed(workdir, runner, make_loop, group="pbench")
        try:
            bed.add_device("pb", origin_mib=ORIGIN // MiB)
            bed.add_site("dr", replicas={"pb": dm.mapper_path(leg)}, policy="synchronous")
            bed.cli("up")
            gate = dm.mapper_path("pb")
            payload["pass_through"] = measure(gate, count, rng)
            started = time.monotonic()
            first = bed.cli("sync", bed.group)
            payload["first_sync_s"] = time.monotonic() - started
            held = [line for line in first.stderr.splitlines() if line.startswith("writers held")]
            payload["join_writers_held_ms"] = float(held[-1].split()[2]) if held else None
            payload["joined"] = measure(gate, count, rng)
            for delay_ms in (1, 5):
                table = f"0 {sectors} delay {replica} 0 {delay_ms}\n"
                runner.run(dm.load(leg, table))
                runner.run(dm.suspend(leg))
                runner.run(dm.resume(leg))
                payload[f"joined_delay_{delay_ms}ms"] = measure(gate, count, rng)
            payload["replica_matches"] = same(replica, gate)
        finally:
            bed.teardown()
            runner.run_best_effort(dm.remove(leg))
    (out / RESULTS_FILE).write_text(json.dumps(payload, indent=1))
    return 0


def same(a: str, b: str) -> bool:
    def read(path: str) -> bytes:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            return os.pread(fd, ORIGIN, 0)
        finally:
            os.close(fd)

    return read(a) == read(b)


def render(payload: dict[str, Any]) -> str:
    base = payload["pass_through"]
    lines = [
        f"{payload['writes']} writes of 4 KiB (O_DIRECT|O_DSYNC) and "
        f"{max(payload['writes'] // 10, 8)} of 1 MiB (O_DIRECT) at random offsets, per row",
        "",
        "| gate | 4 KiB median | 4 KiB p99 | added (median) | 1 MiB MB/s | vs pass-through |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in (
        ("pass_through", "no synchronous site (mirror layer linear)"),
        ("joined", "synchronous site, local replica leg"),
        ("joined_delay_1ms", "synchronous site, leg behind delay 1 ms"),
        ("joined_delay_5ms", "synchronous site, leg behind delay 5 ms"),
    ):
        row = payload[key]
        small, big = row["4k_dsync"], row["1m_direct"]
        lines.append(
            f"| {label} | {small['median_ms']:.2f} ms | {small['p99_ms']:.2f} ms | "
            f"+{small['median_ms'] - base['4k_dsync']['median_ms']:.2f} ms | "
            f"{big['mb_per_s']:.0f} | {big['mb_per_s'] / base['1m_direct']['mb_per_s']:.2f}x |"
        )
    lines += [
        "",
        f"first sync (seed 64 MiB + join): {payload['first_sync_s']:.1f} s; writers held "
        f"{payload['join_writers_held_ms']} ms for the join",
        f"replica equals the gate after the runs: {payload['replica_matches']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policies", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="100 writes a row instead of 1000")
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the table of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    count = 100 if args.quick else 1000
    if args.guest:
        return run_guest(args.guest, count)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    run = run_guest_half(
        "bench.policies", " --quick" if args.quick else "", RESULTS_FILE, args.json
    )
    if run.payload is None:
        return 1
    print(f"\nkernel {run.payload['kernel']}, {run.seconds:.0f} s in all\n")
    print(render(run.payload))
    return run.code


if __name__ == "__main__":
    sys.exit(main())
