"""Benchmark: catch-up after 1 % changed, against a full-device hash compare, by device size.

    .venv/bin/python -m bench.catchup [--sizes 16,64,256,1024] [--json PATH]

For each origin size (MiB; a loop-file origin, 64 KiB era blocks, a blockdev site on
another loop device), once with the origin filled with data and once left sparse, the
test VM seeds the site with a first sync, times an empty
sync (the cycle's fixed cost), primes a second replica by a full hash compare, rewrites
1 % of the era blocks at random, then times a whole `dmrepl sync` (in-process,
`dmrepl.replication.cycle.sync`) and the full hash compare onto the second replica
(`bench.replication.hash_compare_copy`: both devices read in 1 MiB chunks, blake2b,
differing chunks written, fsync). Page caches are dropped before each timed step. The
two are measured side by side at every size, so the table shows where a full compare
would win: the crossover size, interpolated between the sizes measured.

Before anything is timed the guest's memory is touched once (`bench.replication.warm_memory`):
user-mode Linux backs guest RAM with a host file, and a step that used a guest page for the
first time paid a host page fault for it (without this, one run's 1 GiB sparse catch-up took
0.70 s against 0.19 s in the run before).

A filled origin is what a real device is: the compare reads every byte of both. A sparse
one is kind to the compare (reading a hole costs no I/O, and the replicas stay mostly
holes), so it is shown as well, for the record.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.replication import (
    DEVICE,
    ERA_BLOCK,
    GROUP,
    MiB,
    loops,
    same_content,
    scattered_blocks,
    timed_compare,
    timed_sync,
    warm_memory,
    write_runs,
)
from bench.vmrun import run_guest_half
from dmrepl.executor import Runner
from dmrepl.sizing import metadata_size

RESULTS_FILE = "catchup.json"
DEFAULT_SIZES_MIB = (16, 64, 256, 1024)
CHANGED = 0.01


def fill(path: str, size: int) -> None:
    """Write data over the whole device: one random MiB, each copy stamped with its offset."""
    pattern = bytearray(os.urandom(MiB))
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, size, MiB):
            pattern[:8] = offset.to_bytes(8, "little")
            os.pwrite(fd, pattern, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def measure_size(
    runner: Runner, workdir: Path, size: int, filled: bool, say: Any
) -> dict[str, Any]:
    """Seed, empty sync, then catch-up and hash compare after 1 % changed, at one size."""
    from tests.kernel.stacks import Bed  # the kernel tests' config-over-loop-devices helper

    rng = random.Random(20261202 + size)
    with loops(runner, workdir) as make_loop:
        bed = Bed(workdir, runner, make_loop, group=GROUP)
        try:
            meta = max(4 * MiB, metadata_size(size // 512, ERA_BLOCK // 512).required_sectors * 512)
            bed.add_device(
                DEVICE,
                origin_mib=size // MiB,
                metadata=make_loop(f"{DEVICE}-meta-sized", -(-meta // MiB) * MiB),
            )
            replica = bed.add_site("dr")[DEVICE]
            bed.cli("up")
            gate, config = f"/dev/mapper/{DEVICE}", bed.config
            if filled:
                fill(gate, size)
            timed_sync(runner, config, replica, say, target_zeroed=True)  # the seed
            empty = timed_sync(runner, config, replica, say)
            baseline = make_loop("baseline-replica", size)
            timed_compare(gate, baseline)  # prime: the baseline starts equal too
            blocks = scattered_blocks(rng, size, CHANGED)
            write_runs(gate, blocks)
            say(f"{size // MiB} MiB: {len(blocks)} era blocks changed")
            catchup = timed_sync(runner, config, replica, say)
            compare = timed_compare(gate, baseline)
            return {
                "origin_bytes": size,
                "filled": filled,
                "changed_blocks": len(blocks),
                "empty_s": empty["seconds"],
                "sync_s": catchup["seconds"],
                "capture_s": catchup["capture_s"],
                "ship_s": catchup["ship_s"],
                "compare_s": compare["seconds"],
                "changed_as_expected": catchup["changed_bytes"] == len(blocks) * ERA_BLOCK,
                "replicas_equal": same_content(gate, replica, size)
                and same_content(gate, baseline, size),
            }
        finally:
            bed.teardown()


def run_guest(out: Path, sizes_mib: list[int]) -> int:
    runner = Runner(timeout_s=900)
    payload: dict[str, Any] = {"kernel": os.uname().release, "points": []}

    def say(text: str) -> None:
        print(text, flush=True)

    say("warming the guest's memory")
    payload["warmed_bytes"] = warm_memory()
    for filled in (True, False):
        for size_mib in sizes_mib:
            workdir = Path(tempfile.mkdtemp(prefix="dmrepl-catchup-", dir="/tmp"))
            point = measure_size(runner, workdir, size_mib * MiB, filled, say)
            payload["points"].append(point)
            (out / RESULTS_FILE).write_text(json.dumps(payload, indent=1))
    return 0


def crossover_mib(points: list[dict[str, Any]]) -> str:
    """Where the compare's time meets the sync's, interpolated linearly between sizes."""
    ratios = [(p["origin_bytes"] / MiB, p["compare_s"] / p["sync_s"]) for p in points]
    if all(r >= 1 for _, r in ratios):
        return f"below {ratios[0][0]:.0f} MiB (the smallest size measured)"
    for (size_a, ratio_a), (size_b, ratio_b) in itertools.pairwise(ratios):
        if ratio_a < 1 <= ratio_b:
            at = size_a + (1 - ratio_a) * (size_b - size_a) / (ratio_b - ratio_a)
            return f"about {at:.0f} MiB (between {size_a:.0f} and {size_b:.0f} MiB)"
    return f"above {ratios[-1][0]:.0f} MiB (the largest size measured)"


def render_table(payload: dict[str, Any]) -> str:
    lines = [
        "| device | data | era blocks changed | empty sync | catch-up `sync` (capture / ship)"
        " | full hash compare | compare ÷ sync |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    points = payload["points"]
    for p in points:
        data = "filled" if p["filled"] else "sparse"
        lines.append(
            f"| {p['origin_bytes'] // MiB} MiB | {data} | {p['changed_blocks']}"
            f" | {p['empty_s']:.2f} s"
            f" | {p['sync_s']:.2f} s ({p['capture_s'] or 0:.2f} / {p['ship_s'] or 0:.2f})"
            f" | {p['compare_s']:.2f} s | **{p['compare_s'] / p['sync_s']:.1f}x** |"
        )
    checks = all(p["changed_as_expected"] and p["replicas_equal"] for p in points)
    crossovers = "; ".join(
        f"{kind} {crossover_mib(chosen)}"
        for kind, chosen in (
            ("filled", [p for p in points if p["filled"]]),
            ("sparse", [p for p in points if not p["filled"]]),
        )
        if chosen
    )
    return "\n".join(lines) + (
        f"\n\ncrossover (a full compare wins below): {crossovers}.\n"
        f"changed bytes as expected and every replica equal to the gate: {checks}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.catchup", description=__doc__)
    parser.add_argument(
        "--sizes",
        default=",".join(map(str, DEFAULT_SIZES_MIB)),
        help="origin sizes in MiB, comma-separated, ascending (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the table of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    if args.guest:
        return run_guest(args.guest, sizes)
    if args.render:
        print(render_table(json.loads(args.render.read_text())))
        return 0
    # The loop files live in the guest's /tmp, a tmpfs of half its RAM: a filled device, its
    # replica, the site's journal, the baseline's replica and the seed's full image need
    # about 5x the largest size there.
    os.environ.setdefault("DMREPL_VM_MEMORY", f"{max(3, 10 * sizes[-1] // 1024 + 2)}G")
    run = run_guest_half("bench.catchup", f" --sizes {args.sizes}", RESULTS_FILE, args.json)
    if run.payload is None or not run.payload["points"]:
        return 1
    print(f"\nkernel {run.payload['kernel']}, {run.seconds:.0f} s in all\n")
    print(render_table(run.payload))
    return run.code


if __name__ == "__main__":
    sys.exit(main())
