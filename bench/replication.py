"""Benchmark: what a replication cycle costs next to plain copy tools, on the real kernel.

    .venv/bin/python -m bench.replication [--quick | --scale] [--json PATH]

One group of one device (a sparse loop-file origin, 64 KiB era blocks) with a
blockdev site on another loop device, seeded by a first sync. Measured side by
side in one VM run:

1. Ship throughput vs dd: 10 % of the device is rewritten in scattered 1-2 MiB
   runs (aligned to era blocks, so the changed bytes are exactly the bytes
   written); `dmrepl.replication.cycle.sync` is timed in-process, split by the cycle's
   phase marks (dmrepl.phases) into capture and ship; then the same ranges are
   copied from the gate to the replica by one `dd` per range and, separately,
   by a single Python pread/pwrite loop in 1 MiB pieces (both fsync at the end).
   The sync and the loop are repeated with new data in the same ranges
   (`Plan.rounds`); the data path ÷ loop ratio (issue 20, goal 5) is the median of
   the rounds' ratios.
2. Write amplification: sectors written to the replica's loop device
   (/sys/block/loopN/stat, field 7) during the sync, over
   `SyncResult.changed_bytes` (the change at era-block granularity).
3. Catch-up after 1 % of the era blocks change: a whole `dmrepl sync` against a
   full-device hash comparison onto a second replica. No packaged tool fits:
   Debian has no `bdsync` package, and PyPI's `blocksync` 3.0.1 local-to-local
   path writes each differing block into the *source* (and needs paramiko), so
   the baseline is this module's own implementation of the same algorithm
   (`hash_compare_copy`): read both devices fully in 1 MiB chunks, hash each
   chunk with blake2b, write the chunks whose hashes differ.

Page caches are dropped before every timed step. Before any of them the guest's
memory is touched once (`warm_memory`): user-mode Linux backs guest RAM with a
host file, so the first use of each guest page costs a host page fault, and
whichever step ran first paid for it (the sync, before its baselines). For the
same reason the replica's backing file is allocated where a round's runs go
before it is timed (tmpfs allocates and zeroes a page on its first write, which
only the first writer would pay). The host side boots the VM
(dmrepl.vm.run_in_vm), which runs this module with `--guest DIR` and writes one
JSON file into DIR; the host then prints a Markdown table (docs/replication.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vmrun import run_guest_half
from dmrepl import loop, phases
from dmrepl.config import load_config
from dmrepl.executor import Runner
from dmrepl.replication import cycle
from dmrepl.sizing import metadata_size

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
ERA_BLOCK = 64 * KiB
CHUNK = MiB
RESULTS_FILE = "replication.json"
GROUP = "bench"
DEVICE = "bv"


@dataclass(frozen=True)
class Plan:
    origin_bytes: int
    ship_fraction: float  # part of the device rewritten for the throughput run
    catchup_fraction: float  # part of the era blocks rewritten for the catch-up run
    rounds: int = 5  # ship rounds (sync, then the loop, on new data); dd runs in the first


FULL = Plan(origin_bytes=1 * GiB, ship_fraction=0.10, catchup_fraction=0.01)
QUICK = Plan(origin_bytes=256 * MiB, ship_fraction=0.10, catchup_fraction=0.01)
# Catch-up only, on a larger device: the hash compare grows with the device, a sync does not.
SCALE = Plan(origin_bytes=4 * GiB, ship_fraction=0.0, catchup_fraction=0.01)


# -- the baseline: a full-device hash comparison (the bdsync / blocksync algorithm, locally)


@dataclass
class CompareStats:
    compared: int = 0
    written: int = 0


def hash_compare_copy(source: str, target: str) -> CompareStats:
    """Make `target` equal `source`: hash both in 1 MiB chunks, write chunks that differ."""
    stats = CompareStats()
    src = os.open(source, os.O_RDONLY)
    dst = os.open(target, os.O_RDWR)
    try:
        length = os.lseek(src, 0, os.SEEK_END)
        offset = 0
        while offset < length:
            data = os.pread(src, min(CHUNK, length - offset), offset)
            theirs = os.pread(dst, len(data), offset)
            if hashlib.blake2b(data).digest() != hashlib.blake2b(theirs).digest():
                _write_all(dst, data, offset)
                stats.written += len(data)
            stats.compared += len(data)
            offset += len(data)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return stats


def _write_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


# -- guest helpers


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_memory(margin: int = 256 * MiB) -> int:
    """Touch all but `margin` of the guest's available memory once, then free it; returns
    the bytes touched. See the module docstring: guest pages used for the first time cost
    a host page fault each, and would be charged to whichever step ran first."""
    available = next(
        int(line.split()[1]) * KiB
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemAvailable:")
    )
    size = max(0, available - margin) // MiB * MiB
    if size:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
        mmap.mmap(-1, size, flags=flags).close()
    return size


def allocate_runs(backing: Path, runs: list[tuple[int, int]]) -> None:
    """Allocate a loop device's backing file where `runs` go (see the module docstring)."""
    fd = os.open(backing, os.O_RDWR)
    try:
        for offset, size in runs:
            os.posix_fallocate(fd, offset, size)
    finally:
        os.close(fd)


def sectors_written(device: str) -> int:
    """Field 7 of /sys/block/<dev>/stat: sectors written to a whole block device."""
    stat = Path("/sys/block") / Path(device).name / "stat"
    return int(stat.read_text().split()[6])


def scattered_runs(rng: random.Random, length: int, fraction: float) -> list[tuple[int, int]]:
    """Non-adjacent (offset, length) runs of 1-2 MiB, era-block aligned, covering ~`fraction`."""
    per_run = 3 * MiB // 2
    count = max(1, round(length * fraction / per_run))
    slot = length // count // ERA_BLOCK * ERA_BLOCK
    runs = []
    for index in range(count):
        size = rng.randrange(MiB // ERA_BLOCK, 2 * MiB // ERA_BLOCK + 1) * ERA_BLOCK
        room = (slot - size - ERA_BLOCK) // ERA_BLOCK  # keep a gap so runs never touch
        runs.append((index * slot + rng.randrange(0, room + 1) * ERA_BLOCK, size))
    return runs


def scattered_blocks(rng: random.Random, length: int, fraction: float) -> list[tuple[int, int]]:
    """`fraction` of the era blocks, chosen at random, as (offset, length) runs of one block."""
    blocks = length // ERA_BLOCK
    chosen = sorted(rng.sample(range(blocks), max(1, round(blocks * fraction))))
    return [(block * ERA_BLOCK, ERA_BLOCK) for block in chosen]


def write_runs(path: str, runs: list[tuple[int, int]]) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, size in runs:
            _write_all(fd, os.urandom(size), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def same_content(a: str, b: str, length: int) -> bool:
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        return all(
            os.pread(fa, CHUNK, offset) == os.pread(fb, CHUNK, offset)
            for offset in range(0, length, CHUNK)
        )
    finally:
        os.close(fa)
        os.close(fb)


class PhaseClock:
    """First and last time each dmrepl.phases mark was reached during one sync."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def __call__(self, phase: str) -> None:
        if phase == "apply" and phase in self.first:
            return  # reached once per record; a clock read is a system call in the guest
        now = time.monotonic()
        self.first.setdefault(phase, now)
        self.last[phase] = now


def timed_sync(
    runner: Runner, config_path: Path, replica: str, say: Callable[[str], None], **kwargs: Any
) -> dict[str, Any]:
    """One dmrepl.replication.cycle.sync with its phase split and the replica's sectors written."""
    config = load_config(config_path)
    clock = PhaseClock()
    messages: list[str] = []

    def note(text: str) -> None:
        messages.append(text)
        say(f"  dmrepl: {text}")

    drop_caches()
    before = sectors_written(replica)
    phases.set_hook(clock)
    started = time.monotonic()
    try:
        result = cycle.sync(runner, config, GROUP, say=note, **kwargs)
    finally:
        phases.set_hook(None)
    ended = time.monotonic()
    written = (sectors_written(replica) - before) * 512
    (site,) = result.sites
    if site.state != "in sync":
        raise RuntimeError(f"site {site.site} is {site.state}: {site.detail}")

    def span(a: str, b: str, first_b: bool = True) -> float | None:
        if a not in clock.first or b not in clock.first:
            return None
        end = clock.first[b] if first_b else clock.last[b]
        return round(end - clock.first[a], 3)

    ship_start = clock.first.get("journal-write")
    return {
        "seconds": round(ended - started, 3),
        "capture_s": span("capture", "captured"),
        "ship_s": None if ship_start is None else round(clock.first["applied"] - ship_start, 3),
        "journal_stage_s": span("journal-write", "journal-committed"),
        "apply_s": span("journal-committed", "applied"),
        "apply_writes_s": span("apply", "applied"),
        "after_ship_s": None
        if "cursor" not in clock.last
        else round(ended - clock.last["cursor"], 3),
        "changed_bytes": result.changed_bytes,
        "spooled_bytes": result.spooled_bytes,
        "delivered_bytes": sum(d.data_bytes for d in site.delivered),
        "replica_bytes_written": written,
        "stall_s": result.cut.stall_s,
        "messages": messages,
    }


def dd_copy(source: str, target: str, runs: list[tuple[int, int]]) -> dict[str, Any]:
    """One `dd` per range (1 MiB blocks, byte offsets), then one fsync of the target."""
    before = sectors_written(target)
    started = time.monotonic()
    for offset, size in runs:
        subprocess.run(
            ["dd", f"if={source}", f"of={target}", f"bs={CHUNK}", f"skip={offset}",
             f"seek={offset}", f"count={size}", "iflag=skip_bytes,count_bytes",
             "oflag=seek_bytes", "conv=notrunc", "status=none"],
            check=True,
        )  # fmt: skip
    fd = os.open(target, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.monotonic() - started
    return {
        "seconds": round(seconds, 3),
        "replica_bytes_written": (sectors_written(target) - before) * 512,
    }


def dd_startup_seconds() -> float:
    """What one `dd` process costs with nothing to copy (median of three)."""
    times = []
    for _ in range(3):
        started = time.monotonic()
        subprocess.run(["dd", "if=/dev/zero", "of=/dev/null", "count=0", "status=none"], check=True)
        times.append(time.monotonic() - started)
    return round(sorted(times)[1], 3)


def python_copy(source: str, target: str, runs: list[tuple[int, int]]) -> dict[str, Any]:
    """The same ranges by pread/pwrite in 1 MiB pieces in this process, one fsync at the end."""
    before = sectors_written(target)
    started = time.monotonic()
    src, dst = os.open(source, os.O_RDONLY), os.open(target, os.O_WRONLY)
    try:
        for offset, size in runs:
            for piece in range(offset, offset + size, CHUNK):
                _write_all(dst, os.pread(src, min(CHUNK, offset + size - piece), piece), piece)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)
    return {
        "seconds": round(time.monotonic() - started, 3),
        "replica_bytes_written": (sectors_written(target) - before) * 512,
    }


def timed_compare(source: str, target: str) -> dict[str, Any]:
    drop_caches()
    before = sectors_written(target)
    started = time.monotonic()
    stats = hash_compare_copy(source, target)
    return {
        "seconds": round(time.monotonic() - started, 3),
        "compared_bytes": stats.compared,
        "written_bytes": stats.written,
        "replica_bytes_written": (sectors_written(target) - before) * 512,
    }


def measure_ship(
    runner: Runner,
    config: Path,
    gate: str,
    replica: tuple[str, Path],
    size: int,
    rng: random.Random,
    plan: Plan,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Part 1: scattered runs shipped by one sync, then copied by dd (first round only) and
    by a Python loop; `plan.rounds` rounds rewriting the same ranges. `replica`: (device,
    its loop file)."""
    device, backing = replica
    runs = scattered_runs(rng, size, plan.ship_fraction)
    allocate_runs(backing, runs)
    rounds = []
    for number in range(1, plan.rounds + 1):
        write_runs(gate, runs)  # new data each round, in the same ranges (memory stays flat)
        expected = sum(length for _, length in runs)
        say(f"ship round {number}: {len(runs)} runs, {expected} bytes changed; dmrepl sync")
        ship = timed_sync(runner, config, device, say)
        ship["runs"] = len(runs)
        ship["expected_changed_bytes"] = expected
        ship["replica_matches"] = same_content(gate, device, size)
        result: dict[str, Any] = {"ship": ship}
        if number == 1:
            say("ship: the same ranges by dd, one process per range")
            drop_caches()
            result["dd"] = dd_copy(gate, device, runs)
            result["dd"]["startup_s"] = dd_startup_seconds()
        say("ship: the same ranges by a Python pread/pwrite loop")
        drop_caches()
        result["pycopy"] = python_copy(gate, device, runs)
        rounds.append(result)
    first = rounds[0]
    return {"ship": first["ship"], "dd": first["dd"], "pycopy": first["pycopy"], "rounds": rounds}


def data_path_s(ship: dict[str, Any]) -> float:
    """Everything that moves the bytes: the capture and the ship (journal, apply)."""
    return float((ship["capture_s"] or 0) + (ship["ship_s"] or 0))


@contextmanager
def loops(runner: Runner, workdir: Path) -> Iterator[Callable[[str, int], str]]:
    """make_loop(name, size) on sparse files in `workdir`; all detached at the end."""
    with ExitStack() as stack:

        def make(name: str, size_bytes: int) -> str:
            path = workdir / f"{name}.img"
            loop.create_sparse_file(path, size_bytes)
            device = loop.attach(runner, path)
            stack.callback(runner.run_best_effort, loop.detach(device))
            return device

        yield make


def run_guest(out: Path, plan: Plan) -> int:
    from tests.kernel.stacks import Bed  # the kernel tests' config-over-loop-devices helper

    runner = Runner(timeout_s=900)
    workdir = Path(tempfile.mkdtemp(prefix="dmrepl-bench-", dir="/tmp"))
    rng = random.Random(20260101)
    size = plan.origin_bytes
    payload: dict[str, Any] = {
        "kernel": os.uname().release,
        "origin_bytes": size,
        "era_block_bytes": ERA_BLOCK,
    }
    results = out / RESULTS_FILE

    def say(text: str) -> None:
        print(text, flush=True)

    def save() -> None:
        results.write_text(json.dumps(payload, indent=1))

    with loops(runner, workdir) as make_loop, ExitStack() as teardown:
        bed = Bed(workdir, runner, make_loop, group=GROUP)
        teardown.callback(bed.teardown)
        meta_bytes = max(
            4 * MiB, metadata_size(size // 512, ERA_BLOCK // 512).required_sectors * 512
        )
        bed.add_device(
            DEVICE,
            origin_mib=size // MiB,
            metadata=make_loop(f"{DEVICE}-meta-sized", -(-meta_bytes // MiB) * MiB),
        )
        replica = bed.add_site("dr")[DEVICE]
        backing = workdir / f"dr-{DEVICE}-replica.img"  # Bed's name for the site's loop file
        bed.cli("up")
        say("warming the guest's memory")
        payload["warmed_bytes"] = warm_memory()
        gate = f"/dev/mapper/{DEVICE}"
        config = bed.config

        say("seed: first sync onto the empty replica")
        payload["seed"] = timed_sync(runner, config, replica, say, target_zeroed=True)
        save()

        say("empty sync: nothing changed")
        payload["empty"] = timed_sync(runner, config, replica, say)
        save()

        if plan.ship_fraction:
            payload.update(
                measure_ship(runner, config, gate, (replica, backing), size, rng, plan, say)
            )
            save()

        say("catch-up: prime a second replica for the full-compare baseline")
        baseline_replica = make_loop("baseline-replica", size)
        payload["compare_prime"] = timed_compare(gate, baseline_replica)
        save()

        blocks = scattered_blocks(rng, size, plan.catchup_fraction)
        write_runs(gate, blocks)
        say(f"catch-up: {len(blocks)} era blocks changed; dmrepl sync")
        catchup = timed_sync(runner, config, replica, say)
        catchup["expected_changed_bytes"] = len(blocks) * ERA_BLOCK
        catchup["replica_matches"] = same_content(gate, replica, size)
        payload["catchup"] = catchup
        save()
        say("catch-up: full-device hash comparison")
        compare = timed_compare(gate, baseline_replica)
        compare["replica_matches"] = same_content(gate, baseline_replica, size)
        payload["compare"] = compare
        save()
    say("done")
    return 0


# -- host side


def _mib_s(nbytes: int, seconds: float | None) -> str:
    if not seconds:
        return "-"
    return f"{nbytes / MiB / seconds:.1f} MiB/s"


def _s(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


Row = tuple[str, str, str, str]


def render_table(payload: dict[str, Any]) -> str:
    size = payload["origin_bytes"]
    rows: list[Row] = [
        ("device; era block", f"{size // MiB} MiB; {payload['era_block_bytes'] // KiB} KiB", "", "")
    ]
    checks = []
    if "ship" in payload:
        rows += _ship_rows(payload)
        ship = payload["ship"]
        checks.append(f"ship {ship['changed_bytes'] == ship['expected_changed_bytes']}")
    rows += _catchup_rows(payload)
    catchup, compare = payload["catchup"], payload["compare"]
    checks.append(f"catch-up {catchup['changed_bytes'] == catchup['expected_changed_bytes']}")
    dmrepl_equal = catchup["replica_matches"] and payload.get("ship", {}).get(
        "replica_matches", True
    )
    lines = [
        "| measurement | dmrepl | baseline | baseline time ÷ dmrepl time |",
        "|---|---:|---:|---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + (
        f"\n\nchanged bytes as expected: {', '.join(checks)};"
        f" replicas equal the gate: dmrepl {dmrepl_equal}, baseline {compare['replica_matches']}"
    )


def _ratio(baseline: float, ours: float | None) -> str:
    return f"{baseline / ours:.2f}x" if ours else "-"


def _ship_rows(payload: dict[str, Any]) -> list[Row]:
    ship, dd, py, empty = payload["ship"], payload["dd"], payload["pycopy"], payload["empty"]
    moved = ship["changed_bytes"]
    dd_net = dd["seconds"] - ship["runs"] * dd["startup_s"]
    data_path = data_path_s(ship)
    return [
        (
            f"1. ship {moved / MiB:.0f} MiB in {ship['runs']} runs: data path"
            " (capture + journal + apply)",
            f"{_s(data_path)} ({_mib_s(moved, data_path)})",
            f"dd, one per range: {_s(dd['seconds'])} ({_mib_s(moved, dd['seconds'])})",
            _ratio(dd["seconds"], data_path),
        ),
        (
            "   same, against dd without its process start-up",
            "",
            f"{_s(dd_net)} ({ship['runs']} x {dd['startup_s']:.2f} s taken off)",
            _ratio(dd_net, data_path),
        ),
        (
            "   same, against a Python pread/pwrite loop",
            "",
            f"{_s(py['seconds'])} ({_mib_s(moved, py['seconds'])})",
            _ratio(py["seconds"], data_path),
        ),
        _goal_row(payload),
        (
            "   whole `sync` (cut + data path + bookkeeping)",
            f"{_s(ship['seconds'])} ({_mib_s(moved, ship['seconds'])})",
            f"dd: {_s(dd['seconds'])}",
            _ratio(dd["seconds"], ship["seconds"]),
        ),
        (
            "   capture / journal stage + verify / apply; empty sync (fixed cost)",
            f"{_s(ship['capture_s'])} / {_s(ship['journal_stage_s'])} / {_s(ship['apply_s'])};"
            f" {_s(empty['seconds'])}",
            "",
            "",
        ),
        (
            "2. write amplification at the replica",
            f"{ship['replica_bytes_written'] / moved:.3f}"
            f" ({ship['replica_bytes_written']} / {moved} B)",
            f"dd: {dd['replica_bytes_written'] / moved:.3f}",
            "",
        ),
    ]


def _goal_row(payload: dict[str, Any]) -> Row:
    """Issue 20, goal 5: the data path against the one-copy loop, each round side by side
    (a round's sync and loop run back to back), as the median of the rounds' ratios."""
    rounds = payload.get("rounds") or [payload]  # results saved before rounds existed
    paths = [data_path_s(r["ship"]) for r in rounds]
    loops = [r["pycopy"]["seconds"] for r in rounds]
    ratios = [loop / path for loop, path in zip(loops, paths, strict=True) if path]
    each = ", ".join(f"{ratio:.2f}" for ratio in ratios)
    return (
        f"   **goal 5: data path vs the one-copy loop** (median of {len(rounds)} rounds;"
        " goal ≥ 0.60x)",
        f"{_s(statistics.median(paths))}",
        f"loop: {_s(statistics.median(loops))}",
        f"**{statistics.median(ratios):.2f}x** ({each})" if ratios else "-",
    )


def _catchup_rows(payload: dict[str, Any]) -> list[Row]:
    catchup, compare, empty = payload["catchup"], payload["compare"], payload["empty"]
    size = payload["origin_bytes"]
    return [
        (
            f"3. catch-up, {catchup['changed_bytes'] // ERA_BLOCK} era blocks"
            f" ({catchup['changed_bytes'] / size:.1%}) changed: whole `sync`",
            _s(catchup["seconds"]),
            f"full hash compare: {_s(compare['seconds'])}",
            f"{compare['seconds'] / catchup['seconds']:.1f}x",
        ),
        (
            "   catch-up capture / ship; empty sync (fixed cost)",
            f"{_s(catchup['capture_s'])} / {_s(catchup['ship_s'])}; {_s(empty['seconds'])}",
            f"wrote {compare['written_bytes'] / MiB:.0f} MiB of {size / MiB:.0f} MiB read twice",
            "",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replication", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a 256 MiB device instead of 1 GiB")
    size.add_argument(
        "--scale", action="store_true", help="catch-up only, on a 4 GiB device (no ship part)"
    )
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the table of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else SCALE if args.scale else FULL
    if args.guest:
        return run_guest(args.guest, plan)
    if args.render:
        print(render_table(json.loads(args.render.read_text())))
        return 0

    option = " --quick" if args.quick else " --scale" if args.scale else ""
    run = run_guest_half("bench.replication", option, RESULTS_FILE, args.json)
    if run.payload is None:
        return 1
    payload, code = run.payload, run.code
    print(f"\nkernel {payload['kernel']}, {run.seconds:.0f} s in all\n")
    if "compare" not in payload:
        print("incomplete run; raw results:\n" + json.dumps(payload, indent=1))
        return code or 1
    print(render_table(payload))
    return code


if __name__ == "__main__":
    sys.exit(main())
