"""`dmrepl verify` on the real kernel: a flipped byte found (and repaired exactly), no false
alarm while a writer runs on the primary, and the scope of --since-cut."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dmrepl.replication.verify import PIECE_SECTORS
from tests.kernel.netlab import NetLab
from tests.kernel.stacks import Bed
from tests.kernel.test_policies import BLOCK, Writer, read_all, write_direct
from tests.kernel.test_ssh_site import remote

MiB = 2**20


def flip_byte(path: str, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        old = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([old[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def verify(bed: Bed, *args: str, site: str = "dr") -> tuple[int, dict[str, Any]]:
    done = bed.cli("verify", bed.group, "--site", site, "--json", *args, check=False)
    assert done.returncode in (0, 19), done.stdout + done.stderr
    return done.returncode, json.loads(done.stdout)


def test_verify_finds_a_flipped_byte_repairs_exactly_it_and_ignores_live_writes(
    bed: Bed,
) -> None:
    bed.add_device("va", origin_mib=16)
    replicas = bed.add_site("dr")
    bed.cli("up")
    gate, replica = "/dev/mapper/va", replicas["va"]
    write_direct(gate, 0, os.urandom(4 * MiB))
    bed.cli("sync", bed.group)
    writer = Writer(gate, 50, 8 * MiB)  # the primary keeps changing while it is verified
    writer.start()
    try:
        code, clean = verify(bed)
        assert (code, clean["mismatches"], clean["scope"]) == (0, [], "full"), clean
        assert clean["compared_bytes"] == 16 * MiB
        flip_byte(replica, 12 * MiB + 12345)  # beyond the writer's 8 MiB
        code, found = verify(bed)
        piece = (12 * MiB + 12345) // 512 // PIECE_SECTORS * PIECE_SECTORS
        assert code == 19
        assert found["mismatches"] == [{"device": "va", "start": piece, "sectors": PIECE_SECTORS}]
        code, repaired = verify(bed, "--repair")
        assert code == 0, repaired
        assert repaired["repaired_bytes"] == PIECE_SECTORS * 512
        assert repaired["still_differing"] == [] and repaired["ok"] is True
        code, again = verify(bed)
        assert (code, again["mismatches"]) == (0, [])
    finally:
        writer.stop.set()
        writer.join()
    assert writer.error is None
    bed.cli("sync", bed.group)
    assert read_all(replica) == read_all(gate)


def test_since_cut_hashes_only_what_was_written_since(bed: Bed) -> None:
    bed.add_device("vb", origin_mib=16)
    replicas = bed.add_site("dr")
    bed.cli("up")
    gate, replica = "/dev/mapper/vb", replicas["vb"]
    bed.cli("sync", bed.group)  # cut 1: the seed
    write_direct(gate, 5 * BLOCK, os.urandom(BLOCK))
    bed.cli("sync", bed.group)  # cut 2 carries block 5
    flip_byte(replica, 5 * BLOCK + 7)  # in a block written since cut 1
    flip_byte(replica, 200 * BLOCK + 7)  # in one that was not
    code, narrow = verify(bed, "--since-cut", "1")
    assert code == 19 and narrow["scope"] == "since cut 1"
    assert narrow["compared_bytes"] == BLOCK  # block 5 alone
    assert [m["start"] for m in narrow["mismatches"]] == [5 * BLOCK // 512]
    code, full = verify(bed, "--full")
    assert code == 19 and len(full["mismatches"]) == 2
    refused = bed.cli("verify", bed.group, "--site", "dr", "--since-cut", "99", check=False)
    assert refused.returncode == 10 and "has no cut 99" in refused.stderr


def test_verify_over_ssh_hashes_at_the_receiver_and_repairs_through_its_journal(
    bed: Bed, netlab: NetLab, make_loop: Callable[[str, int], str]
) -> None:
    dr = remote(bed, netlab, make_loop, {"vs": 16})
    bed.cli("sync", bed.group)  # seeds it
    code, clean = verify(bed)
    assert (code, clean["mismatches"]) == (0, [])
    replica = dr.replicas["vs"]
    flip_byte(replica, 9 * MiB + 1)
    code, found = verify(bed, "--repair")
    piece = 9 * MiB // 512
    assert code == 0, found
    assert found["mismatches"] == [{"device": "vs", "start": piece, "sectors": PIECE_SECTORS}]
    assert found["repaired_bytes"] == PIECE_SECTORS * 512
    assert read_all(replica) == read_all("/dev/mapper/vs")


def test_a_dir_site_verifies_its_chain(bed: Bed, workdir: Path) -> None:
    bed.add_device("vd", origin_mib=16)
    vault = workdir / "vault"
    vault.mkdir()
    bed.add_site("vault", transport="dir", path=str(vault))
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_direct("/dev/mapper/vd", 0, os.urandom(BLOCK))
    bed.cli("sync", bed.group)
    code, whole = verify(bed, site="vault")
    assert (code, whole["scope"], whole["cut"], whole["problems"]) == (0, "chain", 2, [])
    newest = max(vault.iterdir())
    damaged = bytearray(newest.read_bytes())
    damaged[-64] ^= 0xFF
    newest.write_bytes(bytes(damaged))
    code, broken = verify(bed, site="vault")
    assert code == 19 and broken["problems"][0].startswith(newest.name), broken
