"""Benchmark: what one external command costs through dmrepl's executor.

    .venv/bin/python -m bench.commands [--runs N]

A replication cycle runs about 16 short commands (dmsetup, losetup,
era_invalidate), six of them while writers are stalled, so the cost of
starting one is part of every cycle's fixed cost. Measured side by side in one
run, for `true`:

- `subprocess.run` (the floor: vfork + exec in C),
- `sh` called plainly (what the executor used before, and still streams with),
- `sh` with `_timeout` (what the executor used before: sh checks the timeout
  every 0.1 s and joins that thread when the command ends),
- `dmrepl.executor.Runner.run` (today: `subprocess`, vfork + exec).

The ways take turns, one call each per round, so a busy host slows them alike.
The `sh` ways run in an interpreter of their own, with their own
`subprocess.run` floor: sh forks the whole Python process, which leaves every
page of it shared copy-on-write with the child, so the next way to run in that
process pays a minor page fault for each page it writes (measured here: 171
for `Runner.run` right after an `sh` call, none otherwise). dmrepl never forks
itself during a cycle; billing those faults to the executor measured sh, not it.

Prints a Markdown table of the median time and minor page faults per command
and the time's ratio to `subprocess.run`, on this host and then in the test
guest (user-mode Linux unless DMREPL_VM=qemu), where every guest process's
system calls are traced.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import sh

from bench.vmrun import run_guest_half
from dmrepl import vm
from dmrepl.executor import Runner
from dmrepl.ops import probe

RESULTS_FILE = "commands.json"


Way = tuple[str, Callable[[], object]]
Measured = tuple[str, float, float]  # way, median ms per call, median minor page faults per call


def per_call(ways: list[Way], runs: int) -> list[Measured]:
    """Median milliseconds and minor page faults per call of each way over `runs` rounds.

    One warm-up call each first; then every round calls each way once, in turn,
    so a busy host slows all of them alike.
    """
    times: list[list[float]] = [[] for _ in ways]
    faults: list[list[int]] = [[] for _ in ways]
    for _, call in ways:
        call()
    for _ in range(runs):
        for spent, faulted, (_, call) in zip(times, faults, ways, strict=True):
            faults_before = _minor_faults()
            started = time.perf_counter()
            call()
            spent.append(time.perf_counter() - started)
            faulted.append(_minor_faults() - faults_before)
    return [
        (name, statistics.median(spent) * 1000, statistics.median(faulted))
        for (name, _), spent, faulted in zip(ways, times, faults, strict=True)
    ]


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _subprocess_run() -> object:
    return subprocess.run(["true"], check=True)


def measure_executor(runs: int) -> list[Measured]:
    """`subprocess.run` and `Runner.run`, side by side in this process (which never forks)."""
    runner = Runner()
    return per_call(
        [
            ("subprocess.run", _subprocess_run),
            ("dmrepl Runner.run", lambda: runner.run(probe("true"))),
        ],
        runs,
    )


def measure_sh(runs: int) -> list[Measured]:
    """`subprocess.run` and the two `sh` ways, side by side in this process."""
    true = sh.Command("true")
    return per_call(
        [
            ("subprocess.run (beside sh)", _subprocess_run),
            ("sh, plain", lambda: true(_return_cmd=True)),
            ("sh with _timeout=120", lambda: true(_return_cmd=True, _timeout=120)),
        ],
        runs,
    )


def measure(runs: int) -> list[Measured]:
    """Every way: the executor's here, then sh's in a fresh interpreter (sh forks its process)."""
    executor = measure_executor(runs)
    child = subprocess.run(
        [sys.executable, "-m", "bench.commands", "--runs", str(runs), "--sh-ways"],
        check=True,
        capture_output=True,
        text=True,
    )
    beside_sh = [
        (str(name), float(ms), float(faults)) for name, ms, faults in json.loads(child.stdout)
    ]
    return executor + beside_sh


def table(title: str, results: list[Measured]) -> str:
    """Markdown: time and faults per way; time as a multiple of the first way's (the floor)."""
    lines = [
        f"{title}\n",
        "| way | ms per command | ÷ subprocess.run | minor page faults per command |",
        "|---|---:|---:|---:|",
    ]
    floor = results[0][1]
    for name, ms, faults in results:
        lines.append(f"| {name} | {ms:.2f} | {ms / floor:.1f}x | {faults:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="calls per way (default 100)")
    parser.add_argument("--host-only", action="store_true", help="do not measure in the guest")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sh-ways", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sh_ways:
        print(json.dumps(measure_sh(args.runs)))
        return 0
    if args.guest:
        (args.guest / RESULTS_FILE).write_text(json.dumps({"ways": measure(args.runs)}))
        return 0
    print(table(f"On this host: `true`, median of {args.runs} calls each", measure(args.runs)))
    if args.host_only:
        return 0
    run = run_guest_half("bench.commands", f" --runs {args.runs}", RESULTS_FILE, None)
    if run.payload is None:
        return 1
    guest = [(str(name), float(ms), float(faults)) for name, ms, faults in run.payload["ways"]]
    print(table(f"In the guest ({vm.describe()}): the same", guest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
