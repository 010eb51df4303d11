"""Benchmark: what one external command costs through dmrepl's executor.

    .venv/bin/python -m bench.commands [--runs N]

A replication cycle runs about 16 short commands (dmsetup, losetup,
era_invalidate), six of them while writers are stalled, so the cost of
starting one is part of every cycle's fixed cost. Measured side by side in one
run, on this host (no kernel features needed), for `true`:

- `subprocess.run` (the floor: vfork + exec in C),
- `sh` called plainly (what the executor builds on),
- `sh` with `_timeout` (what the executor used before: sh checks the timeout
  every 0.1 s and joins that thread when the command ends),
- `dmrepl.executor.Runner.run` (today: a kill timer of its own).

Prints a Markdown table of the median time per command and its ratio to
`subprocess.run`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import sh

from dmrepl.executor import Runner, probe


def per_call_ms(call: Callable[[], object], runs: int) -> float:
    """Median milliseconds per call over `runs` calls (after one warm-up call)."""
    call()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__)
    parser.add_argument("--runs", type=int, default=40, help="calls per way (default 40)")
    args = parser.parse_args(argv)
    true = sh.Command("true")
    runner = Runner()
    ways: list[tuple[str, Callable[[], object]]] = [
        ("subprocess.run", lambda: subprocess.run(["true"], check=True)),
        ("sh, plain", lambda: true(_return_cmd=True)),
        ("sh with _timeout=120", lambda: true(_return_cmd=True, _timeout=120)),
        ("dmrepl Runner.run", lambda: runner.run(probe("true"))),
    ]
    results = [(name, per_call_ms(call, args.runs)) for name, call in ways]
    floor = results[0][1]
    print(f"`true`, median of {args.runs} calls each\n")
    print("| way | ms per command | ÷ subprocess.run |")
    print("|---|---:|---:|")
    for name, ms in results:
        print(f"| {name} | {ms:.1f} | {ms / floor:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
