"""Benchmark: the peak memory of `dmrepl sync` shipping a 2 GiB delta (issue 20, goal 6).

    .venv/bin/python -m bench.memory [--size-mib N] [--json PATH]

The guest half builds one group of one device (a sparse loop file of SIZE + 256 MiB on the
host's disk, not the guest's RAM, with 64 KiB era blocks) and two sites, a `blockdev` site
(pit -> spool -> journal -> replica) and a `dir` site (pit -> spool -> a file), seeds both
while the device is still all zeros, writes SIZE of random data through the gate, and runs
one `dmrepl sync` as its own process: its peak resident set (the kernel's ru_maxrss, from
wait4) is what the goal bounds, at most 150 MB. `dmrepl --version` in the same way gives
the interpreter and imports alone, for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.replication import loops
from dmrepl import vm
from dmrepl.executor import Runner

MiB = 1024 * 1024
GOAL_MB = 150
RESULTS_FILE = "memory.json"


def peak_rss(argv: list[str]) -> tuple[int, float, int]:
    """Run `argv`; (exit code, seconds, its peak resident set in bytes)."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if process.stderr is not None:
        process.stderr.close()
    return os.waitstatus_to_exitcode(status), time.monotonic() - started, usage.ru_maxrss * 1024


def write_random(gate: str, size: int) -> None:
    block = os.urandom(4 * MiB)
    fd = os.open(gate, os.O_WRONLY)
    try:
        for offset in range(0, size, len(block)):
            os.pwrite(fd, block[: min(len(block), size - offset)], offset)
            block = block[1:] + block[:1]  # no two chunks alike
        os.fsync(fd)
    finally:
        os.close(fd)


def run_guest(out: Path, size: int) -> int:
    from tests.kernel.stacks import Bed  # the kernel tests' config-over-loop-devices helper

    runner = Runner(timeout_s=1800)
    payload: dict[str, Any] = {"kernel": os.uname().release, "delta_bytes": size}
    with loops(runner, out) as make_loop:
        bed = Bed(out, runner, make_loop)
        try:
            origin_mib = size // MiB + 256
            bed.add_device("mem", origin_mib=origin_mib)
            bed.add_site("dr")
            (out / "vault").mkdir()
            bed.add_site("vault", transport="dir", path=str(out / "vault"))
            bed.group_fields["spool_size"] = f"{2 * origin_mib}MiB"
            bed.write()
            bed.cli("up")
            bed.cli("sync", bed.group)  # the seeds, of an all-zero device
            write_random("/dev/mapper/mem", size)
            config = str(bed.config)
            base = [sys.executable, "-m", "dmrepl"]
            payload["imports_only"] = peak_rss([*base, "--version"])[2]
            code, seconds, rss = peak_rss([*base, "sync", bed.group, "--config", config])
            payload |= {"sync_exit": code, "sync_seconds": seconds, "sync_peak_rss": rss}
        finally:
            bed.teardown()
    (out / RESULTS_FILE).write_text(json.dumps(payload))
    return 0


def render(payload: dict[str, Any]) -> str:
    rss = payload["sync_peak_rss"] / 1e6
    verdict = "met" if rss <= GOAL_MB and payload["sync_exit"] == 0 else "NOT met"
    return "\n".join([
        f"kernel {payload['kernel']}",
        f"delta shipped to a blockdev and a dir site: {payload['delta_bytes'] / MiB:.0f} MiB",
        f"dmrepl sync: exit {payload['sync_exit']}, {payload['sync_seconds']:.1f} s, "
        f"peak RSS {rss:.2f} MB (goal <= {GOAL_MB} MB: {verdict})",
        f"dmrepl --version alone: peak RSS {payload['imports_only'] / 1e6:.2f} MB",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=2048, help="the delta (default 2048)")
    parser.add_argument("--json", type=Path, help="also copy the raw results here")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.guest:
        return run_guest(args.guest, args.size_mib * MiB)
    # On the host's disk: the guest's /tmp is its RAM, too small for the files.
    out = Path(tempfile.mkdtemp(prefix="dmrepl-bench-mem-", dir="/var/tmp"))
    try:
        command = f"{sys.executable} -m bench.memory --size-mib {args.size_mib} --guest {out}"
        code = vm.run_in_vm(command, rwdirs=[out])
        results = out / RESULTS_FILE
        if not results.exists():
            print(f"the VM wrote no results (exit code {code})", file=sys.stderr)
            return 1
        payload = json.loads(results.read_text())
    finally:
        subprocess.run(["rm", "-rf", str(out)], check=False)
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
    print(render(payload))
    return code or (0 if payload["sync_exit"] == 0 else 1)


if __name__ == "__main__":
    sys.exit(main())
