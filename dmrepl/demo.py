"""The demo: a protected device on loop devices, some writes, and the changed ranges.

It writes a configuration for one device over two loop devices, builds the
stack with the same `up` users run, writes at known offsets through the gate,
and asks dm-era what changed. Everything lives under /tmp, and is torn down in
reverse order whatever happens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dmrepl import builder, era, loop
from dmrepl.config import Config, parse_config
from dmrepl.executor import Op, Runner, command
from dmrepl.ranges import Extent, blocks_to_sectors
from dmrepl.stack import Layer

MiB = 2**20
ORIGIN_BYTES = 256 * MiB
METADATA_BYTES = 8 * MiB
BLOCK_SECTORS = 128  # 64 KiB era blocks
GROUP = "demo"
DEVICE = "dmrepl-demo"

# (what, byte offset, length): offsets chosen to show single blocks, runs and the device end.
DEMO_WRITES = (
    ("4 KiB at 1 MiB", 1 * MiB, 4096),
    ("1 MiB at 64 MiB", 64 * MiB, MiB),
    ("512 B at 64 MiB + 3 MiB", 67 * MiB, 512),
    ("512 B in the last sector", ORIGIN_BYTES - 512, 512),
)


@dataclass(frozen=True)
class DemoResult:
    kernel: str
    origin_sectors: int
    block_sectors: int
    era_before: int
    era_after_snapshot: int
    writes: tuple[tuple[str, int, int], ...]
    changed_blocks: tuple[Extent, ...]
    changed_sectors: tuple[Extent, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "origin_sectors": self.origin_sectors,
            "block_sectors": self.block_sectors,
            "era_before": self.era_before,
            "era_after_snapshot": self.era_after_snapshot,
            "writes": [{"what": w, "offset": o, "length": n} for w, o, n in self.writes],
            "changed_blocks": [[e.begin, e.end] for e in self.changed_blocks],
            "changed_sectors": [[e.begin, e.end] for e in self.changed_sectors],
        }


def demo_config(workdir: Path, origin: str, metadata: str) -> Config:
    """The demo's configuration: one group with one device over two loop devices."""
    text = (
        f'[dmrepl]\nstate_dir = "{workdir / "state"}"\n\n'
        f"[group.{GROUP}.device.{DEVICE}]\n"
        f'origin = "{origin}"\nmetadata = "{metadata}"\nblock_size = "{BLOCK_SECTORS}s"\n'
    )
    path = workdir / "dmrepl.toml"
    path.write_text(text)
    return parse_config(text, path)


def run_demo(runner: Runner, say: Callable[[str], object] = print) -> DemoResult:
    """Build the stack with `up`, write, list what changed since the first era, `down`."""
    with ExitStack() as undo:
        workdir = Path(tempfile.mkdtemp(prefix="dmrepl-demo-", dir="/tmp"))
        undo.callback(shutil.rmtree, workdir, ignore_errors=True)
        origin = _loop(runner, undo, workdir / "origin.img", ORIGIN_BYTES)
        meta_loop = _loop(runner, undo, workdir / "meta.img", METADATA_BYTES)
        say(f"origin {origin} ({ORIGIN_BYTES // MiB} MiB), metadata {meta_loop}")
        config = demo_config(workdir, origin, meta_loop)
        builder.up(runner, config, GROUP, say=say)
        undo.callback(builder.down, runner, config, GROUP, say=say)
        (stack,) = builder.survey(runner, config.select(GROUP), check=False).stacks
        gate, era_name = stack.require(Layer.GATE).path, stack.require(Layer.ERA).name
        access = stack.require(Layer.ACCESS).path

        before = era.read_status(runner, era_name)
        say(f"{gate} ready: era {before.current_era}, era block {BLOCK_SECTORS} sectors")
        for what, offset, length in DEMO_WRITES:
            say(f"writing {what}")
            write_random(gate, offset, length)
        with era.metadata_snapshot(runner, era_name) as held:
            say(f"took a metadata snapshot: writes now go to era {held.current_era}")
            changed = era.written_since(runner, access, before.current_era)
        return DemoResult(
            kernel=os.uname().release,
            origin_sectors=stack.origin_sectors,
            block_sectors=BLOCK_SECTORS,
            era_before=before.current_era,
            era_after_snapshot=held.current_era,
            writes=DEMO_WRITES,
            changed_blocks=tuple(changed),
            changed_sectors=tuple(blocks_to_sectors(changed, BLOCK_SECTORS, stack.origin_sectors)),
        )


def _loop(runner: Runner, undo: ExitStack, path: Path, size: int) -> str:
    loop.create_sparse_file(path, size)
    device = loop.attach(runner, path)
    undo.callback(runner.run_best_effort, loop.detach(device))
    return device


def write_random(device: str, offset: int, length: int) -> None:
    """Write `length` random bytes at `offset` and fsync (so the era device sees them now)."""
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, os.urandom(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def load_modules() -> Op:
    """Load the targets the demo needs (no-op when built in or loaded)."""
    return command("modprobe", "-a", "loop", "dm-era")
