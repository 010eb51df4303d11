"""Journal, spool, lock, site config and `apply` on plain files (no device-mapper needed)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl import delta
from dmrepl.config import ConfigError, parse_config
from dmrepl.deltafiles import chain
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.errors import ExitCode, InvalidInput
from dmrepl.journal import SLOT_BYTES, Journal, JournalError, JournalState, decode_header
from dmrepl.lock import Busy, group_lock, lock_holder, takeover_lock
from dmrepl.rebuild import apply_dir
from dmrepl.sites.journaled import JournaledSite
from dmrepl.spool import Spool
from dmrepl.statedir import StateDir
from tests.unit.factories import blockdev_site, one_device_delta, receiver

DEVICE_BYTES = 4 * 2**20


def make_delta(seq: int, base: int | None, writes: list[tuple[int, bytes]]) -> bytes:
    return one_device_delta("g", "d", DEVICE_BYTES // 512, seq, base, writes)


@pytest.fixture
def site(tmp_path: Path) -> JournaledSite:
    replica = tmp_path / "replica.img"
    replica.write_bytes(bytes(DEVICE_BYTES))
    spec = blockdev_site(replicas={"d": str(replica)})
    blockdev = receiver(spec, tmp_path / "state", {"d": DEVICE_BYTES // 512})
    assert isinstance(blockdev, JournaledSite)
    return blockdev


def replica_bytes(site: JournaledSite) -> bytes:
    return Path(site.spec.replicas["d"]).read_bytes()


def pending(site: JournaledSite) -> int | None:
    """A committed but unapplied cut in the site's journal, if any."""
    with Journal(site.journal_path) as journal:
        header = journal.header
    return header.seq if header.state is JournalState.COMMITTED else None


def test_journal_apply_moves_the_replica_and_records_the_cut(site: JournaledSite) -> None:
    assert site.held() is None
    delivery = site.receive(io.BytesIO(make_delta(1, None, [(8, b"a" * 1024)])))
    assert (delivery.seq, delivery.data_bytes) == (1, 1024)
    assert replica_bytes(site)[4096:5120] == b"a" * 1024
    assert site.held() == 1 and pending(site) is None


def test_a_committed_journal_is_replayed_by_the_next_run(site: JournaledSite) -> None:
    data = make_delta(2, 1, [(16, b"b" * 512)])
    site.journal_path.parent.mkdir(parents=True)
    with Journal(site.journal_path) as journal:
        length = journal.stage(io.BytesIO(data))
        journal.commit(length, accept=lambda header: None)  # then the process "dies"
    assert pending(site) == 2 and site.held() is None
    replayed = site.recover()
    assert replayed is not None and replayed.seq == 2
    assert replica_bytes(site)[8192:8704] == b"b" * 512
    assert site.recover() is None  # nothing left to do


def test_a_corrupt_delta_never_reaches_the_replica(site: JournaledSite) -> None:
    data = bytearray(make_delta(1, None, [(0, b"c" * 4096)]))
    data[-100] ^= 1
    with pytest.raises(delta.CorruptDelta, match="corrupt delta at byte"):
        site.receive(io.BytesIO(bytes(data)))
    assert replica_bytes(site) == bytes(DEVICE_BYTES)
    assert pending(site) is None  # never committed


def test_a_torn_header_write_falls_back_to_the_other_slot(site: JournaledSite) -> None:
    site.receive(io.BytesIO(make_delta(1, None, [(0, b"x" * 512)])))
    site.receive(io.BytesIO(make_delta(2, 1, [(0, b"y" * 512)])))
    with Journal(site.journal_path) as journal:
        newest = journal.header.generation % 2
    with site.journal_path.open("r+b") as f:  # tear the newest header
        f.seek(newest * SLOT_BYTES + 10)
        f.write(b"\xff\xff")
    with Journal(site.journal_path) as journal:
        assert journal.header.state is JournalState.COMMITTED  # the slot before it
        assert journal.header.seq == 2


def test_garbage_in_both_header_slots_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(b"\x01" * 3 * SLOT_BYTES)
    with pytest.raises(JournalError, match="neither journal header slot is valid"):
        Journal(path)
    assert decode_header(b"\0" * SLOT_BYTES) is None


def test_spool_listing_chain_and_orphans(tmp_path: Path) -> None:
    spool = Spool(StateDir(tmp_path), "g", cap_bytes=3000)
    assert spool.chain_deltas() == [] and not (tmp_path / "spool").exists()  # reads create none
    spool.prepare()
    for seq, base in ((2, 1), (3, 2), (4, 3)):
        spool.path(seq, base).write_bytes(b"z" * 900)
    listed = spool.chain_deltas()
    assert [(f.seq, f.base_seq, f.size) for f in listed] == [(2, 1, 900), (3, 2, 900), (4, 3, 900)]
    assert [e.seq for e in chain(listed, 1, 4) or []] == [2, 3, 4]
    assert chain(listed, 2, 4) is not None and chain(listed, 0, 4) is None
    spool.delete(listed[:2])
    assert [e.seq for e in spool.chain_deltas()] == [4]
    spool.own_path("far", 5, 1).write_bytes(b"r")
    spool.own_path("far", 5, None).write_bytes(b"f")
    assert [(f.seq, f.base_seq) for f in spool.own_deltas("far")] == [(5, 1), (5, None)]
    assert spool.own_deltas("near") == []
    spool.path(5, 4).write_bytes(b"orphan")  # a capture whose cut was never recorded
    removed = {p.name for p in spool.remove_orphans(last_recorded_seq=4)}
    assert removed == {
        delta_file_name("g", 5, 4),
        "far~" + delta_file_name("g", 5, 1),
        "far~" + delta_file_name("g", 5, None),
    }


def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    assert lock_holder(tmp_path, "g") is None
    with group_lock(tmp_path, "g", "sync"):
        holder = lock_holder(tmp_path, "g")
        assert holder is not None and f"pid {os.getpid()} (sync" in holder
        busy = pytest.raises(Busy, match=r"group g is busy: pid \d+ \(sync")
        with busy as caught, group_lock(tmp_path, "g", "sync"):
            pass
        assert caught.value.exit_code == ExitCode.BUSY
    assert lock_holder(tmp_path, "g") is None


SITES = """
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
[group.db.device.logs]
origin = "/dev/vdd"
metadata = "/dev/vdc"
metadata_offset = "8MiB"
"""


def test_site_config() -> None:
    text = (
        SITES
        + """
[group.db]
spool_size = "1GiB"
[group.db.site.dr]
transport = "blockdev"
journal = "/dev/vdj"
[group.db.site.dr.replica]
data = "/dev/nbd0"
logs = "/dev/nbd1"
[group.db.site.vault]
transport = "dir"
path = "/srv/vault"
"""
    )
    group = parse_config(text, Path("x.toml")).groups["db"]
    dr, vault = group.sites
    assert dr.replicas == {"data": "/dev/nbd0", "logs": "/dev/nbd1"}
    assert (dr.journal, dr.policy, vault.path) == ("/dev/vdj", "asynchronous", "/srv/vault")
    assert group.spool_bytes == 2**30
    assert group.site("vault") is vault
    with pytest.raises(InvalidInput, match="no site 'x'"):
        group.site("x")


def test_site_config_problems_are_all_reported() -> None:
    text = (
        SITES
        + """
[group.db.site.dr]
transport = "ftp"
[group.db.site.sync]
transport = "blockdev"
policy = "synchronous"
[group.db.site.sync.replica]
data = "/dev/vdb"
other = "/dev/nbd9"
[group.db.site.vault]
transport = "dir"
policy = "synchronous"
journal = "/dev/vdj"
"""
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("x.toml"))
    problems = "\n".join(caught.value.problems)
    assert "group.db.site.dr.transport: 'ftp' is not one of blockdev, dir" in problems
    assert "group.db.site.sync.policy" not in problems  # synchronous on a blockdev site
    assert "group.db.site.vault.policy: synchronous needs replicas that are block devices" in (
        problems
    )
    assert "group.db.site.sync.replica.logs: missing" in problems
    assert "group.db.site.sync.replica.other: not a device of this group" in problems
    assert "group.db.site.vault.path: missing" in problems
    assert 'group.db.site.vault.journal: only used with transport = "blockdev"' in problems


def test_replica_may_not_be_an_origin() -> None:
    text = (
        SITES
        + """
[group.db.site.dr]
transport = "blockdev"
[group.db.site.dr.replica]
data = "/dev/vdd"
logs = "/dev/nbd1"
"""
    )
    with pytest.raises(ConfigError, match="problem") as caught:
        parse_config(text, Path("x.toml"))
    assert any("/dev/vdd is also group.db.device.logs.origin" in p for p in caught.value.problems)


def test_apply_rebuilds_from_a_full_image_and_rolls_forward(tmp_path: Path) -> None:
    archive = tmp_path / "vault"
    archive.mkdir()
    (archive / delta_file_name("g", 1, None)).write_bytes(make_delta(1, None, [(0, b"1" * 512)]))
    (archive / delta_file_name("g", 3, 1)).write_bytes(make_delta(3, 1, [(8, b"3" * 512)]))
    (archive / delta_file_name("g", 4, 3)).write_bytes(make_delta(4, 3, [(0, b"4" * 512)]))
    target = tmp_path / "target.img"
    target.write_bytes(b"\xee" * DEVICE_BYTES)
    result = apply_dir(archive, "g", {"d": str(target)}, to_cut=3, say=lambda _: None)
    assert (result.applied, result.cut) == ([1, 3], 3)
    image = target.read_bytes()
    assert image[:512] == b"1" * 512 and image[4096:4608] == b"3" * 512
    assert image[8192:] == bytes(DEVICE_BYTES - 8192)  # zeroed before the full image
    rolled = apply_dir(archive, "g", {"d": str(target)}, from_cut=3, say=lambda _: None)
    assert (rolled.applied, target.read_bytes()[:512]) == ([4], b"4" * 512)


def test_apply_verifies_each_delta_before_writing_it(tmp_path: Path) -> None:
    archive = tmp_path / "vault"
    archive.mkdir()
    (archive / delta_file_name("g", 1, None)).write_bytes(make_delta(1, None, [(0, b"1" * 512)]))
    bad = bytearray(make_delta(2, 1, [(0, b"2" * 512)]))
    bad[-40] ^= 1
    (archive / delta_file_name("g", 2, 1)).write_bytes(bytes(bad))
    target = tmp_path / "target.img"
    target.write_bytes(bytes(DEVICE_BYTES))
    with pytest.raises(delta.CorruptDelta):
        apply_dir(archive, "g", {"d": str(target)}, say=lambda _: None)
    assert target.read_bytes() == bytes(DEVICE_BYTES)  # the whole chain is checked first
    with pytest.raises(InvalidInput, match="do not reach cut 7"):
        apply_dir(archive, "g", {"d": str(target)}, to_cut=7, say=lambda _: None)


def test_a_spool_file_is_staged_by_the_kernel_from_where_it_stands(
    site: JournaledSite, tmp_path: Path
) -> None:
    data = make_delta(1, None, [(0, b"s" * 8192)])
    site.journal_path.parent.mkdir(parents=True)
    spooled = tmp_path / "spooled.delta"
    spooled.write_bytes(b"junk" + data)
    with spooled.open("rb") as source, Journal(site.journal_path) as journal:
        source.seek(4)
        length = journal.stage(source)
        assert length == len(data)
        header, summary = journal.commit(length, accept=lambda header: None)
    assert (header.seq, summary.data_bytes) == (1, 8192)


def test_a_spool_file_too_big_for_the_journal_device_is_refused(
    site: JournaledSite, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.journal_path.parent.mkdir(parents=True)
    spooled = tmp_path / "spooled.delta"
    spooled.write_bytes(make_delta(1, None, [(0, b"s" * 8192)]))
    monkeypatch.setattr(Journal, "capacity", lambda self: 4096)
    with spooled.open("rb") as source, Journal(site.journal_path) as journal:
        with pytest.raises(JournalError, match="does not fit the journal device"):
            journal.stage(source)
        assert os.fstat(journal.fd).st_size <= 2 * SLOT_BYTES  # nothing was copied


def test_a_reseed_cut_short_leaves_the_site_holding_no_cut(
    site: JournaledSite, tmp_path: Path
) -> None:
    """Review finding: a seed overwrites replicas that the journal says hold a cut; killed
    midway, the next run must not believe they still hold it."""
    site.receive(io.BytesIO(make_delta(1, None, [(0, b"x" * 512)])))
    assert site.held() == 1
    image = tmp_path / "image.img"
    image.write_bytes(b"n" * DEVICE_BYTES)

    def killed(_done: int) -> None:
        raise KeyboardInterrupt  # the process dies after the first chunk

    with pytest.raises(KeyboardInterrupt):
        site.seed({"d": str(image)}, target_zeroed=False, progress=killed)
    assert site.held() is None and site.recorded() is None
    site.seed({"d": str(image)}, target_zeroed=False, progress=lambda _done: None)
    site.mark_seeded(5)
    assert site.held() == 5 and replica_bytes(site) == b"n" * DEVICE_BYTES


def test_takeover_lock_stops_the_process_holding_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "locks" / "receive.g.dr.lock"
    path.parent.mkdir(parents=True, mode=0o700)
    path.touch(mode=0o600)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout is not None and holder.stdout.readline() == "held\n"
    with takeover_lock(path, tmp_path / "state", "test") as killed:
        assert killed == [holder.pid]
        assert holder.wait(timeout=5) == -9


def test_a_delta_that_fails_its_checks_leaves_no_resume_point(site: JournaledSite) -> None:
    data = bytearray(make_delta(1, None, [(0, b"c" * 4096)]))
    data[-100] ^= 1
    staging = site.state_dir.staging("db", "dr")
    staging.parent.mkdir(parents=True, mode=0o700)
    staging.write_text('{"seq": 1, "base": null, "generation": 0, "length": 64}')
    assert site.staged_so_far(1, None) == 64
    with pytest.raises(delta.CorruptDelta):
        site.receive_chunks([bytes(data)], seq=1, base=None)
    assert not staging.exists() and site.staged_so_far(1, None) == 0
