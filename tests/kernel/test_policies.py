"""The replicator's site-link policies on the real kernel: synchronous mirror legs, their
failure and rejoin, fall-behind limits and the stall policy."""

from __future__ import annotations

import json
import mmap
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass

import pytest

from dmrepl import dm
from dmrepl.executor import Runner
from dmrepl.policy import Backlog
from dmrepl.probe import write_counters
from dmrepl.replication.backlog import site_backlog
from dmrepl.state import SiteMode, SiteModeRecord, StateStore
from tests.kernel.stacks import Bed

MiB = 2**20
BLOCK = 64 * 1024
SECTORS_16M = 16 * MiB // 512


def write_direct(path: str, offset: int, data: bytes) -> float:
    """Write `data` at `offset` with O_DIRECT|O_SYNC; returns the seconds it took."""
    aligned = mmap.mmap(-1, len(data))  # O_DIRECT wants an aligned buffer
    aligned.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        started = time.monotonic()
        os.pwrite(fd, aligned, offset)
        return time.monotonic() - started
    finally:
        os.close(fd)
        aligned.close()


def write_completes(path: str, offset: int, data: bytes, within_s: float) -> bool:
    """Whether a `write_direct` returns within `within_s` (a held write would block: it runs
    in a thread that is left behind if it does)."""
    writing = threading.Thread(target=write_direct, args=(path, offset, data), daemon=True)
    writing.start()
    writing.join(within_s)
    return not writing.is_alive()


def read_all(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        chunks = []
        while chunk := os.read(fd, 4 * MiB):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def reload(runner: Runner, name: str, table: str) -> None:
    """Swap the live table of dm device `name` (under a mirror leg: I/O waits meanwhile)."""
    runner.run(dm.load(name, table))
    runner.run(dm.suspend(name))
    runner.run(dm.resume(name))


def site_status(bed: Bed, site: str = "dr") -> dict[str, object]:
    """The site's entry in `dmrepl status --json`."""
    shown = json.loads(bed.cli("status", bed.group, "--json").stdout)
    return next(s for s in shown["sites"] if s["site"] == site)


def test_synchronous_site_has_every_write_before_it_completes(
    bed: Bed,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    bed.add_device("sa", origin_mib=16)
    replica = make_loop("sa-replica", 16 * MiB)
    delay_ms = 60
    slow = make_dm("slow", f"0 {SECTORS_16M} delay {replica} 0 {delay_ms}")
    cleanup.callback(bed.teardown)  # the stack goes before the device under its leg
    bed.add_site("dr", replicas={"sa": slow}, policy="synchronous")
    bed.cli("up")
    gate = "/dev/mapper/sa"
    before = [write_direct(gate, i * BLOCK, os.urandom(4096)) for i in range(5)]
    first = bed.cli("sync", bed.group)
    assert "site dr: joined the mirror at cut 2: synchronous" in first.stderr, first.stderr
    latencies = [write_direct(gate, i * BLOCK + 8192, os.urandom(4096)) for i in range(20)]
    print(
        f"4 KiB O_DIRECT write to the gate: before joining max {max(before) * 1000:.1f} ms; "
        f"synchronous min {min(latencies) * 1000:.1f} ms, "
        f"mean {sum(latencies) / len(latencies) * 1000:.1f} ms (replica delay {delay_ms} ms)"
    )
    assert min(latencies) >= delay_ms / 1000 * 0.95
    burst = os.urandom(3 * MiB)
    write_direct(gate, 5 * MiB, burst)
    # No cycle ran since: the mirror leg has every write.
    assert read_all(replica) == read_all(gate)
    preview = bed.cli("sync", bed.group, "--dry-run")
    assert "mirror legs; marked at the cut" in preview.stdout, preview.stdout
    again = bed.cli("sync", bed.group)
    assert "joined the mirror" not in again.stderr
    assert "synchronous: its replicas are mirror legs" in again.stdout
    rebuilt = bed.cli("up")  # the joined mirror is the configured stack
    assert "create" not in rebuilt.stdout + rebuilt.stderr
    bed.cli("down")
    assert not [name for name in bed.owned() if name.startswith("sa")]
    status = bed.cli("status", bed.group, "--json")
    assert '"in sync"' in status.stdout


def test_failed_leg_goes_asynchronous_and_rejoins_after_catching_up_by_era(
    bed: Bed,
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    bed.add_device("sb", origin_mib=16)
    replica = make_loop("sb-replica", 16 * MiB)
    leg = make_dm("leg", f"0 {SECTORS_16M} linear {replica} 0")
    cleanup.callback(bed.teardown)  # the stack goes before the device under its leg
    bed.add_site("dr", replicas={"sb": leg}, policy="synchronous")
    bed.cli("up")
    gate = "/dev/mapper/sb"
    assert "joined the mirror" in bed.cli("sync", bed.group).stderr
    write_direct(gate, 0, os.urandom(BLOCK))  # block 0, through the mirror
    reload(runner, leg.removeprefix("/dev/mapper/"), f"0 {SECTORS_16M} error\n")
    changed_blocks = {0}
    for block in (3, 7, 8, 100):  # the application's writes succeed on the origin
        write_direct(gate, block * BLOCK, os.urandom(BLOCK))
        changed_blocks.add(block)
    mirror = runner.run(dm.status("sb-mirror")).stdout
    assert " D" in mirror.split(" 1 ", 1)[-1] or "DA" in mirror or "AD" in mirror, mirror
    preview = bed.cli("sync", bed.group, "--dry-run")
    assert "every synchronous site leaves the mirror" in preview.stdout, preview.stdout
    failed = site_status(bed)
    # Five 64 KiB writes since its cut (the block layer may count one write as several ios).
    ios = failed["outstanding_ios"]
    assert failed["mode"] == "A" and failed["outstanding_sectors"] == 5 * 128, failed
    assert isinstance(ios, int) and ios >= 5
    lines = bed.cli("status", bed.group, "--format", "replicator").stdout.splitlines()
    assert f"{bed.group}-replicator: " in lines[0] and f" A,{ios},640 " in lines[0], lines
    assert lines[1].startswith("sb: 0 32768 replicator-dev ") and " W," in lines[1], lines
    reload(runner, leg.removeprefix("/dev/mapper/"), f"0 {SECTORS_16M} linear {replica} 0\n")
    counters = write_counters(replica)
    assert counters is not None
    caught_up = bed.cli("sync", bed.group)
    after = write_counters(replica)
    assert after is not None
    written = (after.sectors - counters.sectors) * 512
    print(
        f"catch-up wrote {written} bytes to the replica for {len(changed_blocks)} changed "
        f"blocks of {BLOCK} bytes"
    )
    assert "left the mirror" in caught_up.stderr, caught_up.stderr
    assert "joined the mirror" in caught_up.stderr, caught_up.stderr
    assert written == len(changed_blocks) * BLOCK
    assert read_all(replica) == read_all(gate)
    joined = site_status(bed)
    assert (joined["mode"], joined["outstanding_ios"]) == ("S", 0), joined
    lines = bed.cli("status", bed.group, "--format", "replicator").stdout.splitlines()
    assert " S,0,0 " in lines[0] and lines[1].endswith(" A,32/32"), lines  # 512 KiB regions
    table = runner.run(dm.table("sb-mirror")).stdout
    assert table.startswith(f"0 {SECTORS_16M} mirror core 2 ") and " nosync " in table, table
    write_direct(gate, 50 * BLOCK, os.urandom(BLOCK))
    assert read_all(replica) == read_all(gate)


class Writer(threading.Thread):
    """Writes 4 KiB O_DIRECT blocks to `path` at about `rate` a second until stopped;
    records each write's latency."""

    def __init__(self, path: str, rate: float, span_bytes: int):
        super().__init__(daemon=True)
        self.path, self.rate, self.span = path, rate, span_bytes
        self.latencies: list[float] = []
        self.blocks: set[int] = set()  # the 64 KiB blocks written
        self.error: OSError | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        offset = 0
        while not self.stop.is_set():
            try:
                self.latencies.append(write_direct(self.path, offset, os.urandom(4096)))
            except OSError as exc:
                self.error = exc
                return
            self.blocks.add(offset // BLOCK)
            offset = (offset + BLOCK) % self.span
            self.stop.wait(1 / self.rate)


def test_a_leg_that_fails_under_a_running_writer_never_fails_a_write(
    bed: Bed,
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    bed.add_device("sw", origin_mib=16)
    replica = make_loop("sw-replica", 16 * MiB)
    leg = make_dm("wleg", f"0 {SECTORS_16M} linear {replica} 0")
    cleanup.callback(bed.teardown)
    bed.add_site("dr", replicas={"sw": leg}, policy="synchronous")
    bed.cli("up")
    assert "joined the mirror" in bed.cli("sync", bed.group).stderr
    writer = Writer("/dev/mapper/sw", 40, 8 * MiB)
    writer.start()
    time.sleep(1)
    reload(runner, leg.removeprefix("/dev/mapper/"), f"0 {SECTORS_16M} error\n")  # mid-write
    time.sleep(1.5)
    writer.stop.set()
    writer.join()
    assert writer.error is None, writer.error
    assert site_status(bed)["mode"] == "A"
    reload(runner, leg.removeprefix("/dev/mapper/"), f"0 {SECTORS_16M} linear {replica} 0\n")
    before = write_counters(replica)
    caught_up = bed.cli("sync", bed.group)
    after = write_counters(replica)
    assert before is not None and after is not None
    written = (after.sectors - before.sectors) * 512
    print(
        f"{len(writer.latencies)} writes, none failed; catch-up wrote {written} bytes for "
        f"{len(writer.blocks)} changed blocks"
    )
    assert "joined the mirror" in caught_up.stderr, caught_up.stderr
    assert written == len(writer.blocks) * BLOCK
    assert read_all(replica) == read_all("/dev/mapper/sw")
    assert site_status(bed)["mode"] == "S"


def backlog_now(bed: Bed, site: str) -> Backlog | None:
    store = StateStore.open_readonly(bed.state_dir)
    if store is None:
        return None
    try:
        record = store.site(bed.group, site)
        now = {name: write_counters(f"/dev/mapper/{name}") for name in bed.devices}
        if record is None or any(c is None for c in now.values()):
            return None
        return site_backlog(
            store, bed.group, record.seq, {k: v for k, v in now.items() if v is not None}
        )
    finally:
        store.close()


def cuts_recorded(bed: Bed) -> int:
    store = StateStore.open_readonly(bed.state_dir)
    if store is None:
        return 0
    try:
        return len(store.cuts(bed.group))
    finally:
        store.close()


def start_run(bed: Bed) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "dmrepl", "run", bed.group, "--interval", "1h",
         "--config", str(bed.config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def stop_run(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    return stderr


POLL_S = 0.5  # the run loop asks whether a site is over its limit this often
# From a look of the run loop that finds a site over its limit to the writers being held:
# the cycle's start (probes and ioctls: about 0.1 s in the guest, milliseconds natively;
# the margin is for a loaded host).
START_S = 3.0


@pytest.mark.parametrize("kind", ["ios", "size", "timeout"])
def test_fall_behind_limit_switches_a_slowed_site_to_synchronous_and_back(
    bed: Bed,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
    kind: str,
) -> None:
    limits: dict[str, object] = {"ios": 40, "size": "256KiB", "timeout": "3s"}
    bed.add_device("fa", origin_mib=16)
    replica = make_loop("fa-replica", 16 * MiB)
    slow = make_dm("fslow", f"0 {SECTORS_16M} delay {replica} 0 20")
    cleanup.callback(bed.teardown)
    bed.add_site("dr", replicas={"fa": slow}, fall_behind={kind: limits[kind]})
    bed.cli("up")
    bed.cli("sync", bed.group)  # seeded: the site is at cut 1
    rate = 30.0
    writer = Writer("/dev/mapper/fa", rate, 8 * MiB)
    run = start_run(bed)
    worst = Backlog(0, 0, 0.0)
    started = time.monotonic()
    try:
        wait_until(lambda: cuts_recorded(bed) >= 2, 180)  # the run loop's first cycle is done
        writer.start()
        started = time.monotonic()
        # At least 12 s of writes; then on until the site was driven synchronously and
        # released (a loaded host can take longer), so the stop never lands in a held cycle.
        while time.monotonic() - started < 12 or not switched_and_back(bed):
            assert time.monotonic() - started < 180, "no switch to synchronous and back in 180 s"
            now = backlog_now(bed, "dr")
            if now is not None:
                worst = Backlog(
                    max(worst.ios, now.ios), max(worst.sectors, now.sectors),
                    max(worst.age_s, now.age_s),
                )  # fmt: skip
            time.sleep(0.05)
    finally:
        writer.stop.set()
        writer.join()
        writing_s = time.monotonic() - started
        log = stop_run(run)
    store = StateStore.open_readonly(bed.state_dir)
    assert store is not None
    mode = store.site_mode(bed.group, "dr")
    store.close()
    print(
        f"{kind}: worst backlog {worst}; switches {mode.enforced} enforced, "
        f"{mode.released} released; writes {len(writer.latencies)}, "
        f"slowest {max(writer.latencies) * 1000:.0f} ms"
    )
    assert "driven synchronously" in log and "back to its policy (asynchronous)" in log, log
    assert mode.enforced >= 1 and mode.released >= 1
    # Between two looks of the run loop, and while the cycle that follows starts, writes
    # pile up; from then until the site has the cut, writers are held.
    one_cycle = rate * (POLL_S + START_S)
    if kind == "ios":
        assert worst.ios <= 40 + one_cycle
    elif kind == "size":
        assert worst.bytes <= 256 * 1024 + one_cycle * 4096
    else:
        held = max(writer.latencies)
        assert worst.age_s <= 3 + POLL_S + START_S + held
    # The writers went on: most writes were not held.
    assert len(writer.latencies) > rate * writing_s / 3


def switched_and_back(bed: Bed) -> bool:
    """The site was driven synchronously at least once and released at least once."""
    mode = mode_of(bed)
    return mode.enforced >= 1 and mode.released >= 1


def wait_until(predicate: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@dataclass
class StallSite:
    replica: str  # the loop device under the leg
    leg: str  # dm name of the linear (or error) device the site writes
    gate: str


def stall_site(
    bed: Bed,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
    device: str,
    stall_limit: str,
) -> StallSite:
    """A one-device group with a 2 MiB spool and a seeded stall site `dr` whose replica is
    a loop device behind a dm linear `leg` (to be removed or given an error table)."""
    bed.group_fields["spool_size"] = "2MiB"
    bed.add_device(device, origin_mib=16)
    replica = make_loop(f"{device}-replica", 16 * MiB)
    leg = make_dm(f"{device}leg", f"0 {SECTORS_16M} linear {replica} 0")
    cleanup.callback(bed.teardown)  # the stack goes before the device under its leg
    bed.add_site("dr", replicas={device: leg}, policy="stall", stall_limit=stall_limit)
    bed.cli("up")
    bed.cli("sync", bed.group)
    return StallSite(replica, leg.removeprefix("/dev/mapper/"), f"/dev/mapper/{device}")


def mode_of(bed: Bed, site: str = "dr") -> SiteModeRecord:
    store = StateStore.open_readonly(bed.state_dir)
    assert store is not None
    try:
        return store.site_mode(bed.group, site)
    finally:
        store.close()


def test_stall_holds_writers_while_the_spool_is_full_and_releases_them_once_drained(
    bed: Bed,
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    site = stall_site(bed, make_loop, make_dm, cleanup, "st", "60s")
    runner.run(dm.remove(site.leg))  # the site goes away
    write_direct(site.gate, 0, os.urandom(3 * MiB))  # more than the spool holds
    sync = subprocess.Popen(
        [sys.executable, "-m", "dmrepl", "sync", bed.group, "--config", str(bed.config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: dm.is_suspended(runner, "st"), 60)
    writer = Writer(site.gate, 10, 1 * MiB)
    writer.start()
    time.sleep(3)
    assert not writer.latencies, "a write went through while writers were held"
    runner.run(dm.create(site.leg, f"0 {SECTORS_16M} linear {site.replica} 0\n",
                         f"{dm.UUID_PREFIX}test-{site.leg}"))  # fmt: skip
    _, stderr = sync.communicate(timeout=120)
    wait_until(lambda: bool(writer.latencies), 30)
    writer.stop.set()
    writer.join()
    print(f"held write took {writer.latencies[0]:.1f} s; sync said:\n{stderr}")
    assert sync.returncode == 0, stderr
    assert "holding writers until dr has the cut" in stderr
    assert "site dr: reachable again" in stderr
    assert "resync" not in stderr
    # Held: no write went through in the 3 s above (the writer thread may have started
    # its first write later than the sleep did, so its own latency is no lower bound).
    assert writer.latencies[0] < 60
    final = bed.cli("sync", bed.group)
    assert "resync" not in final.stderr
    assert read_all(site.replica) == read_all(site.gate)


def test_a_dead_stalled_site_is_dropped_after_its_bound_and_writers_go_on(
    bed: Bed,
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    site = stall_site(bed, make_loop, make_dm, cleanup, "sd", "4s")
    runner.run(dm.remove(site.leg))  # dead for good
    write_direct(site.gate, 0, os.urandom(3 * MiB))
    started = time.monotonic()
    dropped = bed.cli("sync", bed.group, check=False)
    took = time.monotonic() - started
    print(f"sync with a dead stalled site took {took:.1f} s:\n{dropped.stderr}")
    assert "holding writers until dr has the cut (at most 4 s)" in dropped.stderr
    assert "site dr: dropped" in dropped.stderr, dropped.stderr
    assert not dm.is_suspended(runner, "sd")
    assert write_completes(site.gate, 0, os.urandom(4096), within_s=30)  # writers go on
    assert mode_of(bed).dropped == 1
    again = bed.cli("sync", bed.group, check=False)
    assert "holding writers" not in again.stderr  # not waited for again until it is back


def test_a_stalled_site_whose_apply_fails_is_dropped_then_catches_up_when_back(
    bed: Bed,
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    cleanup: ExitStack,
) -> None:
    site = stall_site(bed, make_loop, make_dm, cleanup, "sf", "60s")
    reload(runner, site.leg, f"0 {SECTORS_16M} error\n")  # there, but every write fails
    write_direct(site.gate, 0, os.urandom(3 * MiB))
    failed = bed.cli("sync", bed.group, check=False)
    assert "holding writers until dr has the cut" in failed.stderr
    assert "site dr: dropped: did not get cut" in failed.stderr, failed.stderr
    assert mode_of(bed).dropped == 1
    again = bed.cli("sync", bed.group, check=False)
    assert "holding writers" not in again.stderr  # not held for, nor the spool kept for it
    reload(runner, site.leg, f"0 {SECTORS_16M} linear {site.replica} 0\n")
    back = bed.cli("sync", bed.group)  # the journal kept what the failed apply had
    assert "finished applying cut 2 from its journal" in back.stdout, back.stdout
    assert "site dr: in sync" in back.stdout, back.stdout
    caught_up = bed.cli("sync", bed.group)
    assert "caught up after being dropped" in caught_up.stderr, caught_up.stderr
    assert mode_of(bed).mode is SiteMode.NORMAL
    assert read_all(site.replica) == read_all(site.gate)
