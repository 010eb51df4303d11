"""Benchmark: `ssh` sites over the network lab's veth link, next to ssh + dd and hash-compare tools.

    .venv/bin/python -m bench.remote [--quick] [--json PATH]

The guest half builds tests/kernel/netlab.py's lab (the primary in the root namespace,
10.77.0.1; the DR host a network namespace, 10.77.0.2, with an sshd that allows root only
forced commands). One group of one device (a sparse loop-file origin, 64 KiB era blocks) has
four `ssh` sites that differ only in `compress` (none, zstd:1, zstd:3, lz4); each site's key
runs `dmrepl serve --stdio` with its own receiver config, whose replica is its own loop device
(block devices are not namespaced). A sync ships to the sites one after the other, so each
site's transfer (Delivery.transfer: from the first byte of the delta sent to the receiver's
reply after its journal, verify and apply) is timed alone, on the same delta. Measured in one
run, side by side:

1. Ship, random data: 10 % of the device rewritten in scattered 1-2 MiB runs (incompressible);
   then the same ranges over ssh to `dd` (one ssh session; at the DR host one `dd` per range
   reads its bytes from stdin, the last with fsync; the primary feeds the ranges from a Python
   pread loop), and the same bytes as one stream into one `dd` (the link's ceiling with dd).
   Also what ssh alone moves into `cat > /dev/null`, with its default cipher and with
   aes128-gcm, and what one ssh session and one `dd` process cost with nothing to move.
2. Ship, an ext4 image: `mkfs.ext4 -d /usr/lib/python3.11` on a file the size of the device;
   its non-zero 64 KiB blocks are written to the device and one sync ships them: compression
   ratio and throughput per codec, and the same bytes as one ssh + dd stream.
3. Catch-up after 1 % of the era blocks change (random 64 KiB blocks): a whole sync (the
   zstd:3 site alone; the other sites are dropped from the config) against PyPI's `blocksync`
   3.0.1 (`local_to_remote`, paramiko, 1 MiB blocks, sha256) and against this module's
   `ssh_hash_compare` (one ssh session: the DR side hashes its replica in 1 MiB chunks with
   blake2b while the primary hashes the device; differing chunks are sent and written, fsync).

Page caches are dropped before every timed step. blocksync and paramiko are not dmrepl's
dependencies: `pip install --target /var/tmp/dmrepl-bench-deps blocksync==3.0.1` (or
`--deps DIR`); without them that baseline is left out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.replication import (
    PhaseClock,
    _write_all,
    dd_startup_seconds,
    drop_caches,
    hash_compare_copy,
    loops,
    same_content,
    scattered_blocks,
    scattered_runs,
    write_runs,
)
from bench.vmrun import run_guest_half
from dmrepl import phases
from dmrepl.config import load_config
from dmrepl.executor import Runner
from dmrepl.replication import cycle
from dmrepl.sizing import metadata_size

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
ERA_BLOCK = 64 * KiB
CHUNK = MiB
RESULTS_FILE = "remote.json"
GROUP = "rbench"
DEVICE = "rv"
ROOT = Path(__file__).resolve().parents[1]
DEPS = Path("/var/tmp/dmrepl-bench-deps")
EXT4_CONTENT = "/usr/lib/python3.11"
# site name -> its `compress` setting
SITES = {"none": "none", "zstd1": "zstd:1", "zstd3": "zstd:3", "lz4": "lz4"}
CATCHUP_SITE = "zstd3"


@dataclass(frozen=True)
class Plan:
    origin_bytes: int
    ship_fraction: float
    catchup_fraction: float


FULL = Plan(origin_bytes=1 * GiB, ship_fraction=0.10, catchup_fraction=0.01)
QUICK = Plan(origin_bytes=256 * MiB, ship_fraction=0.10, catchup_fraction=0.01)


def coalesce(blocks: list[int], size: int) -> list[tuple[int, int]]:
    """Sorted block numbers as (offset, length) runs of adjacent blocks of `size` bytes."""
    runs: list[tuple[int, int]] = []
    for block in blocks:
        if runs and runs[-1][0] + runs[-1][1] == block * size:
            runs[-1] = (runs[-1][0], runs[-1][1] + size)
        else:
            runs.append((block * size, size))
    return runs


def nonzero_runs(path: str, length: int) -> list[tuple[int, int]]:
    """The era blocks of `path` holding any non-zero byte, as runs."""
    fd = os.open(path, os.O_RDONLY)
    try:
        zero = bytes(ERA_BLOCK)
        blocks = [
            offset // ERA_BLOCK
            for offset in range(0, length, ERA_BLOCK)
            if os.pread(fd, ERA_BLOCK, offset) != zero
        ]
    finally:
        os.close(fd)
    return coalesce(blocks, ERA_BLOCK)


def copy_runs(source: str, target: str, runs: list[tuple[int, int]]) -> None:
    src, dst = os.open(source, os.O_RDONLY), os.open(target, os.O_WRONLY)
    try:
        for offset, size in runs:
            for piece in range(offset, offset + size, CHUNK):
                _write_all(dst, os.pread(src, min(CHUNK, offset + size - piece), piece), piece)
        os.fsync(dst)
    finally:
        os.close(src)
        os.close(dst)


def differing_chunks(a: str, b: str, length: int) -> int:
    """How many 1 MiB chunks of `a` and `b` differ."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        return sum(
            os.pread(fa, CHUNK, offset) != os.pread(fb, CHUNK, offset)
            for offset in range(0, length, CHUNK)
        )
    finally:
        os.close(fa)
        os.close(fb)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the DR side of the baselines: one key whose forced command runs a script we rewrite


class Baselines:
    """ssh sessions whose forced command is `sh SCRIPT`; each run writes SCRIPT first."""

    def __init__(self, workdir: Path, argv: Callable[..., list[str]]):
        self.script = workdir / "baseline.sh"
        self.argv = argv

    def run(
        self,
        script: str,
        feed: Callable[[Any], None] | None = None,
        extra: tuple[str, ...] = (),
    ) -> float:
        """Seconds for one ssh session running `script` at the DR host, fed by `feed`."""
        self.script.write_text(script)
        started = time.monotonic()
        with subprocess.Popen(
            self.argv("x", extra=extra), stdin=subprocess.PIPE, stdout=subprocess.PIPE
        ) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            if feed is not None:
                feed(proc.stdin)
            proc.stdin.close()
            out = proc.stdout.read()
            code = proc.wait()
        seconds = time.monotonic() - started
        if code != 0:
            raise RuntimeError(f"baseline script exited {code}: {out!r}\n{script}")
        return round(seconds, 3)


def feed_ranges(path: str, runs: list[tuple[int, int]]) -> Callable[[Any], None]:
    def feed(pipe: Any) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, size in runs:
                for piece in range(offset, offset + size, CHUNK):
                    pipe.write(os.pread(fd, min(CHUNK, offset + size - piece), piece))
        finally:
            os.close(fd)

    return feed


def feed_bytes(total: int) -> Callable[[Any], None]:
    block = os.urandom(CHUNK)

    def feed(pipe: Any) -> None:
        for offset in range(0, total, CHUNK):
            pipe.write(block[: min(CHUNK, total - offset)])

    return feed


def dd_script(target: str, runs: list[tuple[int, int]]) -> str:
    lines = []
    for index, (offset, size) in enumerate(runs):
        conv = "notrunc,fsync" if index == len(runs) - 1 else "notrunc"
        lines.append(
            f"dd of={target} bs=1M seek={offset} count={size} iflag=fullblock,count_bytes"
            f" oflag=seek_bytes conv={conv} status=none || exit 1"
        )
    return "\n".join(lines) + "\n"


def stream_script(target: str) -> str:
    return f"exec dd of={target} bs=1M iflag=fullblock conv=notrunc,fsync status=none\n"


def ssh_baselines(
    base: Baselines, gate: str, target: str, scratch: str, runs: list[tuple[int, int]]
) -> dict[str, Any]:
    total = sum(size for _, size in runs)
    out: dict[str, Any] = {"bytes": total, "runs": len(runs)}
    out["ssh_setup_s"] = statistics.median(base.run("exit 0\n") for _ in range(3))
    out["dd_startup_s"] = dd_startup_seconds()
    drop_caches()
    out["dd_ranges_s"] = base.run(dd_script(target, runs), feed_ranges(gate, runs))
    drop_caches()
    out["dd_stream_s"] = base.run(stream_script(scratch), feed_ranges(gate, runs))
    out["cat_null_s"] = base.run("exec cat > /dev/null\n", feed_bytes(total))
    out["cat_null_aes_s"] = base.run(
        "exec cat > /dev/null\n", feed_bytes(total), extra=("-c", "aes128-gcm@openssh.com")
    )
    return out


# -- the hash-compare baselines for the catch-up


HASH_SERVER = r"""
import hashlib, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
length = os.lseek(fd, 0, os.SEEK_END)
out, inp = sys.stdout.buffer, sys.stdin.buffer
for offset in range(0, length, 1 << 20):
    out.write(hashlib.blake2b(os.pread(fd, 1 << 20, offset)).digest())
out.flush()
head = struct.Struct(">QI")
while True:
    offset, size = head.unpack(inp.read(head.size))
    if size == 0:
        break
    data = inp.read(size)
    while data:
        done = os.pwrite(fd, data, offset)
        data, offset = data[done:], offset + done
os.fsync(fd)
out.write(b"ok\n")
out.flush()
"""


def ssh_hash_compare(argv: list[str], server: Path, source: str, target: str) -> dict[str, Any]:
    """Make the remote `target` equal `source`: both sides hash 1 MiB chunks at once (the
    DR side, `python3 SERVER` with HASH_SERVER, streams its digests), then the chunks whose
    digests differ are sent and written there."""
    head = struct.Struct(">QI")
    server.write_text(HASH_SERVER)
    proc = subprocess.Popen(
        [*argv, "python3", str(server), target],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    fd = os.open(source, os.O_RDONLY)
    length = os.lseek(fd, 0, os.SEEK_END)
    count = -(-length // CHUNK)
    theirs: list[bytes] = []
    stdout = proc.stdout

    def read_digests() -> None:
        theirs.extend(stdout.read(64) for _ in range(count))

    reader = threading.Thread(target=read_digests)
    reader.start()
    mine = [
        hashlib.blake2b(os.pread(fd, CHUNK, offset)).digest() for offset in range(0, length, CHUNK)
    ]
    reader.join()
    sent = 0
    for index, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        if a != b:
            data = os.pread(fd, CHUNK, index * CHUNK)
            proc.stdin.write(head.pack(index * CHUNK, len(data)) + data)
            sent += len(data)
    os.close(fd)
    proc.stdin.write(head.pack(0, 0))
    proc.stdin.close()
    reply = proc.stdout.read()
    if proc.wait() != 0 or reply != b"ok\n":
        raise RuntimeError(f"the hash-compare server failed: {reply!r}")
    return {"compared_bytes": length, "sent_bytes": sent}


def run_blocksync(deps: Path, key: Path, source: str, target: str, lab: Any) -> dict[str, Any]:
    """PyPI blocksync 3.0.1 `local_to_remote` onto `target` at the DR host."""
    sys.path.insert(0, str(deps))
    from unittest import mock

    import paramiko  # type: ignore[import-not-found]
    from blocksync import local_to_remote  # type: ignore[import-not-found]

    from tests.kernel.netlab import DR_IP, SSH_PORT

    package = Path(sys.modules["blocksync"].__file__ or "").parent
    # blocksync uploads its two helper scripts by sftp unless told their commands, but opens
    # an sftp session either way; the lab's sshd has no sftp subsystem, so that is skipped
    # and the scripts run from the installed package (the same files it would upload).
    with mock.patch.object(paramiko.SSHClient, "open_sftp", lambda self: None):
        _, status = local_to_remote(
            source, target, block_size=CHUNK, workers=1, wait=True, compress=False,
            read_server_command=f"python3 {package / '_read_server.py'}",
            write_server_command=f"python3 {package / '_write_server.py'}",
            allow_load_system_host_keys=False, hostname=DR_IP, port=SSH_PORT,
            username="root", key_filename=str(key), look_for_keys=False, allow_agent=False,
        )  # fmt: skip
    # It returns when its worker has sent the last block; the DR side's writer may still be
    # writing: wait for it to exit, then flush the replica (what the other tools do).
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        commands = []
        for pid in lab.dr_pids():
            with suppress(OSError):
                commands.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        if not any(b"_write_server" in c or b"_read_server" in c for c in commands):
            break
        time.sleep(0.05)
    fsync_path(target)
    return {"same_blocks": int(status.blocks["same"]), "diff_blocks": int(status.blocks["diff"])}


# -- dmrepl


def timed_sync(
    runner: Runner, config_path: Path, say: Callable[[str], None], **kw: Any
) -> dict[str, Any]:
    config = load_config(config_path)
    clock = PhaseClock()
    drop_caches()
    phases.set_hook(clock)
    started = time.monotonic()
    try:
        result = cycle.sync(runner, config, GROUP, say=lambda t: say(f"  dmrepl: {t}"), **kw)
    finally:
        phases.set_hook(None)
    seconds = time.monotonic() - started
    sites: dict[str, Any] = {}
    for site in result.sites:
        if site.state != "in sync":
            raise RuntimeError(f"site {site.site} is {site.state}: {site.detail}")
        transfers = [d.transfer for d in site.delivered if d.transfer is not None]
        sites[site.site] = {
            "stream_bytes": sum(t.stream_bytes for t in transfers),
            "wire_bytes": sum(t.wire_bytes for t in transfers),
            "seconds": round(sum(t.seconds for t in transfers), 3),
            "data_bytes": sum(d.data_bytes for d in site.delivered),
        }
    capture = None
    if "capture" in clock.first and "captured" in clock.first:
        capture = round(clock.first["captured"] - clock.first["capture"], 3)
    return {
        "seconds": round(seconds, 3),
        "capture_s": capture,
        "changed_bytes": result.changed_bytes,
        "sites": sites,
    }


def run_guest(out: Path, plan: Plan, deps: Path) -> int:
    from tests.kernel.netlab import DR_IP, NetLab
    from tests.kernel.stacks import Bed

    runner = Runner(timeout_s=900)
    workdir = Path(tempfile.mkdtemp(prefix="dmrepl-rbench-", dir="/tmp"))
    rng = random.Random(20261201)
    size = plan.origin_bytes
    payload: dict[str, Any] = {"kernel": os.uname().release, "origin_bytes": size}
    results = out / RESULTS_FILE

    def say(text: str) -> None:
        print(text, flush=True)

    def save() -> None:
        results.write_text(json.dumps(payload, indent=1))

    with NetLab() as lab, loops(runner, workdir) as make_loop, ExitStack() as teardown:
        sshd = lab.start_sshd()
        bed = Bed(workdir, runner, make_loop, group=GROUP)
        teardown.callback(bed.teardown)
        meta = max(4 * MiB, metadata_size(size // 512, ERA_BLOCK // 512).required_sectors * 512)
        bed.add_device(
            DEVICE, origin_mib=size // MiB, metadata=make_loop("meta", -(-meta // MiB) * MiB)
        )
        replicas: dict[str, str] = {}
        for name, compress in SITES.items():
            replica = make_loop(f"replica-{name}", size)
            replicas[name] = replica
            receiver = workdir / f"receiver-{name}.toml"
            receiver.write_text(
                f'[dmrepl]\nstate_dir = "{workdir / f"dr-state-{name}"}"\n'
                f'[receive.{GROUP}.replica]\n{DEVICE} = "{replica}"\n'
            )
            client = sshd.authorize(
                f"PYTHONPATH={ROOT} exec {sys.executable} -m dmrepl serve --stdio "
                f"--group {GROUP} --config {receiver}"
            )
            bed.add_site(
                name, "ssh", {DEVICE: replica}, host=DR_IP, ssh_options=client.options,
                compress=compress, stall_timeout="10m",
            )  # fmt: skip
        base = Baselines(workdir, sshd.authorize(f"sh {workdir / 'baseline.sh'}").argv)
        anything = sshd.authorize("$SSH_ORIGINAL_COMMAND")
        scratch = make_loop("scratch", size)
        bed.cli("up")
        gate = f"/dev/mapper/{DEVICE}"
        config = bed.config
        payload["ssh"] = subprocess.run(
            ["ssh", "-V"], capture_output=True, text=True, check=False
        ).stderr.strip()

        say("seed: four ssh sites, zeroed targets")
        payload["seed"] = timed_sync(runner, config, say, target_zeroed=True)
        payload["empty"] = timed_sync(runner, config, say)
        save()

        runs = scattered_runs(rng, size, plan.ship_fraction)
        write_runs(gate, runs)
        say(f"ship (random): {len(runs)} runs, {sum(s for _, s in runs)} bytes")
        payload["random"] = timed_sync(runner, config, say)
        payload["random"]["runs"] = len(runs)
        payload["random"]["replicas_match"] = same_content(gate, replicas["none"], size)
        save()
        say("ship (random): ssh + dd baselines")
        payload["random_ssh"] = ssh_baselines(base, gate, replicas["none"], scratch, runs)
        save()

        say("ship (ext4): mkfs.ext4 -d")
        image = workdir / "ext4.img"
        with image.open("wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-d", EXT4_CONTENT, str(image)], check=True)
        ext4_runs = nonzero_runs(str(image), size)
        copy_runs(str(image), gate, ext4_runs)
        image.unlink()
        say(f"ship (ext4): {len(ext4_runs)} runs, {sum(s for _, s in ext4_runs)} bytes")
        payload["ext4"] = timed_sync(runner, config, say)
        payload["ext4"]["runs"] = len(ext4_runs)
        payload["ext4"]["replicas_match"] = all(
            same_content(gate, r, size) for r in replicas.values()
        )
        drop_caches()
        payload["ext4_dd_stream_s"] = base.run(stream_script(scratch), feed_ranges(gate, ext4_runs))
        save()

        say("catch-up: one site left; prime the baselines' replicas")
        for name in SITES:
            if name != CATCHUP_SITE:
                del bed.sites[name]
        bed.write()
        blocksync_replica = replicas["none"]
        script_replica = replicas["lz4"]
        for replica in (blocksync_replica, script_replica):
            hash_compare_copy(gate, replica)
        blocks = scattered_blocks(rng, size, plan.catchup_fraction)
        write_runs(gate, blocks)
        say(f"catch-up: {len(blocks)} era blocks changed; dmrepl sync")
        catchup = timed_sync(runner, config, say)
        catchup["blocks"] = len(blocks)
        catchup["replica_matches"] = same_content(gate, replicas[CATCHUP_SITE], size)
        payload["catchup"] = catchup
        save()

        say("catch-up: ssh hash compare (blake2b, 1 MiB)")
        drop_caches()
        started = time.monotonic()
        script = ssh_hash_compare(anything.argv(), workdir / "hashsrv.py", gate, script_replica)
        script["seconds"] = round(time.monotonic() - started, 3)
        script["replica_matches"] = same_content(gate, script_replica, size)
        payload["hash_script"] = script
        save()

        if (deps / "blocksync").is_dir():
            say("catch-up: blocksync 3.0.1 local_to_remote")
            drop_caches()
            started = time.monotonic()
            try:
                done = run_blocksync(deps, anything.key, gate, blocksync_replica, lab)
                done["seconds"] = round(time.monotonic() - started, 3)
                done["replica_matches"] = same_content(gate, blocksync_replica, size)
                done["chunks_differing_after"] = differing_chunks(gate, blocksync_replica, size)
            except Exception as exc:
                done = {"error": f"{type(exc).__name__}: {exc}"}
            payload["blocksync"] = done
        else:
            payload["blocksync"] = {"error": f"not installed in {deps}"}
        save()
    say("done")
    return 0


# -- host side


def _rate(nbytes: int, seconds: float | None) -> str:
    return "-" if not seconds else f"{nbytes / MiB / seconds:.1f} MiB/s"


def render(payload: dict[str, Any]) -> str:
    random_, base = payload["random"], payload["random_ssh"]
    moved = base["bytes"]
    stream = base["dd_stream_s"]
    lines = [
        f"Ship, random data: {moved / MiB:.0f} MiB in {base['runs']} runs "
        f"({payload['origin_bytes'] // MiB} MiB device)",
        "",
        "| codec | dmrepl ship | MiB/s | ÷ ssh+dd per range | ÷ ssh+dd one stream | wire/stream |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, compress in SITES.items():
        site = random_["sites"][name]
        s = site["seconds"]
        lines.append(
            f"| {compress} | {s:.1f} s | {_rate(moved, s)} | "
            f"{base['dd_ranges_s'] / s:.2f}x | {stream / s:.2f}x | "
            f"{site['wire_bytes'] / site['stream_bytes']:.3f} |"
        )
    lines += [
        "",
        f"ssh + dd, one `dd` per range: {base['dd_ranges_s']:.1f} s"
        f" ({_rate(moved, base['dd_ranges_s'])}); one ssh session with nothing to move"
        f" {base['ssh_setup_s']:.2f} s, one dd start-up {base['dd_startup_s']:.2f} s (it"
        " overlaps the transfer: ssh keeps reading while the next dd starts).",
        f"ssh + one dd, the same bytes as one stream: {stream:.1f} s ({_rate(moved, stream)}).",
        f"ssh into `cat > /dev/null`: {base['cat_null_s']:.1f} s"
        f" ({_rate(moved, base['cat_null_s'])}) default cipher;"
        f" {base['cat_null_aes_s']:.1f} s ({_rate(moved, base['cat_null_aes_s'])}) aes128-gcm.",
        f"whole sync to the four sites: {random_['seconds']:.1f} s (capture"
        f" {random_['capture_s']:.1f} s); empty sync {payload['empty']['seconds']:.1f} s.",
        "",
    ]
    ext4 = payload["ext4"]
    ebytes = ext4["changed_bytes"]
    lines += [
        f"Ship, ext4 image (`mkfs.ext4 -d {EXT4_CONTENT}`): {ebytes / MiB:.0f} MiB"
        f" in {ext4['runs']} runs",
        "",
        "| codec | dmrepl ship | MiB/s (of stream) | ÷ ssh+dd one stream | stream/wire ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, compress in SITES.items():
        site = ext4["sites"][name]
        s = site["seconds"]
        lines.append(
            f"| {compress} | {s:.1f} s | {_rate(site['stream_bytes'], s)} | "
            f"{payload['ext4_dd_stream_s'] / s:.2f}x | "
            f"{site['stream_bytes'] / site['wire_bytes']:.2f} |"
        )
    lines += [
        "",
        f"ssh + one dd, the same bytes as one stream: {payload['ext4_dd_stream_s']:.1f} s.",
        "",
    ]
    catchup, script, bsync = payload["catchup"], payload["hash_script"], payload["blocksync"]
    cs = catchup["seconds"]
    lines += [
        f"Catch-up: {catchup['blocks']} era blocks ({catchup['changed_bytes'] / MiB:.1f} MiB,"
        f" 1 %) changed on the {payload['origin_bytes'] // MiB} MiB device",
        "",
        "| tool | time | tool time ÷ dmrepl time | equal after |",
        "|---|---:|---:|---|",
        f"| dmrepl sync (zstd:3 site) | {cs:.1f} s | 1.00x | {catchup['replica_matches']} |",
        f"| ssh hash compare (blake2b, 1 MiB; sent {script['sent_bytes'] / MiB:.0f} MiB) |"
        f" {script['seconds']:.1f} s | {script['seconds'] / cs:.1f}x |"
        f" {script['replica_matches']} |",
    ]
    if "error" in bsync:
        lines.append(f"| blocksync 3.0.1 | failed: {bsync['error']} | | |")
    else:
        lines.append(
            f"| blocksync 3.0.1 local_to_remote ({bsync['diff_blocks']} of"
            f" {bsync['diff_blocks'] + bsync['same_blocks']} MiB blocks sent) |"
            f" {bsync['seconds']:.1f} s | {bsync['seconds'] / cs:.1f}x |"
            f" {bsync['replica_matches']} |"
        )
        if not bsync["replica_matches"]:
            lines.append(
                f"| (blocksync left {bsync.get('chunks_differing_after')} MiB chunks"
                " differing) | | | |"
            )
    checks = random_["replicas_match"] and ext4["replicas_match"]
    lines += ["", f"every site's replica equals the gate after each ship: {checks}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a 256 MiB device instead of 1 GiB")
    parser.add_argument("--deps", type=Path, default=DEPS, help="where blocksync is installed")
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--render", type=Path, help="print the tables of saved results; no VM")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.guest:
        return run_guest(args.guest, plan, args.deps)
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return 0
    options = (" --quick" if args.quick else "") + f" --deps {args.deps}"
    run = run_guest_half("bench.remote", options, RESULTS_FILE, args.json)
    if run.payload is None:
        return 1
    print(f"\nkernel {run.payload['kernel']}, {run.seconds:.0f} s in all\n")
    if "blocksync" not in run.payload:
        print("incomplete run; raw results:\n" + json.dumps(run.payload, indent=1))
        return run.code or 1
    print(render(run.payload))
    return run.code


if __name__ == "__main__":
    sys.exit(main())
