"""Benchmark: the writers' stall of a cut, step by step, against its kernel operations alone.

    .venv/bin/python -m bench.stall [--rounds N] [--json PATH]

In the test guest, two devices get dmrepl's stack (over a `zero` origin, as in
`bench.cut_cost`) and a COW loop each, so a cut has its full stall: suspend both
gates, `take_metadata_snap` on both era devices, then per device suspend `-orig`,
load and resume `-pit`, resume `-orig`, and resume both gates. Three ways, one after
the other in every round so they share the guest's noise:

- `cut, dmsetup`: `held_cut` with every step a `dmsetup` process (as before),
- `cut, ioctl`: `held_cut` as dmrepl runs it (the stalled steps as ioctls),
- `kernel alone`: the same ioctls back to back and nothing else (the floor).

Idle, then with a writer issuing synchronous 4 KiB writes (O_DIRECT|O_DSYNC) to both
devices in turn; the longest of its writes that overlapped each way's stalls is reported
too (what an application sees). Prints the median stall
per way, its ratio to the kernel alone, and the median time of each step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.cut_cost import GiB, bench_stack
from bench.vmrun import run_guest_half
from dmrepl import dm, dmioctl, loop, vm
from dmrepl.cut import cut_steps, held_cut, step_label
from dmrepl.executor import Runner
from dmrepl.stack import StackSpec, pit_spec

RESULTS_FILE = "stall.json"
DEVICE_SECTORS = 1 * GiB
COW_BYTES = 64 << 20
WAYS = ("cut, dmsetup", "cut, ioctl", "kernel alone")

# Writes 4 KiB synchronously to each device in turn until the stop file appears, then prints
# how many it wrote and when each write longer than 1 ms began and how long it took.
WRITER = """
import json, mmap, os, sys, time
buf = mmap.mmap(-1, 4096)
fds = [os.open(p, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC) for p in sys.argv[2:]]
count, slow = 0, []
while not os.path.exists(sys.argv[1]):
    for fd in fds:
        started = time.monotonic()
        os.pwrite(fd, buf, (count % 1024) * 4096)
        took = time.monotonic() - started
        if took > 0.001:
            slow.append((started, took))
        count += 1
print(json.dumps({"writes": count, "slow": slow}))
"""


class DmsetupRunner(Runner):
    """Issues every step as a `dmsetup` process."""

    ioctls = False


def kernel_alone(
    runner: Runner, stacks: tuple[StackSpec, ...], cows: dict[str, str]
) -> tuple[float, float, list[tuple[str, float]]]:
    """The cut's stalled steps as bare ioctls back to back: (began, stall, [(step, s)]).

    The empty `-pit` devices are made before and everything is released after, untimed.
    """
    steps = cut_steps(stacks, cows)
    for step in steps:
        if not step.stalls:
            runner.run(step.op)
    requests = [
        (step_label(step.op), dmioctl.request_for(step.op)) for step in steps if step.stalls
    ]
    timings = []
    started = previous = time.monotonic()
    for label, request in requests:
        assert request is not None
        dmioctl.issue(request)
        now = time.monotonic()
        timings.append((label, now - previous))
        previous = now
    for step in reversed(steps):
        if step.release is not None:
            runner.run(step.release)
    return started, previous - started, timings


def one_round(
    stacks: tuple[StackSpec, ...], cows: dict[str, str], runner: Runner
) -> dict[str, Any]:
    """Each way once: its stall, its steps, and when it ran (CLOCK_MONOTONIC, as the writer's)."""
    found: dict[str, Any] = {}
    for way, issuer in (("cut, dmsetup", DmsetupRunner()), ("cut, ioctl", runner)):
        with held_cut(issuer, stacks, cow_for=lambda s: cows[s.device.name], say=_quiet) as held:
            window = (held.stalled_from, held.stalled_from + held.stall_s)
        found[way] = {"stall_s": held.stall_s, "steps": list(held.steps), "window": window}
    began, stall, timings = kernel_alone(runner, stacks, cows)
    window = (began, began + stall)
    found["kernel alone"] = {"stall_s": stall, "steps": timings, "window": window}
    return found


def _quiet(_: str) -> None:
    pass


def longest_write(found: dict[str, Any], way: str) -> float | None:
    """The longest of the writer's writes that overlapped one of `way`'s stalls (s)."""
    if "slow" not in found["writer"]:
        return None
    windows = [r[way]["window"] for r in found["rounds"]]
    overlapping = [
        took
        for began, took in found["writer"]["slow"]
        for low, high in windows
        if began < high and began + took > low
    ]
    return max(overlapping, default=0.0)


@contextmanager
def writer(paths: list[str], workdir: Path) -> Iterator[dict[str, Any]]:
    """A synchronous 4 KiB writer on `paths` while the body runs; yields what it reports."""
    stop = workdir / "stop-writer"
    stop.unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(stop), *paths], stdout=subprocess.PIPE, text=True
    )
    report: dict[str, Any] = {}
    try:
        time.sleep(0.5)
        yield report
    finally:
        stop.touch()
        out, _ = process.communicate(timeout=60)
        report.update(json.loads(out) if out.strip() else {})


def run_guest(out: Path, rounds: int) -> int:
    """Inside the VM: build two devices and measure every way, idle and under the writer."""
    runner = Runner(timeout_s=600)
    workdir = Path(tempfile.mkdtemp(prefix="dmrepl-bench-", dir="/tmp"))
    payload: dict[str, Any] = {"kernel": os.uname().release, "rounds": rounds, "modes": {}}
    with ExitStack() as undo:
        stacks = tuple(
            undo.enter_context(bench_stack(runner, workdir, f"st{os.getpid()}{n}", DEVICE_SECTORS))
            for n in "ab"
        )
        cows = {}
        for stack in stacks:
            path = workdir / f"{stack.device.name}.cow"
            loop.create_sparse_file(path, COW_BYTES)
            cows[stack.device.name] = loop.attach(runner, path)
            undo.callback(runner.run_best_effort, loop.detach(cows[stack.device.name]))
            undo.callback(_remove_pit, runner, stack, cows[stack.device.name])
        gates = [dm.mapper_path(stack.device.name) for stack in stacks]
        for mode in ("idle", "writer"):
            with writer(gates, workdir) if mode == "writer" else _nothing() as report:
                measured = [one_round(stacks, cows, runner) for _ in range(rounds)]
            payload["modes"][mode] = {"rounds": measured, "writer": report}
            print(f"{mode}: {summary_line(measured)}", flush=True)
    (out / RESULTS_FILE).write_text(json.dumps(payload, indent=1))
    return 0


@contextmanager
def _nothing() -> Iterator[dict[str, Any]]:
    yield {}


def _remove_pit(runner: Runner, stack: StackSpec, cow: str) -> None:
    """A `-pit` left by a failed round (normally released already)."""
    name = pit_spec(stack, cow).name
    if name in {n for n, _ in dm.list_owned(runner)}:
        runner.run_best_effort(dm.remove(name))


def medians(measured: list[dict[str, Any]]) -> dict[str, float]:
    return {way: statistics.median(r[way]["stall_s"] for r in measured) for way in WAYS}


def summary_line(measured: list[dict[str, Any]]) -> str:
    return ", ".join(f"{way} {ms * 1000:.1f} ms" for way, ms in medians(measured).items())


def render(payload: dict[str, Any]) -> str:
    """Markdown: the stall per way and mode with its ratio, then each step's median."""
    lines = [
        "| mode | way | writers stalled (median ms) | ÷ kernel alone | longest write (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for mode, found in payload["modes"].items():
        stalls = medians(found["rounds"])
        for way in WAYS:
            ratio = stalls[way] / stalls["kernel alone"]
            longest = longest_write(found, way)
            shown = "" if longest is None else f"{longest * 1000:.1f}"
            lines.append(f"| {mode} | {way} | {stalls[way] * 1000:.1f} | {ratio:.2f}x | {shown} |")
    for mode, found in payload["modes"].items():
        lines += ["", f"Each step, {mode} (median ms):", ""]
        lines += ["| step | " + " | ".join(WAYS) + " |", "|---|" + "---:|" * len(WAYS)]
        labels = [label for label, _ in found["rounds"][0]["cut, ioctl"]["steps"]]
        for label in labels:
            cells = []
            for way in WAYS:
                times = [s for r in found["rounds"] for lbl, s in r[way]["steps"] if lbl == label]
                cells.append(f"{statistics.median(times) * 1000:.2f}" if times else "")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="cuts per way and mode")
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the tables of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.guest:
        return run_guest(args.guest, args.rounds)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    run = run_guest_half("bench.stall", f" --rounds {args.rounds}", RESULTS_FILE, args.json)
    if run.payload is None:
        return 1
    print(f"\nIn the guest ({vm.describe()}), kernel {run.payload['kernel']}, "
          f"{args.rounds} rounds, {run.seconds:.0f} s in all\n")  # fmt: skip
    print(render(run.payload))
    return run.code


if __name__ == "__main__":
    sys.exit(main())
