"""Reads create nothing (architecture review 2026-12, sections 1 and 3): the read-only state
store, the lock probe and `dmrepl status` leave the state directory exactly as they found it,
even when there is none yet."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from dmrepl import builder, executor, loop
from dmrepl.config import Config, parse_config
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.journal import Journal, JournalMissing
from dmrepl.lock import group_lock, lock_holder
from dmrepl.replication.status import replication_status, site_status
from dmrepl.sites import SiteDown
from dmrepl.sites.journaled import BlockdevSiteSpec, JournaledSite
from dmrepl.state import StateStore
from dmrepl.statedir import StateDir
from tests.clirun import run_cli_here
from tests.unit.factories import receiver


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


def config_at(tmp_path: Path) -> Path:
    """Group db (device data) with sites dr and far (blockdev) and vault (dir), its state dir
    at tmp_path/state (not created)."""
    (tmp_path / "vault").mkdir()
    path = tmp_path / "dmrepl.toml"
    path.write_text(
        f"""
[dmrepl]
state_dir = "{tmp_path / "state"}"
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
[group.db.site.dr]
transport = "blockdev"
replica.data = "/dev/vdd"
[group.db.site.far]
transport = "blockdev"
replica.data = "/dev/vde"
[group.db.site.vault]
transport = "dir"
path = "{tmp_path / "vault"}"
"""
    )
    return path


def loaded(path: Path) -> Config:
    return parse_config(path.read_text(), path)


def after_three_cuts(state: StateDir) -> None:
    """Cuts 1-3; dr holds 2, far holds 1 (the spool's 1->2 delta was evicted), vault is down."""
    store = StateStore(state.root)
    for eras in ({"data": 2}, {"data": 5}, {"data": 9}):
        store.record_cut("db", eras, 0.01)
    store.set_cursor("db", "dr", 2)
    store.set_cursor("db", "far", 1)
    store.set_site_state("db", "vault", "down", "/srv/vault is not mounted")
    store.close()
    state.spool("db").mkdir(parents=True)
    (state.spool("db") / delta_file_name("db", 3, 2)).write_bytes(b"d" * 1234)


def test_site_status_on_a_fresh_host_creates_nothing(tmp_path: Path) -> None:
    config = loaded(config_at(tmp_path))
    before = snapshot(tmp_path)
    shown = replication_status(config)
    assert snapshot(tmp_path) == before and not (tmp_path / "state").exists()
    assert shown.recent_cuts == {"db": []}
    assert [(s.site, s.state, s.cursor, s.lag_bytes) for s in shown.sites] == [
        ("dr", "not seeded", None, None),
        ("far", "not seeded", None, None),
        ("vault", "not seeded", None, None),
    ]


def test_site_status_reads_an_existing_state_and_changes_nothing(tmp_path: Path) -> None:
    config = loaded(config_at(tmp_path))
    state = StateDir(config.state_dir)
    after_three_cuts(state)
    before = snapshot(tmp_path)
    shown = replication_status(config, "db", recent=2)
    assert snapshot(tmp_path) == before  # state.db's bytes and mtime too; no -journal
    assert [cut.seq for cut in shown.recent_cuts["db"]] == [3, 2]
    by_site = {s.site: s for s in shown.sites}
    dr, far, vault = by_site["dr"], by_site["far"], by_site["vault"]
    assert (dr.state, dr.cursor, dr.latest_cut, dr.lag_cuts, dr.lag_eras) == ("behind", 2, 3, 1, 4)
    assert dr.lag_bytes == 1234  # the spooled 2->3 delta
    assert (far.state, far.lag_cuts, far.lag_eras, far.lag_bytes) == ("behind", 2, 7, None)
    assert (vault.state, vault.detail) == ("down", "/srv/vault is not mounted")
    untimed = [dataclasses.replace(s, lag_s=None) for s in site_status(config, "db")]
    assert untimed == [dataclasses.replace(s, lag_s=None) for s in shown.sites]


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's kernel part answers "no stacks up"; no command may run; the devices probe."""

    def refuse(self: executor.Runner, op: executor.Op, **_: object) -> executor.Result:
        raise AssertionError(f"status ran {op.render()}")

    monkeypatch.setattr(executor.Runner, "run", refuse)
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)
    monkeypatch.setattr(builder, "status", lambda *_args: [])
    monkeypatch.setattr(builder, "unprobed_devices", lambda _spec: [])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dmrepl status refuses non-root")


@needs_root
@pytest.mark.usefixtures("no_kernel")
@pytest.mark.parametrize("args", [("status",), ("status", "db", "--json")], ids=["text", "json"])
def test_cli_status_on_a_fresh_host_creates_nothing(tmp_path: Path, args: tuple[str, ...]) -> None:
    config = config_at(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli_here(*args, "--config", str(config))
    assert code == 0, out + err
    assert snapshot(tmp_path) == before and not (tmp_path / "state").exists()
    assert "not seeded" in out and err == ""


@needs_root
@pytest.mark.usefixtures("no_kernel")
def test_cli_status_reads_an_existing_state_and_changes_nothing(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    after_three_cuts(StateDir(tmp_path / "state"))
    before = snapshot(tmp_path)
    code, out, err = run_cli_here("status", "--config", str(config))
    assert code == 0, out + err
    assert "last cuts of db:" in out and "  cut 3  " in out
    assert "site db/dr (blockdev, asynchronous): behind; holds cut 2; lag 1 cuts, 4 eras" in out
    code, out, err = run_cli_here("status", "--json", "--config", str(config))
    assert code == 0, out + err
    assert [s["state"] for s in json.loads(out)["sites"]] == ["behind", "behind", "down"]
    assert snapshot(tmp_path) == before


def blockdev_site(tmp_path: Path, journal: str | None) -> JournaledSite:
    spec = BlockdevSiteSpec("g", "dr", "blockdev", "asynchronous", {}, journal)
    site = receiver(spec, tmp_path / "state")  # no devices: no replica to probe
    assert isinstance(site, JournaledSite)
    return site


def test_a_configured_journal_that_is_missing_is_never_created(tmp_path: Path) -> None:
    """A missing journal device must not become a regular file in /dev: the site is down."""
    device = tmp_path / "dev" / "vdj"
    device.parent.mkdir()
    site = blockdev_site(tmp_path, str(device))
    before = snapshot(tmp_path)
    attempts = {
        "check": site.check,
        "held": site.held,
        "recover": site.recover,
        "receive": lambda: site.receive(io.BytesIO(b"a delta that is never read")),
        "mark_seeded": lambda: site.mark_seeded(1),
    }
    for name, attempt in attempts.items():
        with pytest.raises(SiteDown) as caught:
            attempt()
        assert caught.value.message == f"site dr: the journal {device} does not exist", name
        assert caught.value.hint is not None and "`journal` setting" in caught.value.hint
    assert snapshot(tmp_path) == before and not device.exists()
    with pytest.raises(JournalMissing):
        Journal(device, create=False)
    assert not device.exists()


def test_the_default_journal_is_made_by_a_write_only(tmp_path: Path) -> None:
    site = blockdev_site(tmp_path, None)
    before = snapshot(tmp_path)
    site.check()
    assert (site.held(), site.recorded(), site.recover()) == (None, None, None)
    assert snapshot(tmp_path) == before  # no journal, no journal directory
    site.mark_seeded(4)  # a write makes the journal directory and the journal
    assert site.journal_path == StateDir(tmp_path / "state").journal("g", "dr")
    assert site.journal_path.is_file() and site.held() == 4
