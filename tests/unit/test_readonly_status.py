"""Reads create nothing (architecture review 2026-12, sections 1 and 3): the read-only state
store, the lock probe and `dmrepl status` leave the state directory exactly as they found it,
even when there is none yet."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from dmrepl.lock import group_lock, lock_holder
from dmrepl.state import StateStore
from dmrepl.statedir import StateDir


def snapshot(root: Path) -> dict[str, tuple[str, bytes, int]]:
    """Every path under `root` (and `root`) with its kind, bytes and mtime."""
    found: dict[str, tuple[str, bytes, int]] = {}
    for path in [root, *sorted(root.rglob("*"))] if root.exists() else []:
        info = path.lstat()
        data = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (oct(info.st_mode), data, info.st_mtime_ns)
    return found


def filled_store(state: Path) -> None:
    """A state dir as a sync leaves it: a store with a cut and a site's cursor."""
    store = StateStore(state)
    store.record_cut("db", {"data": 3}, 0.01)
    store.set_cursor("db", "dr", 1)
    store.close()


@pytest.mark.parametrize("made", ["nothing", "empty dir"])
def test_no_store_reads_as_no_history_and_creates_nothing(tmp_path: Path, made: str) -> None:
    state = tmp_path / "state"
    if made == "empty dir":
        state.mkdir(mode=0o700)
    before = snapshot(tmp_path)
    assert StateStore.open_readonly(state, warn=pytest.fail) is None
    assert snapshot(tmp_path) == before


def test_an_existing_store_is_read_and_not_modified(tmp_path: Path) -> None:
    filled_store(tmp_path)
    before = snapshot(tmp_path)
    store = StateStore.open_readonly(tmp_path, warn=pytest.fail)
    assert store is not None
    try:
        assert [cut.eras for cut in store.cuts("db")] == [{"data": 3}]
        record = store.site("db", "dr")
        assert record is not None and record.seq == 1
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            store.record("db", "data", "up", "a write through a reader")
    finally:
        store.close()
    assert snapshot(tmp_path) == before  # no -journal, no new mtime


def test_a_corrupt_store_reads_as_no_history_with_a_warning_and_stays(tmp_path: Path) -> None:
    StateDir(tmp_path).db.write_bytes(b"not a database at all" * 300)
    before = snapshot(tmp_path)
    warnings: list[str] = []
    assert StateStore.open_readonly(tmp_path, warn=warnings.append) is None
    (warning,) = warnings
    assert "is corrupt (file is not a database)" in warning and "next sync" in warning
    assert snapshot(tmp_path) == before  # not moved aside: that is a writer's job


def test_a_store_created_empty_reads_as_no_history(tmp_path: Path) -> None:
    StateDir(tmp_path).db.write_bytes(b"")  # what a full disk leaves (report case S05=)
    before = snapshot(tmp_path)
    assert StateStore.open_readonly(tmp_path, warn=pytest.fail) is None
    assert snapshot(tmp_path) == before


def test_a_store_with_an_unfinished_write_is_not_rolled_back_by_a_reader(tmp_path: Path) -> None:
    filled_store(tmp_path / "live")
    live = StateDir(tmp_path / "live").db
    writer = sqlite3.connect(live)
    writer.execute("PRAGMA cache_size = 1")  # spill to the file: a hot journal beside it
    writer.execute("BEGIN")
    for _ in range(200):
        writer.execute("INSERT INTO events VALUES (NULL, 0, 'db', 'data', 'x', ?)", ("x" * 999,))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    for suffix in ("", "-journal"):  # what a `kill -9` in the middle of the write leaves
        shutil.copy(f"{live}{suffix}", f"{StateDir(state).db}{suffix}")
    writer.rollback()
    writer.close()
    before = snapshot(state)
    warnings: list[str] = []
    assert StateStore.open_readonly(state, warn=warnings.append) is None
    assert "did not finish (state.db-journal)" in warnings[0]
    assert snapshot(state) == before
    store = StateStore(state, warn=pytest.fail)  # the next writer finishes it: nothing lost
    assert [cut.seq for cut in store.cuts("db")] == [1]
    store.close()


@pytest.mark.parametrize("made", ["nothing", "empty dir", "locks dir"])
def test_lock_holder_creates_nothing(tmp_path: Path, made: str) -> None:
    state = StateDir(tmp_path / "state")
    if made != "nothing":
        state.root.mkdir(mode=0o700)
    if made == "locks dir":
        state.locks.mkdir(mode=0o700)
    before = snapshot(tmp_path)
    assert lock_holder(state.root, "db") is None
    assert snapshot(tmp_path) == before


def test_lock_holder_reads_a_held_lock_without_changing_it(tmp_path: Path) -> None:
    with group_lock(tmp_path, "db", "sync"):
        before = snapshot(tmp_path)
        holder = lock_holder(tmp_path, "db")
        assert holder is not None and "(sync, started" in holder
        assert snapshot(tmp_path) == before
