"""A lost or corrupt state store is reported and rebuilt, never a traceback, never a lost
place (issue 13, finding 3 and the state.db cases of finding 4: S01, S01d, F12, F16)."""

from __future__ import annotations

import errno
import os
import sqlite3
import time
from pathlib import Path

import pytest

from dmrepl import state
from dmrepl.changes import next_cut_seq
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.journal import Journal
from dmrepl.sites import RecordUnreadable
from dmrepl.state import StateStore, StateStoreError
from dmrepl.statedir import StateDir
from tests.unit.factories import blockdev_site, dir_site, receiver


def opened(state: Path) -> tuple[StateStore, list[str]]:
    warnings: list[str] = []
    return StateStore(state, warn=warnings.append), warnings


def test_garbage_is_moved_aside_with_a_warning_and_a_new_store_works(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"not a database at all" * 300)
    store, warnings = opened(tmp_path)
    (aside,) = tmp_path.glob("state.db.corrupt-*")
    assert aside.read_bytes() == b"not a database at all" * 300  # the evidence is kept
    (warning,) = warnings
    assert "state.db is corrupt" in warning and aside.name in warning
    assert "re-seeded by compare" in warning
    assert store.record_cut("db", {"data": 4}, 0.01).seq == 1
    store.close()
    store, warnings = opened(tmp_path)  # the new one is a good store
    assert warnings == [] and store.cut("db", 1) is not None
    store.close()


def test_a_truncated_store_is_detected_and_each_corrupt_copy_is_kept(tmp_path: Path) -> None:
    for attempt in range(2):
        store, _ = opened(tmp_path)
        for seq in range(1, 400):
            store.record_cut("db", {f"dev{n}": seq for n in range(8)}, 0.0)
        store.close()
        db = tmp_path / "state.db"
        assert db.stat().st_size > 20000
        with db.open("r+b") as handle:
            handle.truncate(5000)
        store, warnings = opened(tmp_path)
        assert len(warnings) == 1, attempt
        assert store.cuts("db") == []
        store.close()
    assert len(list(tmp_path.glob("state.db.corrupt-*"))) == 2  # never one over the other


def test_a_store_that_cannot_be_opened_is_a_clear_error_and_nothing_is_moved(
    tmp_path: Path,
) -> None:
    (tmp_path / "state.db").mkdir()
    with pytest.raises(StateStoreError) as caught:
        StateStore(tmp_path, warn=pytest.fail)
    assert f"cannot use the state store {tmp_path / 'state.db'}" in caught.value.message
    assert caught.value.hint and "writable" in caught.value.hint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.db"]


def test_numbering_goes_past_every_cursor_the_store_holds(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    # What a cycle's recovery records after state.db was lost: each site's own cut.
    store.set_cursor("db", "dr", 57)
    store.set_cursor("db", "vault", 55)
    sites = [receiver(dir_site(tmp_path, name), tmp_path) for name in ("dr", "vault")]
    assert next_cut_seq(store, "db", sites) == 58  # never 1: cuts 1..57 are names sites hold
    store.close()


def test_sqlite_reports_corruption_with_the_codes_the_store_looks_for(tmp_path: Path) -> None:
    """Pins the stdlib behaviour the detection relies on (Python >= 3.11)."""
    (tmp_path / "x.db").write_bytes(b"garbage" * 1000)
    db = sqlite3.connect(tmp_path / "x.db")
    with pytest.raises(sqlite3.DatabaseError) as caught:
        db.execute("PRAGMA quick_check(1)").fetchone()
    db.close()
    assert caught.value.sqlite_errorcode == 26  # SQLITE_NOTADB


def test_a_corrupt_store_that_cannot_be_moved_aside_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "state.db").write_bytes(b"junk" * 2000)

    def read_only(*_args: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(state.os, "rename", read_only)
    with pytest.raises(StateStoreError) as caught:
        StateStore(tmp_path, warn=pytest.fail)
    assert "moving it aside failed" in caught.value.message
    assert "Read-only file system" in caught.value.message
    assert (tmp_path / "state.db").read_bytes() == b"junk" * 2000


def test_a_sites_own_record_is_read_without_creating_anything(tmp_path: Path) -> None:
    blockdev = receiver(blockdev_site(), tmp_path)
    assert blockdev.recorded() is None and blockdev.held() is None
    assert list(tmp_path.iterdir()) == []  # no journal file or directory created
    path = StateDir(tmp_path).journal("db", "dr")
    path.parent.mkdir()
    with Journal(path) as journal:
        journal.mark_applied(41)
    assert blockdev.recorded() == 41 and blockdev.held() == 41
    vault = receiver(dir_site(tmp_path / "vault"), tmp_path)
    with pytest.raises(RecordUnreadable):  # not there (not mounted?): it may hold any cut
        vault.recorded()
    (tmp_path / "vault").mkdir()
    assert vault.recorded() is None
    (tmp_path / "vault" / delta_file_name("db", 44, 43)).touch()
    assert vault.recorded() == 44


def test_a_journal_that_cannot_be_read_is_unreadable_and_a_fifo_does_not_hang(
    tmp_path: Path,
) -> None:
    configured = receiver(blockdev_site(journal=str(tmp_path / "gone")), tmp_path)
    with pytest.raises(RecordUnreadable, match="does not exist"):
        configured.recorded()
    assert not (tmp_path / "gone").exists()
    os.mkfifo(tmp_path / "fifo")
    fifo = receiver(blockdev_site(journal=str(tmp_path / "fifo")), tmp_path)
    with pytest.raises(RecordUnreadable, match="not a file or device"):
        fifo.recorded()


def test_a_lost_store_with_a_site_out_of_reach_numbers_past_the_clock(tmp_path: Path) -> None:
    """Review finding: the store is lost and a site's journal device is detached. The site may
    hold any cut; numbering from 1 would one day give its cut number to another cut."""
    sites = [receiver(blockdev_site(journal=str(tmp_path / "gone")), tmp_path)]
    store, _ = opened(tmp_path)
    before = int(time.time())
    assert next_cut_seq(store, "db", sites) >= before
    store.record_cut("db", {"data": 5}, 0.0, seq=7)
    assert next_cut_seq(store, "db", sites) == 8  # a store that has cuts goes on from them
    store.close()


def test_numbering_goes_past_a_cut_only_a_sites_journal_remembers(tmp_path: Path) -> None:
    """After a lost state.db, `changes` (or a sync while that site is down) must not number a
    new cut 1..41 while the site's journal says it holds cut 41."""
    path = StateDir(tmp_path).journal("db", "dr")
    path.parent.mkdir()
    with Journal(path) as journal:
        journal.mark_applied(41)
    store, _ = opened(tmp_path)
    assert next_cut_seq(store, "db", [receiver(blockdev_site(), tmp_path)]) == 42
    store.close()
