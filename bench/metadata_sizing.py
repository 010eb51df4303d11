"""Benchmark: the smallest dm-era metadata device that survives the worst case, vs dmrepl's size.

    .venv/bin/python -m bench.metadata_sizing [--grid full|quick] [--pending N] [--json PATH]

For every grid point (era block size x origin size) the test VM runs the stress
of tests/kernel/erastress.py on an era device over a `zero` origin: first with
dmrepl's size (`metadata_size(...).required_sectors`), then with smaller and
larger metadata devices to find the smallest that survives, to one 4 KiB
block. The two published rules of thumb are judged against that
minimum. The host side boots the VM (dmrepl.vm.run_in_vm), which runs this
module with `--guest DIR` and writes one JSON record per grid point into DIR;
then the host prints a Markdown table (the one in docs/sizing.md).

How a minimum is found: the run at dmrepl's size passes and shows the highest
used count P the kernel reported. A device of fewer than P blocks cannot hold
P blocks (the space map never hands out more blocks than the device has), so
P - 1 blocks fail; from there the search steps up until a size passes, then
bisects. The largest failing size is confirmed by a run (so the kernel
needed exactly the minimum at some moment of the stress).
A published size below the smallest passing one is run where that is cheap
(to show how it fails); otherwise its verdict follows from the runs above.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vmrun import run_guest_half
from dmrepl.executor import Runner
from dmrepl.sizing import (
    DEFAULT_PENDING_WRITESETS,
    SECTORS_PER_METADATA_BLOCK,
    metadata_size,
    published_per_mille_bytes,
    published_regression_bytes,
)
from tests.kernel.erastress import scratch_devices, stress_era

MiB = 2048  # sectors
GiB = 1024 * MiB
TiB = 1024 * GiB

# Metadata depends on the number of era blocks only, so the points spread it
# (16 .. 2^20 era blocks) over era block sizes from 8 sectors (4 KiB) to 2^31
# sectors (1 TiB). 786433 era blocks of 4 KiB (a 3 GiB origin and one more
# block) is where an outside stress measured dmrepl's size at 1.73x its peak.
GRID_FULL: tuple[tuple[int, int], ...] = (
    (8192, 64 * MiB),  # 16 era blocks
    (2**31, 64 * TiB),  # 64 era blocks of 1 TiB
    (512, 64 * MiB),  # 256
    (2**21, 8 * TiB),  # 8192 era blocks of 1 GiB
    (8, 64 * MiB),  # 16384
    (128, 1600 * MiB),  # 25600
    (64, 2 * GiB),  # 65536
    (4096, 512 * GiB),  # 262144
    (8, 3 * GiB + 8),  # 786433
    (8192, 4 * TiB),  # 1048576
)
GRID_QUICK: tuple[tuple[int, int], ...] = ((8192, 64 * MiB), (8, 64 * MiB))
GRIDS = {"full": GRID_FULL, "quick": GRID_QUICK}

# Above this many era blocks a run takes minutes under qemu: published sizes
# below the minimum are then judged from other runs, and a failed run does not
# write every era block once more to see the EIO.
CHEAP_ERA_BLOCKS = 2**16
RESULTS_FILE = "metadata_sizing.json"
# Device names (and so dm UUIDs) unique over the whole run: a run whose metadata
# failed leaves its devices in the kernel (tests/kernel/erastress.py _abandon).
_TRIALS = itertools.count()


def _sectors_for_bytes(size: int) -> int:
    return -(-size // 512)


def _blocks(sectors: int) -> int:
    """4 KiB blocks dm-era uses on a device of `sectors` (the block manager rounds down)."""
    return sectors // SECTORS_PER_METADATA_BLOCK


@dataclass
class Search:
    """Smallest passing size, in metadata blocks, from trials that return pass/fail."""

    trial: Callable[[int], bool]
    results: dict[int, bool]

    def run(self, blocks: int) -> bool:
        if blocks not in self.results:
            self.results[blocks] = self.trial(blocks)
        return self.results[blocks]

    def minimum(self, passing: int, failing: int, *, verify_failing: bool) -> tuple[int, int]:
        """(largest failing, smallest passing), one block apart.

        `passing` has passed. `failing` is believed to fail: with
        `verify_failing` the final failing size is confirmed by a run (and the
        search goes lower if it passes), otherwise it is taken as known.
        """
        low, high = failing, passing
        while True:
            step = max(2, low // 128)
            while low + step < high:  # step up until a size passes ...
                if self.run(low + step):
                    high = low + step
                    break
                low += step
                step *= 2
            while high - low > 1:  # ... then bisect
                middle = (low + high) // 2
                if self.run(middle):
                    high = middle
                else:
                    low = middle
            if low <= 0 or not verify_failing or not self.run(low):
                return low, high
            high, low = low, max(0, low - max(2, low // 32))  # it passed: look lower


def measure_point(
    runner: Runner,
    workdir: Path,
    block_sectors: int,
    origin_sectors: int,
    say: Callable[[str], object],
    pending: int = DEFAULT_PENDING_WRITESETS,
) -> dict[str, Any]:
    """Stress one grid point at dmrepl's size, find the minimum, judge the published sizes.

    `pending` is how many messages in a row the stress sends where it archives
    writesets (erastress); dmrepl's size is always its default.
    """
    size = metadata_size(origin_sectors, block_sectors)
    runs: list[dict[str, Any]] = []
    cheap = size.era_blocks <= CHEAP_ERA_BLOCKS

    def trial_sectors(sectors: int) -> dict[str, Any]:
        prefix = f"ms{os.getpid()}-{next(_TRIALS)}-"
        with scratch_devices(runner, workdir, prefix) as (make_loop, make_dm):
            result = stress_era(
                runner,
                make_loop,
                make_dm,
                origin_sectors,
                block_sectors,
                sectors,
                pending_writesets=pending,
                probe_writes=cheap,
                say=say,
            )
        record = {
            "metadata_sectors": sectors,
            "blocks": _blocks(sectors),
            "ok": result.ok,
            "failed_step": result.failed_step,
            "error": result.error,
            "io_error": result.io_error,
            "write_errno": result.write_errno,
            "peak_used_blocks": result.peak_used_blocks,
            "idle_digest_used_blocks": result.idle_digest_used_blocks,
            "samples": result.samples,
            "step_seconds": result.step_seconds,
            "seconds": result.seconds,
        }
        runs.append(record)
        return record

    started = time.monotonic()
    first = trial_sectors(size.required_sectors)
    search = Search(
        trial=lambda blocks: bool(trial_sectors(blocks * SECTORS_PER_METADATA_BLOCK)["ok"]),
        results={size.worst_blocks: bool(first["ok"])},
    )
    peak = int(first["peak_used_blocks"])
    if first["ok"]:
        failing, passing = search.minimum(size.worst_blocks, peak - 1, verify_failing=True)
    else:  # dmrepl's size failed: find a passing size above it first
        passing = size.worst_blocks
        while not search.run(passing):
            passing = passing * 5 // 4 + 1
        failing, passing = search.minimum(passing, size.worst_blocks, verify_failing=False)

    formulas: dict[str, dict[str, Any]] = {}
    for name, nbytes in (
        ("regression", published_regression_bytes(origin_sectors)),
        ("per_mille", published_per_mille_bytes(origin_sectors)),
    ):
        blocks = _blocks(_sectors_for_bytes(nbytes))
        if blocks < passing and (cheap or blocks > failing):
            record = trial_sectors(_sectors_for_bytes(nbytes))
            verdict = {"ok": record["ok"], "how": "run", "failed_step": record["failed_step"]}
        elif blocks >= passing:
            verdict = {"ok": True, "how": "inferred: not smaller than a passing size"}
        else:
            verdict = {"ok": False, "how": "inferred: not larger than a failing size"}
        formulas[name] = {"bytes": nbytes, "blocks": blocks, **verdict}

    return {
        "block_sectors": block_sectors,
        "origin_sectors": origin_sectors,
        "era_blocks": size.era_blocks,
        "steady_blocks": size.steady_blocks,
        "dmrepl_blocks": size.worst_blocks,
        "dmrepl_ok": first["ok"],
        "dmrepl_rounded_blocks": _blocks(size.rounded_sectors()),
        "peak_used_blocks": peak,
        "idle_digest_used_blocks": first["idle_digest_used_blocks"],
        "minimum_blocks": passing,
        "largest_failing_blocks": failing,
        "largest_failing_verified": failing in search.results,
        "formulas": formulas,
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
    }


def run_guest(
    out: Path, grid: tuple[tuple[int, int], ...], pending: int = DEFAULT_PENDING_WRITESETS
) -> int:
    """Inside the VM: measure every grid point, rewriting the results file after each."""
    runner = Runner(timeout_s=900)
    workdir = Path(tempfile.mkdtemp(prefix="dmrepl-bench-", dir="/tmp"))
    points: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "kernel": os.uname().release,
        "pending_writesets": pending,
        "points": points,
    }

    def say(text: str) -> None:
        print(text, flush=True)

    for block_sectors, origin_sectors in grid:
        say(f"grid point: era block {block_sectors} sectors, origin {origin_sectors} sectors")
        points.append(measure_point(runner, workdir, block_sectors, origin_sectors, say, pending))
        (out / RESULTS_FILE).write_text(json.dumps(payload, indent=1))
    return 0


def _size(sectors: int) -> str:
    units = (("TiB", TiB), ("GiB", GiB), ("MiB", MiB))
    for unit, factor in units:
        if sectors >= factor and sectors % factor == 0:
            return f"{sectors // factor} {unit}"
    for unit, factor in units:
        if sectors >= factor:
            return f"{sectors // factor} {unit} + {sectors % factor} s"
    return f"{sectors} s"


def _bytes(sectors: int) -> str:
    """An exact size in the largest binary unit that divides it (era block sizes)."""
    size, unit = sectors * 512, "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if size % 1024:
            break
        size, unit = size // 1024, larger
    return f"{size} {unit}"


def _verdict(blocks: int, minimum: int, ok: object, inferred: bool = False) -> str:
    mark = "†" if inferred else ""
    return f"{blocks / minimum:.2f}{mark}" + ("" if ok else " **fails**")


def worst_status_peak(point: dict[str, Any]) -> int:
    """The highest used count any status showed in a run that survived."""
    return max(int(run["peak_used_blocks"]) for run in point["runs"] if run["ok"])


def render_table(payload: dict[str, Any]) -> str:
    """The Markdown table of docs/sizing.md (sizes in 4 KiB metadata blocks)."""
    lines = [
        "| era block | origin | era blocks | steady | peak | minimum | fails at | model"
        " | model ÷ peak | model ÷ min | provision | provision ÷ peak"
        " | regression ÷ min | per-mille ÷ min | runs | time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in payload["points"]:
        minimum = p["minimum_blocks"]
        peak = worst_status_peak(p)
        failing = f"{p['largest_failing_blocks']}" + ("" if p["largest_failing_verified"] else "*")
        provision = p["dmrepl_rounded_blocks"]
        cells = [
            f"{p['block_sectors']} s ({_bytes(p['block_sectors'])})",
            _size(p["origin_sectors"]),
            str(p["era_blocks"]),
            str(p["steady_blocks"]),
            str(peak),
            str(minimum),
            failing,
            str(p["dmrepl_blocks"]),
            _verdict(p["dmrepl_blocks"], peak, p["dmrepl_ok"]),
            _verdict(p["dmrepl_blocks"], minimum, p["dmrepl_ok"]),
            f"{provision} ({provision * SECTORS_PER_METADATA_BLOCK // MiB} MiB)",
            f"{provision / peak:.2f}",
        ]
        for name in ("regression", "per_mille"):
            form = p["formulas"][name]
            inferred = form["how"] != "run"
            cells.append(_verdict(form["blocks"], minimum, form["ok"], inferred))
        cells += [str(len(p["runs"])), f"{p['seconds'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metadata_sizing", description=__doc__)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument(
        "--pending",
        type=int,
        default=DEFAULT_PENDING_WRITESETS,
        help="archiving messages in a row in the stress (default: what dmrepl sizes for)",
    )
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the table of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    if args.guest:
        return run_guest(args.guest, grid, args.pending)
    if args.render:
        print(render_table(json.loads(args.render.read_text())))
        return 0

    options = f" --grid {args.grid} --pending {args.pending}"
    run = run_guest_half("bench.metadata_sizing", options, RESULTS_FILE, args.json)
    if run.payload is None:
        return 1
    payload, code = run.payload, run.code
    print(f"\nkernel {payload['kernel']}, {run.seconds:.0f} s in all\n")
    print(render_table(payload))
    return code


if __name__ == "__main__":
    sys.exit(main())
