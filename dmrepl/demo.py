"""The demo: a group on loop devices replicated to a local `blockdev` site.

It writes a configuration for one device over loop devices with one site whose
replica is another loop device, builds the stack with the same `up` users run,
puts ext4 on the gate, and runs a few `sync` cycles with files written in
between. After the last cycle (filesystem unmounted, so the cut is the final
state) it compares replica and gate byte for byte. Everything lives under /tmp
and is torn down in reverse order whatever happens.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dmrepl import builder, loop
from dmrepl.config import Config, parse_config
from dmrepl.executor import Runner
from dmrepl.ops import Op, command
from dmrepl.replication import cycle
from dmrepl.stack import Layer

MiB = 2**20
ORIGIN_BYTES = 256 * MiB
METADATA_BYTES = 8 * MiB
BLOCK_SECTORS = 128  # 64 KiB era blocks
GROUP = "demo"
DEVICE = "dmrepl-demo"
SITE = "dr"
FILES_PER_CYCLE = 3
FILE_BYTES = 2 * MiB
CYCLES = 3


@dataclass(frozen=True)
class DemoCycle:
    cut: int
    what: str  # what was done before the cut
    changed_bytes: int
    shipped_bytes: int  # delta data applied to the replica (or seed bytes written)
    stall_ms: float
    site_state: str


@dataclass(frozen=True)
class DemoResult:
    kernel: str
    origin_sectors: int
    block_sectors: int
    cycles: tuple[DemoCycle, ...]
    gate_sha256: str
    replica_sha256: str

    @property
    def identical(self) -> bool:
        return self.gate_sha256 == self.replica_sha256

    def to_json(self) -> dict[str, object]:
        return {
            "kernel": self.kernel,
            "origin_sectors": self.origin_sectors,
            "block_sectors": self.block_sectors,
            "cycles": [vars(cycle) for cycle in self.cycles],
            "gate_sha256": self.gate_sha256,
            "replica_sha256": self.replica_sha256,
            "identical": self.identical,
        }


def demo_config(workdir: Path, origin: str, metadata: str, replica: str) -> Config:
    """The demo's configuration: one device over loop devices, one blockdev site."""
    text = (
        f'[dmrepl]\nstate_dir = "{workdir / "state"}"\n\n'
        f"[group.{GROUP}.device.{DEVICE}]\n"
        f'origin = "{origin}"\nmetadata = "{metadata}"\nblock_size = "{BLOCK_SECTORS}s"\n\n'
        f'[group.{GROUP}.site.{SITE}]\ntransport = "blockdev"\n\n'
        f'[group.{GROUP}.site.{SITE}.replica]\n{DEVICE} = "{replica}"\n'
    )
    path = workdir / "dmrepl.toml"
    path.write_text(text)
    return parse_config(text, path)


def run_demo(runner: Runner, say: Callable[[str], object] = print) -> DemoResult:
    """Build the stack, replicate a filesystem through a few cycles, compare, tear down."""
    with ExitStack() as undo:
        workdir = Path(tempfile.mkdtemp(prefix="dmrepl-demo-", dir="/tmp"))
        undo.callback(shutil.rmtree, workdir, ignore_errors=True)
        origin = _loop(runner, undo, workdir / "origin.img", ORIGIN_BYTES)
        meta_loop = _loop(runner, undo, workdir / "meta.img", METADATA_BYTES)
        replica = _loop(runner, undo, workdir / "replica.img", ORIGIN_BYTES)
        say(f"origin {origin}, metadata {meta_loop}, replica {replica} (site {SITE})")
        config = demo_config(workdir, origin, meta_loop, replica)
        builder.up(runner, config, GROUP, say=say)
        undo.callback(builder.down, runner, config, GROUP, say=say)
        (stack,) = builder.survey(runner, config.select(GROUP), check=False).stacks
        gate = stack.require(Layer.GATE).path
        # Initialise inode tables and journal now: by default ext4 zeroes them from a kernel
        # thread after mounting, and those writes would show up as changes in every cycle.
        runner.run(command("mkfs.ext4", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", gate))
        mountpoint = workdir / "mnt"
        mountpoint.mkdir()
        runner.run(command("mount", gate, str(mountpoint)))
        mounted = undo.enter_context(ExitStack())
        mounted.callback(runner.run_best_effort, command("umount", str(mountpoint)))

        cycles = []
        for number in range(CYCLES):
            for index in range(FILES_PER_CYCLE):
                (mountpoint / f"file-{number}-{index}").write_bytes(os.urandom(FILE_BYTES))
            os.sync()
            what = f"wrote {FILES_PER_CYCLE} files of {FILE_BYTES // MiB} MiB on mounted ext4"
            cycles.append(_cycle(runner, config, what, say))
        mounted.close()  # unmount: the last cut then holds the final state
        cycles.append(_cycle(runner, config, "unmounted the filesystem", say))
        return DemoResult(
            kernel=os.uname().release,
            origin_sectors=stack.origin_sectors,
            block_sectors=BLOCK_SECTORS,
            cycles=tuple(cycles),
            gate_sha256=sha256_of(gate),
            replica_sha256=sha256_of(replica),
        )


def _cycle(runner: Runner, config: Config, what: str, say: Callable[[str], object]) -> DemoCycle:
    result = cycle.sync(runner, config, GROUP, say=say)
    (site,) = result.sites
    shipped = sum(d.data_bytes for d in site.delivered)
    if site.seeded is not None:
        shipped = site.seeded.written
    return DemoCycle(
        cut=result.cut.seq,
        what=what,
        changed_bytes=result.changed_bytes,
        shipped_bytes=shipped,
        stall_ms=round(result.cut.stall_s * 1000, 1),
        site_state=site.state,
    )


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as device:
        while chunk := device.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


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
    return command("modprobe", "-a", "loop", "dm-era", "dm-snapshot")
