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
from dmrepl.config import Config, GroupSpec, SiteSpec
from dmrepl.journal import Journal
from dmrepl.replicate import _Cycle
from dmrepl.sites import RecordUnreadable, delta_file_name, journal_path, recorded_cut
from dmrepl.spool import Spool
from dmrepl.state import StateStore, StateStoreError


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


def planning_cycle(tmp_path: Path, store: StateStore) -> _Cycle:
    """A cycle with just what planning reads: the store, the spool and the site names."""
    cycle = _Cycle.__new__(_Cycle)
    sites = tuple(
        SiteSpec("db", name, "dir", "asynchronous", {}, None, str(tmp_path))
        for name in ("dr", "vault")
    )
    cycle.spec = GroupSpec("db", (), sites)
    cycle.config = Config(tmp_path / "dmrepl.toml", tmp_path, {"db": cycle.spec})
    cycle.store = store
    cycle.spool = Spool(tmp_path / "spool", "db", 2**30)
    cycle.sites = dict.fromkeys(("dr", "vault"))  # type: ignore[arg-type]
    return cycle


def test_a_site_at_a_cut_the_store_lost_is_reseeded_and_numbering_goes_on_past_it(
    tmp_path: Path,
) -> None:
    store, _ = opened(tmp_path)
    # What a cycle's recovery records after state.db was lost: each site's own cut.
    store.set_cursor("db", "dr", 57)
    store.set_cursor("db", "vault", 55)
    cycle = planning_cycle(tmp_path, store)
    plan = cycle._plan({"dr": None, "vault": None}, set())  # type: ignore[dict-item]
    assert sorted(plan.seed) == ["dr", "vault"] and not plan.spool_delta and not plan.resync
    assert cycle._next_seq() == 58  # never 1: cut 1..57 are names the sites already hold
    store.close()


def test_a_site_at_a_known_cut_follows_the_spool_as_before(tmp_path: Path) -> None:
    store, _ = opened(tmp_path)
    store.record_cut("db", {"data": 3}, 0.0)
    store.set_cursor("db", "dr", 1)
    cycle = planning_cycle(tmp_path, store)
    plan = cycle._plan({"dr": None, "vault": None}, set())  # type: ignore[dict-item]
    assert plan.seed == ["vault"] and plan.head == 1 and plan.spool_delta
    assert cycle._next_seq() == 2
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
    blockdev = SiteSpec("db", "dr", "blockdev", "asynchronous", {"data": "/dev/x"}, None, None)
    assert recorded_cut(blockdev, tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # no journal file or directory created
    path = journal_path(blockdev, tmp_path)
    path.parent.mkdir()
    with Journal(path) as journal:
        journal.mark_applied(41)
    assert recorded_cut(blockdev, tmp_path) == 41
    vault = SiteSpec("db", "vault", "dir", "asynchronous", {}, None, str(tmp_path / "vault"))
    with pytest.raises(RecordUnreadable):  # not there (not mounted?): it may hold any cut
        recorded_cut(vault, tmp_path)
    (tmp_path / "vault").mkdir()
    assert recorded_cut(vault, tmp_path) is None
    (tmp_path / "vault" / delta_file_name("db", 44, 43)).touch()
    assert recorded_cut(vault, tmp_path) == 44


def test_a_journal_that_cannot_be_read_is_unreadable_and_a_fifo_does_not_hang(
    tmp_path: Path,
) -> None:
    configured = SiteSpec(
        "db", "dr", "blockdev", "asynchronous", {"data": "/dev/x"}, str(tmp_path / "gone"), None
    )
    with pytest.raises(RecordUnreadable, match="does not exist"):
        recorded_cut(configured, tmp_path)
    os.mkfifo(tmp_path / "fifo")
    fifo = SiteSpec(
        "db", "dr", "blockdev", "asynchronous", {"data": "/dev/x"}, str(tmp_path / "fifo"), None
    )
    with pytest.raises(RecordUnreadable, match="not a file or block device"):
        recorded_cut(fifo, tmp_path)


def test_a_lost_store_with_a_site_out_of_reach_numbers_past_the_clock(tmp_path: Path) -> None:
    """Review finding: the store is lost and a site's journal device is detached. The site may
    hold any cut; numbering from 1 would one day give its cut number to another cut."""
    site = SiteSpec(
        "db", "dr", "blockdev", "asynchronous", {"data": "/dev/x"}, str(tmp_path / "gone"), None
    )
    group = GroupSpec("db", (), (site,))
    store, _ = opened(tmp_path)
    before = int(time.time())
    assert next_cut_seq(store, group, tmp_path) >= before
    store.record_cut("db", {"data": 5}, 0.0, seq=7)
    assert next_cut_seq(store, group, tmp_path) == 8  # a store that has cuts goes on from them
    store.close()


def test_numbering_goes_past_a_cut_only_a_sites_journal_remembers(tmp_path: Path) -> None:
    """After a lost state.db, `changes` (or a sync while that site is down) must not number a
    new cut 1..41 while the site's journal says it holds cut 41."""
    site = SiteSpec("db", "dr", "blockdev", "asynchronous", {"data": "/dev/x"}, None, None)
    path = journal_path(site, tmp_path)
    path.parent.mkdir()
    with Journal(path) as journal:
        journal.mark_applied(41)
    store, _ = opened(tmp_path)
    assert next_cut_seq(store, GroupSpec("db", (), (site,)), tmp_path) == 42
    store.close()
