"""Replication on the real kernel: sync, kill -9 at every phase, outages, locks, corruption."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmrepl import builder, delta, dm, phases
from dmrepl.config import load_config
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.demo import write_random
from dmrepl.lock import group_lock
from dmrepl.sites import SiteContext, open_site
from dmrepl.stack import Layer, layer_name
from dmrepl.statedir import StateDir
from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed

MiB = 2**20
BLOCK = 64 * 1024


def digest(path: str) -> str:
    """sha256 of a whole device, read past the page cache."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        while chunk := os.read(fd, 4 * MiB):
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest()


@pytest.fixture
def pit_digests() -> Iterator[list[dict[str, str]]]:
    """Records the digest of every `-pit` image at the moment a capture is complete."""
    seen: list[dict[str, str]] = []

    def hook(phase: str) -> None:
        if phase == "captured":
            found = {}
            for name in os.listdir("/dev/mapper"):
                if name.endswith("-pit"):
                    found[name.removesuffix("-pit")] = digest(f"/dev/mapper/{name}")
            seen.append(found)

    phases.set_hook(hook)
    yield seen
    phases.set_hook(None)


def sync(bed: Bed, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return bed.cli("sync", bed.group, *args, check=check)


def test_ext4_replica_equals_each_cut_and_mounts_clean(
    bed: Bed, workdir: Path, pit_digests: list[dict[str, str]]
) -> None:
    bed.add_device("ra", origin_mib=48)
    replicas = bed.add_site("dr")
    bed.cli("up")
    gate, replica = "/dev/mapper/ra", replicas["ra"]
    subprocess.run(["mkfs.ext4", "-q", gate], check=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", gate, str(mnt)], check=True)
    try:
        expected: dict[str, bytes] = {}
        for cycle in range(3):
            for i in range(3):
                data = os.urandom(200_000 + cycle * 1000 + i)
                (mnt / f"c{cycle}-{i}").write_bytes(data)
                expected[f"c{cycle}-{i}"] = data
            os.sync()
            result = sync(bed)
            assert "site dr: in sync" in result.stdout, result.stdout
            assert digest(replica) == pit_digests[-1]["ra"], f"cycle {cycle}"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    fsck = subprocess.run(["fsck.ext4", "-fn", replica], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["mount", "-o", "ro,noload", replica, str(mnt)], check=True)
    try:
        for name, data in expected.items():
            assert (mnt / name).read_bytes() == data, name
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    # the first cycle seeded, the next two shipped only deltas from the spool
    status = bed.cli("status").stdout
    assert "site " + bed.group + "/dr (blockdev, asynchronous): in sync; holds cut 3" in status


def write_raw(gate: str, blocks: list[int]) -> None:
    for block in blocks:
        write_random(gate, block * BLOCK + 4096, 8192)


@pytest.fixture
def pair(bed: Bed) -> Bed:
    """A two-device group with one blockdev site, seeded."""
    bed.add_device("pa")
    bed.add_device("pb")
    bed.add_site("dr")
    bed.cli("up")
    sync(bed)
    return bed


def site_digests(bed: Bed, site: str) -> dict[str, str]:
    replicas = bed.sites[site]["replica"]
    assert isinstance(replicas, dict)
    return {device: digest(path) for device, path in replicas.items()}


def gate_digests(bed: Bed) -> dict[str, str]:
    return {device: digest(f"/dev/mapper/{device}") for device in bed.devices}


@pytest.mark.parametrize("phase", ["capture", "captured", "journal-write", "apply", "cursor"])
def test_kill_9_at_each_phase_leaves_a_cut_and_the_next_sync_catches_up(
    pair: Bed, phase: str
) -> None:
    before = gate_digests(pair)
    assert site_digests(pair, "dr") == before
    write_raw("/dev/mapper/pa", [1, 7, 100])
    write_raw("/dev/mapper/pb", [3])
    after = gate_digests(pair)
    pair.killed_at(phase, "sync", pair.group)
    # What any next run does first at the site: finish a committed journal. The replicas then
    # hold exactly one cut: the one before the killed cycle, or the one it took.
    group = load_config(pair.config).groups[pair.group]
    stacks = builder.survey(pair.runner, [group], check=False).stacks
    open_site(group.sites[0], SiteContext.of(stacks, StateDir(pair.state_dir))).recover()
    assert site_digests(pair, "dr") in (before, after)
    result = sync(pair)
    assert "site dr: in sync" in result.stdout, result.stdout + result.stderr
    assert site_digests(pair, "dr") == after
    leftovers = [n for n in dm.observe(pair.runner).names if n.endswith("-pit")]
    assert leftovers == []
    for device in ("pa", "pb"):
        assert not dm.is_suspended(pair.runner, device)


def test_a_site_that_was_down_catches_up_in_era_order_while_the_other_kept_up(
    bed: Bed, make_dm: object
) -> None:
    bed.add_device("oa")
    good = bed.add_site("near")
    far_loop = bed.make_loop("far-backing", 32 * MiB)
    sectors = 32 * MiB // 512
    far = make_dm(f"far{os.getpid()}", f"0 {sectors} linear {far_loop} 0")  # type: ignore[operator]
    bed.add_site("far", replicas={"oa": far})
    bed.cli("up")
    sync(bed)
    far_name = Path(far).name
    _load(bed, far_name, f"0 {sectors} error")
    for round_ in range(3):
        write_raw("/dev/mapper/oa", [round_ * 10 + 2, 50])
        result = sync(bed, check=False)
        assert result.returncode == 17, result.stdout + result.stderr
        assert "site near: in sync" in result.stdout
        assert "site far: down" in result.stdout
        assert digest(good["oa"]) == digest("/dev/mapper/oa")
    _load(bed, far_name, f"0 {sectors} linear {far_loop} 0")
    result = sync(bed)
    assert "site far: in sync" in result.stdout, result.stdout
    assert "seeded" not in result.stdout
    assert digest(far) == digest("/dev/mapper/oa")


def test_overflow_ladder_resyncs_a_lagging_site_without_a_full_copy(
    bed: Bed, make_dm: object
) -> None:
    bed.group_fields["spool_size"] = "200KiB"
    bed.add_device("la")
    bed.add_site("near")
    far_loop = bed.make_loop("lfar-backing", 32 * MiB)
    sectors = 32 * MiB // 512
    far = make_dm(f"lfar{os.getpid()}", f"0 {sectors} linear {far_loop} 0")  # type: ignore[operator]
    bed.add_site("far", replicas={"la": far})
    bed.cli("up")
    sync(bed)
    _load(bed, Path(far).name, f"0 {sectors} error")
    for round_ in range(3):
        write_raw("/dev/mapper/la", [round_ * 3, round_ * 3 + 1])  # 2 blocks = 128 KiB a round
        sync(bed, check=False)
    _load(bed, Path(far).name, f"0 {sectors} linear {far_loop} 0")
    result = sync(bed)
    # far had committed cut 2 to its journal before its device failed; the next cuts were
    # evicted from the 200 KiB spool, so it is resynced from cut 2 straight from a fresh cut
    assert "site far: finished applying cut 2 from its journal" in result.stdout
    assert "site far: resync from cut 2" in result.stderr, result.stderr
    assert "site far: in sync" in result.stdout
    assert "seeded" not in result.stdout
    assert digest(far) == digest("/dev/mapper/la")


def _load(bed: Bed, name: str, table: str) -> None:
    subprocess.run(["dmsetup", "load", name, "--table", table], check=True)
    subprocess.run(["dmsetup", "resume", name], check=True)


def test_a_second_sync_exits_busy_and_names_the_holder(pair: Bed) -> None:
    with group_lock(pair.state_dir, pair.group, "test holder"):
        result = sync(pair, check=False)
    assert result.returncode == 7, result.stdout + result.stderr
    assert f"group {pair.group} is busy: pid {os.getpid()} (test holder" in result.stderr
    assert sync(pair).returncode == 0


# Runs the CLI and, when the cycle reaches a phase, waits there until a file appears
# (announcing the wait with FILE.reached): a sync held at a known point of the protocol.
PAUSE_AT_PHASE = """
import os, sys, time
from pathlib import Path
from dmrepl import phases
from dmrepl.cli import main
phase, go = sys.argv[1], Path(sys.argv[2])
def hook(reached):
    if reached == phase:
        go.with_suffix(".reached").touch()
        while not go.exists():
            time.sleep(0.05)
phases.set_hook(hook)
sys.argv = ["dmrepl", *sys.argv[3:]]
main()
"""


def test_a_sync_started_while_another_runs_is_busy_and_the_first_completes(
    pair: Bed, workdir: Path
) -> None:
    write_raw("/dev/mapper/pa", [9])
    args = ["sync", pair.group, "--config", str(pair.config)]
    go = workdir / "go"
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSE_AT_PHASE, "capture", str(go), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not go.with_suffix(".reached").exists():
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the first sync never reached its capture"
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "dmrepl", *args], capture_output=True, text=True
        )
        assert second.returncode == 7, second.stdout + second.stderr  # busy
    finally:
        go.touch()
        out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out + err
    assert site_digests(pair, "dr") == gate_digests(pair)


def test_a_corrupt_spool_delta_is_never_applied(bed: Bed, make_dm: object) -> None:
    bed.add_device("xa")
    far_loop = bed.make_loop("xfar-backing", 32 * MiB)
    sectors = 32 * MiB // 512
    far = make_dm(f"xfar{os.getpid()}", f"0 {sectors} linear {far_loop} 0")  # type: ignore[operator]
    bed.add_site("far", replicas={"xa": far})
    bed.add_site("near")
    bed.cli("up")
    sync(bed)
    subprocess.run(["dmsetup", "remove", Path(far).name], check=True)  # far is gone
    write_raw("/dev/mapper/xa", [4, 5])
    sync(bed, check=False)  # the delta stays in the spool for far
    (spooled,) = sorted(StateDir(bed.state_dir).spool(bed.group).glob("*.delta"))
    data = bytearray(spooled.read_bytes())
    data[len(data) // 2] ^= 0xFF
    spooled.write_bytes(bytes(data))
    table = f"0 {sectors} linear {far_loop} 0"
    subprocess.run(["dmsetup", "create", Path(far).name, "--table", table], check=True)
    before = digest(far)
    result = sync(bed, check=False)
    assert "corrupt delta at byte" in result.stdout + result.stderr, result.stdout
    assert digest(far) == before  # nothing of the corrupt delta reached the replica
    result = sync(bed)  # the corrupt file was set aside: the site resyncs from its cut
    assert digest(far) == digest("/dev/mapper/xa")


@pytest.mark.parametrize("journal", ["configured", "default"])
def test_a_corrupt_journal_is_never_applied_and_seed_repairs(
    bed: Bed, workdir: Path, journal: str
) -> None:
    """A configured journal holds the committed delta in its data area; the default one
    refers to the spool file, linked beside it as its payload: either is damaged."""
    fields = {}
    if journal == "configured":
        (workdir / "dr.journal").touch(mode=0o600)
        fields["journal"] = str(workdir / "dr.journal")
    bed.add_device("pa")
    bed.add_device("pb")
    bed.add_site("dr", **fields)
    bed.cli("up")
    sync(bed)
    pair = bed
    before = site_digests(pair, "dr")
    write_raw("/dev/mapper/pa", [2, 3])
    killed = subprocess.run(
        [sys.executable, "-m", "tests.kernel.crashrun", "journal-committed", "sync",
         pair.group, "--config", str(pair.config)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    if journal == "configured":
        damaged, at = workdir / "dr.journal", 8192 + 300
    else:
        damaged, at = StateDir(pair.state_dir).journals / f"{pair.group}.dr.payload", 300
        assert (StateDir(pair.state_dir).journal(pair.group, "dr")).stat().st_size == 8192
    with damaged.open("r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    result = sync(pair, check=False)
    assert result.returncode == 17
    assert "corrupt delta at byte" in result.stdout + result.stderr
    assert site_digests(pair, "dr") == before
    result = pair.cli("seed", pair.group, "--site", "dr")
    assert site_digests(pair, "dr") == gate_digests(pair)


@pytest.mark.parametrize(("block_size", "chunk_sectors"), [("64KiB", 128), ("12KiB", 16)])
def test_pit_chunks_follow_the_era_block_and_an_unaligned_tail_is_replicated(
    bed: Bed, block_size: str, chunk_sectors: int
) -> None:
    """The `-pit` chunk is the era block rounded down to a power of two, at most 64 KiB;
    an origin that ends inside a chunk (and an era block) is still captured to its end."""
    size = 8 * MiB + 12 * 1024
    origin, replica = bed.make_loop("ua-origin", size), bed.make_loop("ua-replica", size)
    bed.add_device("ua", origin=origin, block_size=block_size)
    bed.add_site("dr", replicas={"ua": replica})
    bed.cli("up")
    sync(bed)
    gate = "/dev/mapper/ua"
    write_random(gate, size - 4096, 4096)  # the last sector of the tail
    write_random(gate, 3 * MiB + 512, 1024)
    pit_tables: list[str] = []

    def hook(phase: str) -> None:
        if phase == "captured":
            pit_tables.append(bed.runner.run(dm.table("ua-pit")).stdout)

    phases.set_hook(hook)
    try:
        result = sync(bed)
    finally:
        phases.set_hook(None)
    assert "site dr: in sync" in result.stdout, result.stdout + result.stderr
    (table,) = pit_tables
    assert table.split()[2:3] == ["snapshot"] and table.split()[-1] == str(chunk_sectors)
    assert digest(replica) == digest(gate)


def test_replica_size_must_match_the_origin(bed: Bed) -> None:
    bed.add_device("za")
    small = bed.make_loop("za-small", 16 * MiB)
    bed.add_site("dr", replicas={"za": small})
    bed.cli("up")
    result = sync(bed, check=False)
    assert result.returncode == 17
    assert (
        f"replica {small} of za is 16 MiB (32768 sectors), the origin is 32 MiB (65536 sectors)"
        in result.stdout
    )


def test_dir_site_and_apply_rebuild_the_device(bed: Bed, workdir: Path) -> None:
    bed.add_device("da")
    archive = workdir / "archive"
    archive.mkdir()
    bed.add_site("vault", transport="dir", path=str(archive))
    bed.cli("up")
    write_raw("/dev/mapper/da", [0, 9])
    sync(bed)
    write_raw("/dev/mapper/da", [9, 30])
    sync(bed)
    names = sorted(p.name for p in archive.glob("*.delta"))
    assert names == [
        f"{bed.group}.0000000001.full.delta",
        f"{bed.group}.0000000002.0000000001.delta",
    ]
    # Replicated data is for root only: 0600 files in 0700 directories (issue 13, finding 5).
    for path in [*archive.iterdir(), bed.state_dir, *bed.state_dir.rglob("*")]:
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.lstat().st_mode) == expected, path
    target = bed.make_loop("da-rebuilt", 32 * MiB)
    write_random(target, 5 * MiB, 4096)  # garbage the rebuild must clear
    # `apply` needs no configuration: it runs wherever the archive is (e.g. a recovery host)
    code, stdout, stderr = run_cli_here(
        "apply", str(archive), "--group", bed.group, "--to", f"da={target}"
    )
    assert code == 0, stdout + stderr
    assert f"targets hold cut 2 of {bed.group} (2 deltas" in stdout
    assert digest(target) == digest("/dev/mapper/da")
    assert layer_name("da", Layer.PIT) not in dm.observe(bed.runner).names


def test_apply_refuses_a_target_held_by_another_device(
    make_loop: Callable[[str, int], str], make_dm: Callable[[str, str], str], workdir: Path
) -> None:
    """A target that is in use (here under a dm table; a mount holds it the same way) is
    refused with exit 12 before anything is written: apply opens block devices O_EXCL."""
    archive = workdir / "archive-busy"
    archive.mkdir()
    header = delta.DeltaHeader("g", 1, None, (delta.DeltaDevice("d", 16384, None, 1),), 0.0)
    with (archive / delta_file_name("g", 1, None)).open("wb") as out:
        writer = delta.DeltaWriter(out, header)  # type: ignore[arg-type]
        writer.add(0, 0, b"x" * 4096)
        writer.finish()
    target = make_loop("busy-target", 8 * MiB)
    make_dm("busy-holder", f"0 16384 linear {target} 0")
    before = digest(target)
    code, _, stderr = run_cli_here("apply", str(archive), "--group", "g", "--to", f"d={target}")
    assert code == 12, stderr
    assert f"target for d: {target} is in use" in " ".join(stderr.split())
    image = workdir / "busy-target.img"  # the loop device's backing file (make_loop)
    code, _, stderr = run_cli_here("apply", str(archive), "--group", "g", "--to", f"d={image}")
    assert code == 12, stderr
    assert f"target for d: {image} is attached to {target}" in " ".join(stderr.split())
    assert digest(target) == before
