"""A blockdev site applying a spool file where it lies: the journal commits a reference to a
hard link of it (its payload) instead of a copy. Each trap of that design has a test here."""

from __future__ import annotations

import errno
import io
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, cast

import pytest

from dmrepl import delta, phases
from dmrepl.journal import (
    DATA_OFFSET,
    SLOT_BYTES,
    Journal,
    JournalHeader,
    JournalState,
    Payload,
    decode_header,
)
from dmrepl.sites.base import SiteBroken, SpooledDelta
from dmrepl.sites.journaled import JournaledSite
from dmrepl.spool import Spool
from dmrepl.statedir import StateDir
from tests.unit.factories import blockdev_site, one_device_delta, receiver

DEVICE_BYTES = 4 * 2**20
SECTORS = DEVICE_BYTES // 512


class Killed(BaseException):
    """The process dying at a phase (not an error any code path handles)."""


def make_delta(seq: int, base: int | None, writes: list[tuple[int, bytes]]) -> bytes:
    return one_device_delta("db", "d", SECTORS, seq, base, writes)


def site_at(tmp_path: Path, journal: str | None = None) -> JournaledSite:
    replica = tmp_path / "replica.img"
    replica.write_bytes(bytes(DEVICE_BYTES))
    spec = blockdev_site(replicas={"d": str(replica)}, journal=journal)
    site = receiver(spec, tmp_path / "state", {"d": SECTORS})
    assert isinstance(site, JournaledSite)
    return site


@pytest.fixture
def site(tmp_path: Path) -> JournaledSite:
    return site_at(tmp_path)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(StateDir(tmp_path / "state"), "db", 1 << 30)
    spool.prepare()
    return spool


def replica(site: JournaledSite) -> bytes:
    return Path(site.spec.replicas["d"]).read_bytes()


def spooled(path: Path, data: bytes, *, captured: bool = True) -> SpooledDelta:
    """`data` written to `path` as a capture would; `captured`: by this process (its
    checksum known), else by an earlier run."""
    path.write_bytes(data)
    crc = struct.unpack_from("<I", data, len(data) - 4)[0] if captured else None
    return SpooledDelta(path, len(data), crc)


@pytest.fixture
def killed_at_commit() -> Iterator[None]:
    """The next delivery dies right after COMMITTED is durable, before a byte is applied."""

    def hook(phase: str) -> None:
        if phase == "journal-committed":
            raise Killed

    phases.set_hook(hook)
    yield
    phases.set_hook(None)


def committed(site: JournaledSite) -> JournalHeader:
    with Journal(site.journal_path) as journal:
        return journal.header


def test_a_spool_file_is_applied_without_a_copy_in_the_journal(
    site: JournaledSite, spool: Spool
) -> None:
    data = make_delta(1, None, [(8, b"a" * 65536)])
    delivery = site.receive_spooled(spooled(spool.path(1, None), data))
    assert (delivery.seq, delivery.data_bytes) == (1, 65536)
    assert replica(site)[4096 : 4096 + 65536] == b"a" * 65536
    assert site.held() == 1
    assert site.journal_path.stat().st_size == DATA_OFFSET  # the headers only: no copy
    assert not (site.journal_path.parent / "db.dr.payload").exists()  # unlinked once applied


def test_the_payload_is_durable_before_committed_is_written(
    site: JournaledSite, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    fsync, pwrite = os.fsync, os.pwrite

    def name(fd: int) -> str:
        return os.readlink(f"/proc/self/fd/{fd}")

    def logged_fsync(fd: int) -> None:
        events.append(f"fsync {name(fd)}")
        fsync(fd)

    def logged_pwrite(fd: int, data: bytes, offset: int) -> int:
        header = decode_header(bytes(data)) if offset in (0, SLOT_BYTES) else None
        if header is not None:
            events.append(f"header {header.state.name}")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "pwrite", logged_pwrite)
    site.receive_spooled(spooled(spool.path(1, None), make_delta(1, None, [(0, b"p" * 4096)])))
    commit = events.index("header COMMITTED")
    payload = str(site.journal_path.parent / "db.dr.payload")
    assert f"fsync {payload}" in events[:commit]  # the bytes the header will name
    assert f"fsync {site.journal_path.parent}" in events[:commit]  # and the link to them
    assert events.index(f"fsync {site.journal_path}") > commit  # the header itself after


def test_a_delta_committed_by_reference_survives_the_spool_deleting_it(
    site: JournaledSite, spool: Spool, killed_at_commit: None
) -> None:
    """Eviction at the cap, retention, `compact`, pruning of delivered deltas: none of them
    may take away a delta a journal committed and has not applied."""
    path = spool.path(2, None)
    with pytest.raises(Killed):
        site.receive_spooled(spooled(path, make_delta(2, None, [(16, b"e" * 8192)])))
    assert committed(site).payload is not None
    spool.delete(spool.chain_deltas())  # evicted, pruned or compacted away
    assert not path.exists()
    phases.set_hook(None)
    replayed = site.recover()
    assert replayed is not None and replayed.seq == 2
    assert replica(site)[8192 : 8192 + 8192] == b"e" * 8192
    assert site.held() == 2


def test_orphan_removal_before_recover_spares_a_committed_resync_delta(
    site: JournaledSite, spool: Spool, killed_at_commit: None
) -> None:
    """A cycle removes the spool's orphans (every undelivered own delta in `resync/`)
    before the sites recover: a killed delivery of a resync delta is still replayed."""
    own = spool.own_path("dr", 5, 3)
    with pytest.raises(Killed):
        site.receive_spooled(spooled(own, make_delta(5, 3, [(0, b"r" * 4096)])))
    removed = spool.remove_orphans(last_recorded_seq=5)
    assert own in removed and not own.exists()
    phases.set_hook(None)
    replayed = site.recover()
    assert replayed is not None and replayed.seq == 5
    assert replica(site)[:4096] == b"r" * 4096


def test_a_replay_refuses_a_missing_payload_and_applies_nothing(
    site: JournaledSite, spool: Spool, killed_at_commit: None
) -> None:
    with pytest.raises(Killed):
        site.receive_spooled(spooled(spool.path(1, None), make_delta(1, None, [(0, b"m" * 512)])))
    (site.journal_path.parent / "db.dr.payload").unlink()
    with pytest.raises(SiteBroken, match=r"payload .*db\.dr\.payload is missing") as raised:
        site.recover()
    assert "re-seed" in raised.value.hint
    assert replica(site) == bytes(DEVICE_BYTES)
    assert committed(site).state is JournalState.COMMITTED  # still owed; never "applied"


@pytest.mark.parametrize("damage", ["bit flip", "other delta", "truncated"])
def test_a_replay_re_verifies_the_payload_and_never_applies_part_of_it(
    site: JournaledSite, spool: Spool, killed_at_commit: None, damage: str
) -> None:
    path = spool.path(1, None)
    data = make_delta(1, None, [(0, b"v" * 4096), (64, b"w" * 4096)])
    with pytest.raises(Killed):
        site.receive_spooled(spooled(path, data))
    payload = site.journal_path.parent / "db.dr.payload"
    if damage == "bit flip":  # the same file (inode), damaged where it lies
        with path.open("r+b") as f:
            f.seek(len(data) - 200)
            f.write(bytes([data[-200] ^ 1]))
        expected = r"damaged: .*corrupt delta at byte"
    elif damage == "other delta":  # a whole, valid delta of the same size, not the one
        payload.unlink()
        payload.write_bytes(make_delta(1, None, [(0, b"V" * 4096), (64, b"w" * 4096)]))
        expected = "not the delta the journal committed"
    else:
        os.truncate(path, len(data) - 10)
        expected = r"is .* bytes, the journal committed"
    phases.set_hook(None)
    with pytest.raises(SiteBroken, match=expected):
        site.recover()
    assert replica(site) == bytes(DEVICE_BYTES)


def test_a_file_from_an_earlier_run_is_verified_before_it_is_committed(
    site: JournaledSite, spool: Spool
) -> None:
    data = bytearray(make_delta(1, None, [(0, b"c" * 4096)]))
    data[-100] ^= 1
    with pytest.raises(delta.CorruptDelta, match="corrupt delta at byte"):
        site.receive_spooled(spooled(spool.path(1, None), bytes(data), captured=False))
    assert replica(site) == bytes(DEVICE_BYTES)
    assert committed(site).state is JournalState.IDLE  # never committed


def test_a_file_captured_by_this_run_is_verified_while_it_is_applied(
    site: JournaledSite, spool: Spool
) -> None:
    """No separate pass, but never silent: damage found while applying is reported, and the
    journal's replay then refuses the payload until the site is re-seeded."""
    path = spool.path(1, None)
    data = make_delta(1, None, [(0, b"c" * 65536)])
    capture = spooled(path, data)
    with path.open("r+b") as f:  # damaged after the capture wrote (and checksummed) it
        f.seek(len(data) - 1000)
        f.write(b"\xff")
    with pytest.raises(delta.CorruptDelta, match="found while applying it") as raised:
        site.receive_spooled(capture)
    assert "dmrepl seed db --site dr" in raised.value.hint
    with pytest.raises(SiteBroken, match="damaged"):
        site.recover()
    assert site.held() is None


def test_a_configured_journal_keeps_the_copy(tmp_path: Path, spool: Spool) -> None:
    journal = tmp_path / "elsewhere.journal"
    journal.touch(mode=0o600)  # a configured journal must exist
    site = site_at(tmp_path, journal=str(journal))
    data = make_delta(1, None, [(0, b"j" * 4096)])
    site.receive_spooled(spooled(spool.path(1, None), data))
    assert journal.read_bytes()[DATA_OFFSET : DATA_OFFSET + len(data)] == data
    assert not (tmp_path / "elsewhere.payload").exists()
    assert site.held() == 1 and replica(site)[:4096] == b"j" * 4096


def test_a_file_system_without_hard_links_gets_the_copy(
    site: JournaledSite, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    data = make_delta(1, None, [(0, b"x" * 4096)])
    site.receive_spooled(spooled(spool.path(1, None), data))
    assert site.journal_path.read_bytes()[DATA_OFFSET:] == data
    assert site.held() == 1 and replica(site)[:4096] == b"x" * 4096


def test_a_version_1_journal_with_its_delta_inline_still_replays(site: JournaledSite) -> None:
    """A journal an older dmrepl committed (version 1 headers, the delta in the data area)."""
    data = make_delta(3, 2, [(32, b"o" * 4096)])
    body = struct.pack("<8sIQIqQ", b"DMREPLJN", 1, 7, int(JournalState.COMMITTED), 3, len(data))
    slot = (body + struct.pack("<I", zlib.crc32(body))).ljust(SLOT_BYTES, b"\0")
    site.journal_path.parent.mkdir(parents=True, mode=0o700)
    site.journal_path.write_bytes(bytes(SLOT_BYTES) + slot + data)  # generation 7: slot B
    site.journal_path.chmod(0o600)
    assert decode_header(slot) == JournalHeader(7, JournalState.COMMITTED, 3, len(data))
    replayed = site.recover()
    assert replayed is not None and replayed.seq == 3
    assert replica(site)[16384 : 16384 + 4096] == b"o" * 4096
    assert committed(site) == JournalHeader(8, JournalState.APPLIED, 3, 0)


def test_a_header_names_only_a_payload_beside_it() -> None:
    good = JournalHeader(1, JournalState.COMMITTED, 4, 100, Payload("db.dr.payload", 0xABC))
    assert decode_header(good.encode()) == good
    for name in ("../elsewhere", "/etc/passwd", "."):
        bad = JournalHeader(1, JournalState.COMMITTED, 4, 100, Payload(name, 1))
        assert decode_header(bad.encode()) is None
    applied = JournalHeader(1, JournalState.APPLIED, 4, 100, Payload("db.dr.payload", 1))
    assert decode_header(applied.encode()) is None  # only a commit names a payload


def test_a_file_reader_brings_each_record_in_one_read(tmp_path: Path) -> None:
    writes = [(0, b"a" * 4096), (8, b"b" * 1024), (16, b"c" * (1 << 20)), (4096, b"d" * 512)]
    data = make_delta(1, None, writes)
    path = tmp_path / "d.delta"
    path.write_bytes(b"junk" + data + b"more")
    header, summary = delta.verify(io.BytesIO(data), "bytes")
    fd = os.open(path, os.O_RDONLY)
    try:
        with delta.FileReader(fd, 4, len(data)) as reader:
            stream = cast(BinaryIO, reader)
            head = delta.read_header(stream, "file")
            got = [(r.device, r.offset, bytes(r.data)) for r in delta.records(stream, head, "f")]
    finally:
        os.close(fd)
    assert head == header
    assert got == [(0, offset, payload) for offset, payload in writes]
    assert summary.stream_crc == struct.unpack_from("<I", data, len(data) - 4)[0]


def test_a_link_a_killed_run_left_uncommitted_is_removed(
    site: JournaledSite, spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.receive_spooled(spooled(spool.path(1, None), make_delta(1, None, [(0, b"k" * 512)])))

    def killed(*_args: object) -> None:
        raise Killed  # after the link, before the commit

    monkeypatch.setattr(Journal, "commit_payload", killed)
    with pytest.raises(Killed):
        site.receive_spooled(spooled(spool.path(2, 1), make_delta(2, 1, [(0, b"K" * 512)])))
    payload = site.journal_path.parent / "db.dr.payload"
    assert payload.exists() and site.held() == 1
    assert site.recover() is None  # nothing committed: nothing to apply
    assert not payload.exists()
    assert replica(site)[:512] == b"k" * 512


def test_nothing_beside_a_configured_journal_is_touched(tmp_path: Path, spool: Spool) -> None:
    journal = tmp_path / "elsewhere.journal"
    journal.touch(mode=0o600)
    neighbour = tmp_path / "elsewhere.payload"  # not dmrepl's
    neighbour.write_bytes(b"someone else's")
    site = site_at(tmp_path, journal=str(journal))
    site.receive_spooled(spooled(spool.path(1, None), make_delta(1, None, [(0, b"j" * 512)])))
    site.recover()
    site.forget_held()
    assert neighbour.read_bytes() == b"someone else's"
