"""`transport = "ssh"` on the real kernel, over the network lab (tests/kernel/netlab.py): the
primary (this process) spawns OpenSSH to an sshd in the DR namespace, whose forced command
is `dmrepl serve --stdio` granting loop devices as the replicas (block devices are not
namespaced: the DR host's replicas are loop devices of this same kernel).

Numbers are printed as `ssh site: ...` lines (pytest -s shows them).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dmrepl import builder
from dmrepl.config import load_config
from dmrepl.demo import write_random
from dmrepl.journal import COPY_CHUNK, DATA_OFFSET
from dmrepl.sites import SiteContext, open_site
from dmrepl.statedir import StateDir
from dmrepl.units import format_bytes
from tests.kernel.netlab import DR_IP, NetLab, SshClient, Sshd
from tests.kernel.stacks import Bed
from tests.kernel.test_replicate import digest, pit_digests, sync, write_raw

__all__ = ["pit_digests"]  # a fixture used here

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20
CHECKPOINT = 8 * COPY_CHUNK  # the receiver's journal is fsynced and checkpointed this often


def report(what: str) -> None:
    print(f"ssh site: {what}")


@dataclass
class Dr:
    """The DR host: replicas granted by a receiver config, an sshd, and keys for it."""

    bed: Bed
    sshd: Sshd
    config: Path  # the receiver's
    state: StateDir  # the receiver's state directory
    replicas: dict[str, str]  # device -> loop device, on the DR host
    site: dict[str, object]  # the site's other settings (rate, stall_timeout, ...)
    client: SshClient | None = None  # the key the site uses

    def forced_command(self, group: str, kill_at: str | None = None) -> str:
        """`dmrepl serve` for `group`, importing this checkout (the crash runner with
        `kill_at`: a receiver that kills itself with SIGKILL at that phase)."""
        module = ["-m", "dmrepl"] if kill_at is None else ["-m", "tests.kernel.crashrun", kill_at]
        argv = [sys.executable, *module, "serve", "--stdio", "--group", group,
                "--config", str(self.config)]  # fmt: skip
        return f"cd {shlex.quote(str(ROOT))} && PYTHONDONTWRITEBYTECODE=1 exec {shlex.join(argv)}"

    def key(self, group: str | None = None, kill_at: str | None = None) -> SshClient:
        """A new key whose forced command serves `group` (default: the bed's)."""
        return self.sshd.authorize(self.forced_command(group or self.bed.group, kill_at))

    def use(self, client: SshClient, replicas: dict[str, str] | None = None) -> None:
        """(Re)write the primary's site `dr`: the DR host reached with `client`'s options."""
        self.bed.add_site(
            "dr", transport="ssh", replicas=replicas or self.replicas, host=DR_IP, user="root",
            ssh="ssh", ssh_options=client.options, **self.site,
        )  # fmt: skip

    def digests(self) -> dict[str, str]:
        return {device: digest(path) for device, path in self.replicas.items()}

    @property
    def journal(self) -> Path:
        return self.state.journal(self.bed.group, "dr")

    @property
    def staging(self) -> Path:
        return self.state.staging(self.bed.group, "dr")


def remote(
    bed: Bed,
    netlab: NetLab,
    make_loop: Callable[[str, int], str],
    devices: dict[str, int],
    **site: object,
) -> Dr:
    """Devices (name -> MiB) on the primary, replicas granted at the DR host, an ssh site."""
    for name, mib in devices.items():
        bed.add_device(name, origin_mib=mib)
    replicas = {name: make_loop(f"dr-{name}", mib * MiB) for name, mib in devices.items()}
    home = netlab.workdir / "receiver"
    home.mkdir(mode=0o700)
    config = home / "receiver.toml"
    lines = ["[dmrepl]", f'state_dir = "{home / "state"}"', f"[receive.{bed.group}.replica]"]
    config.write_text("\n".join([*lines, *(f'{d} = "{p}"' for d, p in replicas.items())]) + "\n")
    dr = Dr(bed, netlab.start_sshd(), config, StateDir(home / "state"), replicas, site)
    dr.client = dr.key()
    dr.use(dr.client)
    bed.cli("up")
    return dr


def gate_digests(bed: Bed) -> dict[str, str]:
    return {device: digest(f"/dev/mapper/{device}") for device in bed.devices}


WRITER = """
import os, sys, time
n = 0
while True:
    time.sleep(0.02)  # ~2 MiB/s: the guest's one CPU is left to the cycle
    n += 1
    with open(os.path.join(sys.argv[1], "f%02d" % (n % 40)), "wb") as f:
        f.write(os.urandom(48 * 1024))
        os.fsync(f.fileno())
"""


@pytest.fixture
def mounted(workdir: Path) -> Iterator[Callable[[str], Path]]:
    """Mounts a device on a scratch directory; unmounted at teardown."""
    mounts: list[Path] = []

    def mount(device: str) -> Path:
        point = workdir / f"mnt{len(mounts)}"
        point.mkdir()
        subprocess.run(["mount", device, str(point)], check=True)
        mounts.append(point)
        return point

    yield mount
    for point in reversed(mounts):
        subprocess.run(["umount", str(point)], check=False)


def test_ext4_under_writes_each_cycle_lands_the_cut_byte_for_byte_also_with_latency_and_loss(
    bed: Bed,
    netlab: NetLab,
    make_loop: Callable[[str, int], str],
    mounted: Callable[[str], Path],
    pit_digests: list[dict[str, str]],
) -> None:
    dr = remote(bed, netlab, make_loop, {"sa": 48})  # the first cycle seeds it
    gate = "/dev/mapper/sa"
    subprocess.run(["mkfs.ext4", "-q", gate], check=True)
    mnt = mounted(gate)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(mnt)])
    try:
        for link in ("clean", "netem 20 ms, 1 % loss"):
            if link != "clean":
                netlab.netem(delay_ms=20, loss_pct=1)
            for cycle in range(3):
                started = time.monotonic()
                result = sync(bed)
                report(f"sync over a {link} link: {time.monotonic() - started:.1f} s")
                assert "site dr: in sync" in result.stdout, result.stdout
                assert dr.digests() == {"sa": pit_digests[-1]["sa"]}, (link, cycle)
        assert writer.poll() is None, "the writer died"
    finally:
        writer.kill()
        writer.wait()
    # the replica holds the last cut, taken under writes: a crash-consistent ext4
    fsck = subprocess.run(["fsck.ext4", "-fn", dr.replicas["sa"]], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def receivers(netlab: NetLab) -> list[int]:
    """The receivers (`dmrepl serve`) running in the DR namespace."""
    found = []
    for pid in netlab.dr_pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and b"--stdio" in argv:
            found.append(pid)
    return found


def test_a_link_cut_mid_delta_is_down_within_the_stall_timeout_and_the_next_sync_resumes(
    bed: Bed, netlab: NetLab, make_loop: Callable[[str, int], str]
) -> None:
    # Not less: the watchdog counts a session's start too, and in user-mode Linux the
    # receiver's first reply comes 3-8 s after ssh starts (handshake 2 s, Python 1-6 s).
    stall_s = 10
    dr = remote(
        bed, netlab, make_loop, {"ca": 32}, compress="none", rate="4MiB",
        stall_timeout=f"{stall_s}s",
    )  # fmt: skip
    sync(bed)  # the seed: an empty device is a small full image
    # Incompressible: 5 s at 4 MiB/s, so 3 s are left after the first checkpoint (8 MiB)
    # for the cut, two `tc` processes that a loaded host can slow down.
    write_random("/dev/mapper/ca", 4 * MiB, 20 * MiB)
    cut_at: list[tuple[float, float]] = []  # (cut started, cut done)

    def cut_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 60
        while not dr.staging.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        netlab.cut()  # every packet dropped: the transfer stalls, nothing fails
        cut_at.append((started, time.monotonic()))

    cutter = threading.Thread(target=cut_after_the_first_checkpoint)
    cutter.start()
    result = sync(bed, check=False)
    returned = time.monotonic()
    cutter.join()
    assert cut_at, "the link was never cut"
    # The last byte moved while the cut was being made: the watchdog fires stall_s later.
    (cut_started, cut_done) = cut_at[0]
    detected = returned - cut_done
    received = dr.journal.stat().st_size - DATA_OFFSET  # what the receiver wrote before the cut
    (spooled,) = StateDir(bed.state_dir).spool(bed.group).glob("*.0000000001.delta")
    length = spooled.stat().st_size
    report(
        f"cut after {received} of {length} delta bytes had reached the receiver; "
        f"the sync returned {detected:.1f} s after the cut (stall_timeout {stall_s} s)"
    )
    assert result.returncode == 17, result.stdout + result.stderr
    assert "site dr: down" in result.stdout, result.stdout
    assert f"no progress for {stall_s} s (stall_timeout)" in result.stdout + result.stderr
    assert returned - cut_started >= stall_s
    assert detected <= stall_s + 3  # and the sync wraps up without delay
    assert 0 < received < length

    lingered = receivers(netlab)
    netlab.restore()
    restored = time.monotonic()
    deadline = restored + 30  # the cut-off receiver ends when its connection does
    while receivers(netlab) and time.monotonic() < deadline:
        time.sleep(0.1)
    gone = time.monotonic() - restored
    report(f"receivers running at the restore: {len(lingered)}; all gone {gone:.1f} s after")
    resumed = json.loads(dr.staging.read_text())["length"]
    started = time.monotonic()
    result = sync(bed)
    took = time.monotonic() - started
    sent = length - resumed
    remaining = length - received
    report(
        f"resumed past {resumed}: sent {sent} of the delta's {length} bytes, "
        f"{remaining} remained at the cut ({sent - remaining:+d}); second sync {took:.1f} s"
    )
    report(next(line.strip() for line in result.stdout.splitlines() if "site dr:" in line))
    assert "site dr: in sync" in result.stdout, result.stdout
    said = " ".join(result.stdout.split())
    assert f"resumed past {format_bytes(resumed)} received before" in said, said
    assert resumed >= CHECKPOINT
    assert sent <= remaining + CHECKPOINT
    assert dr.digests() == gate_digests(bed)


def recover_remote(bed: Bed) -> None:
    """What every next session does first: let the receiver finish a journal its killed
    predecessor committed."""
    group = load_config(bed.config).groups[bed.group]
    stacks = builder.survey(bed.runner, [group], check=False).stacks
    site = open_site(group.sites[0], SiteContext.of(stacks, StateDir(bed.state_dir)))
    try:
        site.recover()
    finally:
        site.close()


def test_the_receiver_killed_at_each_phase_leaves_a_cut_and_the_next_sync_finishes(
    bed: Bed, netlab: NetLab, make_loop: Callable[[str, int], str]
) -> None:
    dr = remote(bed, netlab, make_loop, {"ka": 16, "kb": 8})
    sync(bed)
    assert dr.client is not None
    for number, phase in enumerate(("hello", "journal-write", "journal-committed", "apply")):
        before = dr.digests()
        write_raw("/dev/mapper/ka", [number, 50 + number, 200])
        write_raw("/dev/mapper/kb", [number + 3])
        new = gate_digests(bed)
        dr.use(dr.key(kill_at=phase))
        result = sync(bed, check=False)
        assert result.returncode == 17, (phase, result.stdout + result.stderr)
        down = [line.strip() for line in result.stdout.splitlines() if "site dr:" in line]
        assert down and down[0].startswith("site dr: down"), (phase, result.stdout)
        report(f"receiver killed at {phase}: {down[0]}")
        dr.use(dr.client)
        if phase == "apply":
            # Some records are on the replicas. What any next session does first: finish
            # applying the journal the killed receiver committed.
            recover_remote(bed)
            assert dr.digests() == new, phase
        else:
            assert dr.digests() == before, phase  # a committed journal is not applied yet
        result = sync(bed)
        assert "site dr: in sync" in result.stdout, (phase, result.stdout)
        if phase == "journal-committed":
            assert "recovered: site dr: finished applying cut" in result.stdout, result.stdout
        assert dr.digests() == new == gate_digests(bed), phase


def test_refusals_are_clear_and_write_nothing(
    bed: Bed, netlab: NetLab, make_loop: Callable[[str, int], str]
) -> None:
    dr = remote(bed, netlab, make_loop, {"ra": 16})
    elsewhere = make_loop("dr-elsewhere", 16 * MiB)  # a device of the DR host not granted
    write_raw("/dev/mapper/ra", [0, 3, 100])
    granted = dr.client
    assert granted is not None
    cases = [
        ("a key for another group", dr.key(group="other"), None,
         f"this key may write group(s) other, not {bed.group}"),
        ("a replica not granted", granted, {"ra": elsewhere},
         f"the primary asks to write {{'ra': '{elsewhere}'}}; this receiver grants"),
        ("a wrong host key", dr.sshd.impostor_known_hosts(granted), None,
         "Host key verification failed"),
        ("a stranger's key", dr.sshd.stranger(), None, "Permission denied (publickey)"),
    ]  # fmt: skip
    untouched = dr.digests() | {"elsewhere": digest(elsewhere)}
    for case, client, replicas, said in cases:
        dr.use(client, replicas=replicas)
        result = sync(bed, check=False)
        shown = result.stdout + result.stderr
        assert result.returncode == 17, (case, shown)
        assert said in " ".join(shown.split()), (case, shown)
        assert dr.digests() | {"elsewhere": digest(elsewhere)} == untouched, case
        assert not dr.journal.exists(), case
        report(f"{case}: {[line for line in result.stdout.splitlines() if 'site dr' in line]}")
    dr.use(granted)
    assert "site dr: in sync" in sync(bed).stdout
    assert dr.digests() == gate_digests(bed)
    assert digest(elsewhere) == untouched["elsewhere"]


def test_seeding_over_ssh_sends_only_the_chunks_that_differ(
    bed: Bed,
    netlab: NetLab,
    make_loop: Callable[[str, int], str],
    pit_digests: list[dict[str, str]],
) -> None:
    dr = remote(bed, netlab, make_loop, {"sd": 32})
    gate, replica = "/dev/mapper/sd", dr.replicas["sd"]
    subprocess.run(["dd", "if=/dev/urandom", f"of={gate}", "bs=1M", "count=32",
                    "oflag=direct", "status=none"], check=True)  # fmt: skip
    subprocess.run(["dd", f"if={gate}", f"of={replica}", "bs=1M", "iflag=direct",
                    "oflag=direct", "status=none"], check=True)  # fmt: skip
    write_raw(gate, [0, 40, 200])  # three 64 KiB blocks in three different 1 MiB chunks
    result = sync(bed)
    assert "site dr: in sync" in result.stdout, result.stdout
    written, compared = format_bytes(3 * MiB), format_bytes(32 * MiB)
    assert f"seeded: {written} written of {compared}" in result.stdout, result.stdout
    assert dr.digests() == {"sd": pit_digests[-1]["sd"]}
    report(f"seed of 32 MiB holding all but 3 chunks: {written} sent")
