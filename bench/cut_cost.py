"""Benchmark: what a cut and its change list cost, as the device grows and as changes grow.

    .venv/bin/python -m bench.cut_cost [--grid full|quick|goal3] [--json PATH]

Each point builds dmrepl's own stack (`plan_stack`: meta, access, snapshot-origin,
era, gate) over a `zero` origin (reads return zeros, writes are discarded, but
dm-era above it still tracks every write), era blocks of 2 MiB, metadata on a
sparse loop file of dmrepl's size (`metadata_size(...).rounded_sectors()`). Cuts
are taken with `dmrepl.cut.held_cut` and listed with `dmrepl.cut.list_changes`,
the code `dmrepl changes` runs (without `-pit` images).

- by size: 1 GiB .. 16 TiB; before each cut a few blocks spread over the device
  are written, then the cut is taken (gates suspended, metadata snapshot taken,
  gates resumed), the change list since the previous cut read, the cut released.
- both list paths: while each cut is held its changes are listed twice, by
  dmrepl's own metadata reader (`DMREPL_ERA_LIST=reader`, the default path) and
  then by era_invalidate (`DMREPL_ERA_LIST=tool`), and the two lists must be
  equal. "cut + list" is take + list + release for each path. The tool's list is
  made in a fresh interpreter (`--tool-list`, timed inside it): dmrepl streams
  era_invalidate through sh, which forks the whole Python process, and every
  page that fork shares copy-on-write costs the next code to write it a page
  fault (in user-mode Linux about 0.05 ms each), which billed this process's
  release and next cut for the tool's run.
- the kernel alone: after each cut of a size (and a few more blocks written),
  the same take and release as bare ioctls back to back, nothing listed in
  between (`kernel_alone`): what dm-era costs per cut at that size, whatever
  lists the changes.
- by changes: one device; N distinct era blocks (never adjacent, so N ranges) are
  written with buffered 4 KiB writes and one fsync, then cuts list the changes
  since the era the writes began in.

The host side boots the VM (dmrepl.vm.run_in_vm), which runs this module with
`--guest DIR` and writes its results as JSON into DIR; the host prints Markdown
tables (the ones in docs/cuts.md). Times are medians over the cuts of a point.
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
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vmrun import run_guest_half
from dmrepl import dm, dmioctl, era, loop
from dmrepl.config import DeviceSpec
from dmrepl.cut import cut_steps, held_cut, list_changes
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Op, Result, probe
from dmrepl.ranges import Extent, blocks_to_sectors, total_length
from dmrepl.sizing import metadata_size
from dmrepl.stack import Layer, StackSpec, plan_stack
from dmrepl.tables import Zero, single

MiB = 2048  # sectors
GiB = 1024 * MiB
TiB = 1024 * GiB
BLOCK_SECTORS = 2 * MiB  # era block: 2 MiB
WRITE_BYTES = 4096
RESULTS_FILE = "cut_cost.json"
GROUP = "bench"


@dataclass(frozen=True)
class Grid:
    sizes: tuple[int, ...]  # origin sectors
    cuts_per_size: int
    blocks_between_cuts: int
    changes_size: int  # origin sectors of the by-changes device
    changes: tuple[int, ...]  # N changed era blocks
    cuts_per_change: int
    write_budget_s: float  # per N: stop writing after this long (N is then what was written)


GRIDS = {
    "full": Grid(
        sizes=(1 * GiB, 16 * GiB, 256 * GiB, 1 * TiB, 4 * TiB, 16 * TiB),
        cuts_per_size=5,
        blocks_between_cuts=16,
        changes_size=1 * TiB,
        changes=(0, 100, 1_000, 10_000, 100_000),
        cuts_per_change=3,
        write_budget_s=600.0,
    ),
    "goal3": Grid(  # issue 20, goal 3: 16 changed era blocks, 1 GiB against 16 TiB
        sizes=(1 * GiB, 16 * TiB),
        cuts_per_size=5,
        blocks_between_cuts=16,
        changes_size=1 * TiB,
        changes=(),
        cuts_per_change=0,
        write_budget_s=600.0,
    ),
    "quick": Grid(
        sizes=(1 * GiB, 1 * TiB),
        cuts_per_size=2,
        blocks_between_cuts=16,
        changes_size=1 * TiB,
        changes=(0, 1_000),
        cuts_per_change=2,
        write_budget_s=120.0,
    ),
}


class TimedRunner(Runner):
    """A Runner that records every command it runs and how long it took."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(timeout_s)
        self.log: list[tuple[str, float]] = []

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        started = time.monotonic()
        try:
            return super().run(op, ok_codes=ok_codes)
        finally:
            self.log.append((_label(op), time.monotonic() - started))

    def stream(
        self,
        op: Op,
        sink: Callable[[str], object] | None = None,
        *,
        stderr: Callable[[str], object] | None = None,
    ) -> int:
        started = time.monotonic()
        try:
            return super().stream(op, sink, stderr=stderr)
        finally:
            self.log.append((_label(op), time.monotonic() - started))

    def mark(self) -> int:
        return len(self.log)

    def since(self, mark: int) -> list[tuple[str, float]]:
        return self.log[mark:]


def _label(op: Op) -> str:
    if op.argv[0] == "dmsetup" and len(op.argv) > 1:
        return f"dmsetup {op.argv[1]}"
    return op.argv[0]


@contextmanager
def bench_stack(
    runner: Runner, workdir: Path, name: str, origin_sectors: int
) -> Iterator[StackSpec]:
    """dmrepl's stack over a `zero` origin; everything removed and deleted on exit."""
    with ExitStack() as undo:
        zero = f"{name}-zero"
        undo.callback(_remove, runner, zero)
        runner.run(dm.create(zero, single(origin_sectors, Zero()), f"{dm.UUID_PREFIX}bench-{zero}"))
        metadata_sectors = metadata_size(origin_sectors, BLOCK_SECTORS).rounded_sectors()
        path = workdir / f"{name}.meta"
        loop.create_sparse_file(path, metadata_sectors * 512)
        undo.callback(path.unlink, missing_ok=True)
        metadata = loop.attach(runner, path)
        undo.callback(runner.run_best_effort, loop.detach(metadata))
        device = DeviceSpec(
            group=GROUP,
            name=name,
            origin=dm.mapper_path(zero),
            metadata=metadata,
            metadata_offset=0,
            metadata_size=None,
            block_sectors=BLOCK_SECTORS,
            cow=None,
            cow_sectors=None,
            mirror=None,
        )
        stack = plan_stack(device, origin_sectors, metadata_sectors)
        for layer in stack.layers:  # creation order; removed in reverse
            undo.callback(_remove, runner, layer.name)
            runner.run(dm.create(layer.name, layer.table, layer.uuid))
        yield stack


def _remove(runner: Runner, name: str) -> None:
    try:
        if dm.is_suspended(runner, name):
            runner.run(dm.resume(name))
    except CommandFailed:  # not there (its create failed)
        return
    runner.run_best_effort(dm.remove(name))


def write_blocks(path: str, blocks: Iterable[int], deadline: float) -> int:
    """Write 4 KiB at the start of each era block (buffered, one fsync); returns how many."""
    data = b"\xa5" * WRITE_BYTES
    fd = os.open(path, os.O_WRONLY)
    written = 0
    try:
        for block in blocks:
            if written % 1000 == 0 and time.monotonic() > deadline:
                break
            os.pwrite(fd, data, block * BLOCK_SECTORS * 512)
            written += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


def spread(count: int, era_blocks: int) -> range:
    """`count` era blocks evenly over the device, never two adjacent (so never coalesced)."""
    if count == 0:
        return range(0)
    stride = max(2, era_blocks // count)
    if stride * (count - 1) >= era_blocks:
        raise ValueError(f"{count} separate blocks do not fit in {era_blocks} era blocks")
    return range(0, stride * count, stride)


def timed_cut(
    runner: TimedRunner,
    stack: StackSpec,
    since: int | None,
    say: Callable[[str], object],
) -> dict[str, Any]:
    """Take one cut, list changes since era `since` (None: since the era before the cut).

    The list is made by both paths, which must agree: the reader here, as
    `dmrepl changes` makes it, then era_invalidate in a fresh interpreter
    (`tool_list`). Returns the cut's timings, the commands it ran and what the list held.
    """
    name = stack.device.name
    mark = runner.mark()
    started = time.monotonic()
    with held_cut(runner, (stack,), say=lambda _: None) as held:
        taken = time.monotonic()
        in_take = runner.since(mark)
        first = held.eras[name] if since is None else since
        os.environ[era.LIST_ENV] = "reader"
        begun = time.monotonic()
        listed = list_changes(runner, held, {name: first})[name]
        list_s = time.monotonic() - begun
        os.environ.pop(era.LIST_ENV)
        by_tool, list_tool_s = tool_list(stack.require(Layer.ACCESS).path, first)
        stall, cut_era, steps = held.stall_s, held.eras[name], held.steps
        release_started = time.monotonic()
    released = time.monotonic()
    block_sectors, origin_sectors = stack.device.block_sectors, stack.origin_sectors
    if listed != list(blocks_to_sectors(by_tool, block_sectors, origin_sectors)):
        raise AssertionError(f"era {cut_era} since {first}: the reader and era_invalidate differ")
    commands = runner.since(mark)
    take_s, release_s = taken - started, released - release_started
    record = {
        "era": cut_era,
        "since": first,
        "take_s": take_s,
        "stall_s": stall,
        "list_s": list_s,
        "list_tool_s": list_tool_s,
        "release_s": release_s,
        "total_s": take_s + list_s + release_s,
        "total_tool_s": take_s + list_tool_s + release_s,
        "take_message_s": sum(s for label, s in steps if "take_metadata_snap" in label),
        "take_commands": in_take,
        "commands": len(commands),
        "ranges": len(listed),
        "changed_sectors": total_length(listed),
    }
    say(
        f"  cut era {cut_era}: take {take_s:.3f} s (stall {stall:.3f} s), list "
        f"{list_s:.3f} s by the reader, {list_tool_s:.2f} s by era_invalidate "
        f"({record['ranges']} ranges), release {release_s:.3f} s"
    )
    return record


def tool_list(access: str, since: int) -> tuple[list[Extent], float]:
    """era_invalidate's list of the snapshot held on `access`, and its seconds.

    Made by dmrepl's code (`era.written_since` with DMREPL_ERA_LIST=tool) in a
    fresh interpreter, so that sh's fork of it bills nothing to this process.
    """
    child = subprocess.run(
        [sys.executable, "-m", "bench.cut_cost", "--tool-list", access, str(since)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, era.LIST_ENV: "tool"},
    )
    answer = json.loads(child.stdout)
    return [Extent(begin, end) for begin, end in answer["extents"]], float(answer["seconds"])


def _tool_list_here(access: str, since: int) -> int:
    """The child of `tool_list`: print the list and how long it took, as JSON."""
    runner = Runner(timeout_s=1800)
    started = time.monotonic()
    extents = era.written_since(runner, access, since)
    seconds = time.monotonic() - started
    print(json.dumps({"seconds": seconds, "extents": [[x.begin, x.end] for x in extents]}))
    return 0


def kernel_alone(stack: StackSpec) -> tuple[float, float]:
    """A cut's kernel operations alone: (take, release) seconds, each as bare ioctls back to back.

    The take is the cut's steps (suspend the gate, `take_metadata_snap`, resume the
    gate), the release its `drop_metadata_snap`: what any tool using dm-era must
    pay per cut, whatever it lists with. Nothing is listed in between.
    """
    steps = cut_steps((stack,), None)
    takes = [dmioctl.request_for(step.op) for step in steps]
    drops = [dmioctl.request_for(step.release) for step in steps if step.release is not None]
    started = time.monotonic()
    for request in takes:
        assert request is not None, "a cut step with no ioctl"
        dmioctl.issue(request)
    taken = time.monotonic()
    for request in reversed(drops):
        assert request is not None, "a release with no ioctl"
        dmioctl.issue(request)
    return taken - started, time.monotonic() - taken


def measure_size(
    runner: TimedRunner,
    workdir: Path,
    origin_sectors: int,
    grid: Grid,
    say: Callable[[str], object],
) -> dict[str, Any]:
    """Cuts of one device size, a few blocks written before each."""
    started = time.monotonic()
    era_blocks = -(-origin_sectors // BLOCK_SECTORS)
    blocks = spread(min(grid.blocks_between_cuts, era_blocks // 2), era_blocks)
    with bench_stack(runner, workdir, f"cc{os.getpid()}s", origin_sectors) as stack:
        built = time.monotonic() - started
        gate = stack.require(Layer.GATE).path
        cuts = []
        previous: int | None = None
        for _ in range(grid.cuts_per_size):
            write_blocks(gate, blocks, time.monotonic() + grid.write_budget_s)
            since = None if previous is None else previous + 1
            cut = timed_cut(runner, stack, since, say)
            write_blocks(gate, blocks, time.monotonic() + grid.write_budget_s)
            cut["kernel_take_s"], cut["kernel_release_s"] = kernel_alone(stack)
            cut["kernel_s"] = cut["kernel_take_s"] + cut["kernel_release_s"]
            previous = cut["era"] + 1  # the floor's take closed an era too
            cuts.append(cut)
    return {
        "origin_sectors": origin_sectors,
        "era_blocks": era_blocks,
        "metadata_sectors": stack.metadata_sectors,
        "written_per_cut": len(blocks),
        "build_s": built,
        "cuts": cuts,
        "seconds": time.monotonic() - started,
    }


def measure_changes(
    runner: TimedRunner, workdir: Path, grid: Grid, say: Callable[[str], object]
) -> list[dict[str, Any]]:
    """Change lists of N changed era blocks on one device."""
    points: list[dict[str, Any]] = []
    if not grid.changes:
        return points
    era_blocks = -(-grid.changes_size // BLOCK_SECTORS)
    with bench_stack(runner, workdir, f"cc{os.getpid()}n", grid.changes_size) as stack:
        gate = stack.require(Layer.GATE).path
        for count in grid.changes:
            say(f"by changes: {count} era blocks")
            opened = timed_cut(runner, stack, None, say)  # closes the era before the writes
            started = time.monotonic()
            written = write_blocks(gate, spread(count, era_blocks), started + grid.write_budget_s)
            write_s = time.monotonic() - started
            cuts = [
                timed_cut(runner, stack, opened["era"] + 1, say)
                for _ in range(grid.cuts_per_change)
            ]
            points.append(
                {"requested": count, "written": written, "write_s": write_s, "cuts": cuts}
            )
    return points


def command_overhead(runner: Runner) -> float:
    """Median time of a trivial external command (`true`) through the runner."""
    times = []
    for _ in range(5):
        started = time.monotonic()
        runner.run(probe("true"))
        times.append(time.monotonic() - started)
    return statistics.median(times)


def run_guest(out: Path, grid: Grid) -> int:
    """Inside the VM: measure, rewriting the results file after each point."""
    runner = TimedRunner(timeout_s=1800)
    workdir = Path(tempfile.mkdtemp(prefix="dmrepl-bench-", dir="/tmp"))
    tool = runner.run(probe("era_invalidate", "--version")).stdout.strip()
    sizes: list[dict[str, Any]] = []
    payload: dict[str, Any] = {
        "kernel": os.uname().release,
        "era_invalidate": tool,
        "block_sectors": BLOCK_SECTORS,
        "command_s": command_overhead(runner),
        "sizes": sizes,
        "changes_origin_sectors": grid.changes_size,
        "changes": [],
    }

    def say(text: str) -> None:
        print(text, flush=True)

    def save() -> None:
        (out / RESULTS_FILE).write_text(json.dumps(payload, indent=1))

    say(f"one external command: {payload['command_s']:.2f} s")
    for origin_sectors in grid.sizes:
        say(f"by size: origin {_size(origin_sectors)}")
        sizes.append(measure_size(runner, workdir, origin_sectors, grid, say))
        save()
    payload["changes"] = measure_changes(runner, workdir, grid, say)
    save()
    return 0


def _size(sectors: int) -> str:
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB)):
        if sectors >= factor and sectors % factor == 0:
            return f"{sectors // factor} {unit}"
    return f"{sectors} s"


def _median(cuts: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(cut[key] for cut in cuts))


def _cell(cuts: list[dict[str, Any]], key: str) -> str:
    return f"{_median(cuts, key):.3f}" if key in cuts[0] else ""  # older results lack some


def render_tables(payload: dict[str, Any]) -> str:
    """The Markdown tables of docs/cuts.md (seconds, medians over a point's cuts)."""
    keys = (
        "stall_s", "take_message_s", "list_s", "list_tool_s", "release_s", "total_s",
        "total_tool_s", "kernel_s",
    )  # fmt: skip
    lines = [
        "| origin | era blocks | metadata | cuts | commands per cut | writer stall"
        " | of which `take_metadata_snap` | list (reader) | list (era_invalidate) | release"
        " | cut + list (reader) | cut + list (era_invalidate) | kernel alone: take + release |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    sizes = payload["sizes"]
    for p in sizes:
        cells = [
            _size(p["origin_sectors"]),
            str(p["era_blocks"]),
            _size(p["metadata_sectors"]),
            str(len(p["cuts"])),
            "/".join(str(n) for n in sorted({cut["commands"] for cut in p["cuts"]})),
            *(_cell(p["cuts"], key) for key in keys),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(sizes) > 1:
        small, large = sizes[0], sizes[-1]
        factor = large["origin_sectors"] / small["origin_sectors"]
        cells = [f"**{_size(large['origin_sectors'])} ÷ {_size(small['origin_sectors'])}**"]
        cells += [f"{factor:.0f}x", "", "", ""]
        for key in keys:
            low = _median(small["cuts"], key) if key in small["cuts"][0] else 0
            cells.append(f"{_median(large['cuts'], key) / low:.2f}x" if low > 0 else "")
        lines.append("| " + " | ".join(cells) + " |")
        if "kernel_s" in large["cuts"][0]:
            floor, whole = _median(large["cuts"], "kernel_s"), _median(small["cuts"], "total_s")
            lines += [
                "",
                f"The kernel's operations alone at {_size(large['origin_sectors'])} take"
                f" {floor / whole:.2f}x dmrepl's whole cut + list at"
                f" {_size(small['origin_sectors'])}.",
            ]

    if not payload["changes"]:
        return "\n".join(lines)
    lines += [
        "",
        f"Change lists on a {_size(payload['changes_origin_sectors'])} device:",
        "",
        "| changed era blocks | written in | cuts | ranges listed | list (reader)"
        " | list (era_invalidate) | writer stall |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in payload["changes"]:
        ranges = sorted({cut["ranges"] for cut in p["cuts"]})
        written = f"{p['written']}" + ("" if p["written"] == p["requested"] else " (time-boxed)")
        cells = [
            written,
            f"{p['write_s']:.1f}",
            str(len(p["cuts"])),
            "/".join(str(r) for r in ranges),
            *(f"{_median(p['cuts'], key):.2f}" for key in ("list_s", "list_tool_s", "stall_s")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cut_cost", description=__doc__)
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the tables of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tool-list", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    grid = GRIDS[args.grid]
    if args.tool_list:
        return _tool_list_here(args.tool_list[0], int(args.tool_list[1]))
    if args.guest:
        return run_guest(args.guest, grid)
    if args.render:
        print(render_tables(json.loads(args.render.read_text())))
        return 0

    run = run_guest_half("bench.cut_cost", f" --grid {args.grid}", RESULTS_FILE, args.json)
    if run.payload is None:
        return 1
    payload, code = run.payload, run.code
    print(
        f"\nkernel {payload['kernel']}, era_invalidate {payload['era_invalidate']}, "
        f"one external command {payload['command_s']:.2f} s, "
        f"{run.seconds:.0f} s in all (with any wait for another VM)\n"
    )
    print(render_tables(payload))
    return code


if __name__ == "__main__":
    sys.exit(main())
