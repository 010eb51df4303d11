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
Prints a Markdown table of the median time per command and its ratio to
`subprocess.run`, on this host and then in the test guest (user-mode Linux
unless DMREPL_VM=qemu), where every guest process's system calls are traced.
"""

from __future__ import annotations

import argparse
import json
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


def per_call_ms(ways: list[tuple[str, Callable[[], object]]], runs: int) -> list[float]:
    """Median milliseconds per call of each way over `runs` rounds (after one warm-up call).

    Every round calls each way once, in turn, so a busy host slows all of them alike.
    """
    times: list[list[float]] = [[] for _ in ways]
    for _, call in ways:
        call()
    for _ in range(runs):
        for spent, (_, call) in zip(times, ways, strict=True):
            started = time.perf_counter()
            call()
            spent.append(time.perf_counter() - started)
    return [statistics.median(spent) * 1000 for spent in times]


def measure(runs: int) -> list[tuple[str, float]]:
    """(way, median ms per command) for each way, side by side in this process."""
    true = sh.Command("true")
    runner = Runner()
    ways: list[tuple[str, Callable[[], object]]] = [
        ("subprocess.run", lambda: subprocess.run(["true"], check=True)),
        ("sh, plain", lambda: true(_return_cmd=True)),
        ("sh with _timeout=120", lambda: true(_return_cmd=True, _timeout=120)),
        ("dmrepl Runner.run", lambda: runner.run(probe("true"))),
    ]
    return list(zip((name for name, _ in ways), per_call_ms(ways, runs), strict=True))


def table(title: str, results: list[tuple[str, float]]) -> str:
    floor = results[0][1]
    lines = [f"{title}\n", "| way | ms per command | ÷ subprocess.run |", "|---|---:|---:|"]
    lines += [f"| {name} | {ms:.1f} | {ms / floor:.1f}x |" for name, ms in results]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="calls per way (default 100)")
    parser.add_argument("--host-only", action="store_true", help="do not measure in the guest")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.guest:
        (args.guest / RESULTS_FILE).write_text(json.dumps({"ways": measure(args.runs)}))
        return 0
    print(table(f"On this host: `true`, median of {args.runs} calls each", measure(args.runs)))
    if args.host_only:
        return 0
    run = run_guest_half("bench.commands", f" --runs {args.runs}", RESULTS_FILE, None)
    if run.payload is None:
        return 1
    guest = [(str(name), float(ms)) for name, ms in run.payload["ways"]]
    print(table(f"In the guest ({vm.describe()}): the same", guest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
