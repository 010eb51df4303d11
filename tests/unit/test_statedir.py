"""dmrepl.statedir: the one map of the state directory, pinned to the on-disk layout."""

from __future__ import annotations

from pathlib import Path

from dmrepl.cut import cow_file
from dmrepl.lock import group_lock
from dmrepl.sites.journaled import JournaledSite
from dmrepl.spool import Spool
from dmrepl.stack import plan_stack
from dmrepl.statedir import StateDir
from tests.unit.factories import blockdev_site, device_spec, receiver


def test_the_layout_is_the_documented_one() -> None:
    state = StateDir(Path("/var/lib/dmrepl"))
    assert [str(p) for p in (state.db, state.locks, state.lock("db"))] == [
        "/var/lib/dmrepl/state.db",
        "/var/lib/dmrepl/locks",
        "/var/lib/dmrepl/locks/db.lock",
    ]
    assert [str(p) for p in (state.spool("db"), state.resync("db"))] == [
        "/var/lib/dmrepl/spool/db",
        "/var/lib/dmrepl/spool/db/resync",
    ]
    assert str(state.journal("db", "dr")) == "/var/lib/dmrepl/journal/db.dr.journal"
    assert state.journals == state.journal("db", "dr").parent
    assert str(state.cow_file("db", "data")) == "/var/lib/dmrepl/cow/db.data.cow"
    assert state.cow == state.cow_file("db", "data").parent


def test_the_map_touches_nothing(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    for path in (state.db, state.lock("g"), state.resync("g")):
        assert not path.exists()
    assert state.journal("g", "s").name == "g.s.journal" and state.cow_file("g", "d").suffix
    assert list(tmp_path.iterdir()) == []


def test_the_modules_use_the_map(tmp_path: Path) -> None:
    state = StateDir(tmp_path / "state")
    with group_lock(state.root, "g", "test"):
        assert state.lock("g").is_file()
    assert Spool(state, "g", 1 << 20).resync_dir == state.resync("g")
    site = receiver(blockdev_site(), state.root)
    assert isinstance(site, JournaledSite) and site.journal_path == state.journal("db", "dr")
    stack = plan_stack(device_spec(), 2097152, 8192)
    assert cow_file(state.root, stack) == state.cow_file(stack.device.group, stack.device.name)
