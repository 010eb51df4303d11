"""File safety (issue 13, finding 5 and the security review): modes, ownership, no link following.

Runs as root on the test host, like dmrepl itself. Every "touches nothing" case hashes the
watched files before and after.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import pytest

from dmrepl import loop, safefile
from dmrepl.deltafiles import write_durably
from dmrepl.errors import ExitCode
from dmrepl.journal import Journal, JournalError
from dmrepl.lock import group_lock, lock_holder
from dmrepl.sites import Receiver, ReplicaMismatch
from dmrepl.spool import Spool
from dmrepl.state import StateStore
from dmrepl.statedir import StateDir
from tests.unit import factories

NOBODY = 65534

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root, as dmrepl does")


def snapshot(paths: Iterable[Path]) -> dict[str, str | None]:
    """A hash of every watched file (None: absent), to prove a refusal touched nothing."""
    result: dict[str, str | None] = {}
    for path in paths:
        result[str(path)] = (
            hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        )
    return result


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def take_lock(state: Path) -> None:
    with group_lock(state, "db", "sync"):
        pass


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root-only file a hostile local user would like root to overwrite."""
    path = tmp_path / "victim.txt"
    path.write_text("ROOT ONLY\n")
    path.chmod(0o600)
    return path


def test_a_new_state_dir_and_its_files_are_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    with group_lock(state, "db", "sync"):
        pass
    store = StateStore(state)
    store.close()
    Spool(StateDir(state), "db", 1 << 20).prepare()
    for directory in (tmp_path / "a", tmp_path / "a" / "b", state, state / "locks"):
        assert mode_of(directory) == 0o700, directory
    for directory in (state / "spool", state / "spool" / "db", state / "spool" / "db" / "resync"):
        assert mode_of(directory) == 0o700, directory
    assert mode_of(state / "locks" / "db.lock") == 0o600
    assert mode_of(state / "state.db") == 0o600


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, victim: Path
) -> None:
    """Report case S07: root used to truncate the victim and write `pid ... (sync ...)` into it."""
    state = tmp_path / "state"
    (state / "locks").mkdir(parents=True, mode=0o700)
    (state / "locks" / "db.lock").symlink_to(victim)
    before = snapshot([victim])
    with pytest.raises(safefile.UnsafePath, match="is a symbolic link") as caught:
        take_lock(state)
    assert caught.value.exit_code == ExitCode.INVALID_INPUT
    with pytest.raises(safefile.UnsafePath, match="is a symbolic link"):
        lock_holder(state, "db")
    assert snapshot([victim]) == before


def test_a_hard_linked_lock_file_is_refused(tmp_path: Path, victim: Path) -> None:
    state = tmp_path / "state"
    (state / "locks").mkdir(parents=True, mode=0o700)
    os.link(victim, state / "locks" / "db.lock")
    before = snapshot([victim])
    with pytest.raises(safefile.UnsafePath, match="hard links"):
        take_lock(state)
    assert snapshot([victim]) == before


@pytest.mark.parametrize(
    ("prepare", "problem"),
    [
        (lambda d: d.chmod(0o775), "writable by group or others"),
        (lambda d: d.chmod(0o1777), "writable by group or others"),
        (lambda d: os.chown(d, NOBODY, NOBODY), "owned by uid 65534"),
    ],
    ids=["group-writable", "world-writable-sticky", "owned-by-nobody"],
)
def test_an_unsafe_state_dir_is_refused_with_nothing_created(
    tmp_path: Path, prepare: object, problem: str
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    prepare(state)  # type: ignore[operator]
    with pytest.raises(safefile.UnsafePath, match=problem) as caught:
        take_lock(state)
    assert caught.value.exit_code == ExitCode.INVALID_INPUT
    with pytest.raises(safefile.UnsafePath, match=problem):
        StateStore(state)
    assert tree(state) == set()


def test_a_state_dir_under_a_parent_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chown(shared, NOBODY, NOBODY)  # nobody could rename `state` away and plant another
    with pytest.raises(safefile.UnsafePath, match="owned by uid 65534"):
        take_lock(shared / "state")
    assert tree(shared) == set()


def test_a_state_dir_may_be_created_under_a_sticky_directory(tmp_path: Path) -> None:
    """Like /tmp: others can write there but cannot replace what root created."""
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    with group_lock(sticky / "state", "db", "sync"):
        pass
    assert mode_of(sticky / "state") == 0o700


def test_a_state_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    """Report case S06: was a NotADirectoryError traceback."""
    state = tmp_path / "state"
    state.write_text("not a directory")
    before = snapshot([state])
    with pytest.raises(safefile.UnsafePath, match="is not a directory"):
        take_lock(state)
    assert snapshot([state]) == before


def test_a_planted_journal_symlink_is_refused(tmp_path: Path, victim: Path) -> None:
    journal = tmp_path / "db.dr.journal"
    journal.symlink_to(victim)
    before = snapshot([victim])
    with pytest.raises(JournalError, match="is a symbolic link"):
        Journal(journal)
    assert snapshot([victim]) == before


def test_a_new_journal_file_is_private(tmp_path: Path) -> None:
    with Journal(tmp_path / "j"):
        pass
    assert mode_of(tmp_path / "j") == 0o600


def test_dir_site_partial_symlink_is_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    """Security review: a planted `.NAME.partial` link made root write the delta into the victim."""
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    name = "db.0000000002.0000000001.delta"
    (vault / f".{name}.partial").symlink_to(victim)
    before = snapshot([victim])
    final = write_durably(vault, name, lambda out: out.write(b"delta bytes"))
    assert snapshot([victim]) == before
    assert final.read_bytes() == b"delta bytes"
    assert mode_of(final) == 0o600
    assert tree(vault) == {name}


def test_a_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    def fail(out: io.BufferedWriter) -> None:
        out.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        write_durably(tmp_path, "x.delta", fail)  # type: ignore[arg-type]
    assert tree(tmp_path) == set()


def test_cow_file_symlink_is_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    cow = tmp_path / "db.data.cow"
    cow.symlink_to(victim)
    before = snapshot([victim])
    loop.create_sparse_file(cow, 1 << 20)
    assert snapshot([victim]) == before
    assert not cow.is_symlink() and cow.stat().st_size == 1 << 20
    assert mode_of(cow) == 0o600


def test_create_new_never_opens_an_existing_path(tmp_path: Path, victim: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError):
        safefile.create_new(link)
    with pytest.raises(FileExistsError):
        safefile.create_new(victim)


def dir_site(path: Path) -> Receiver:
    return factories.receiver(factories.dir_site(path), path.parent / "state")


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o1777])
def test_a_dir_site_others_can_write_is_misconfigured(tmp_path: Path, mode: int) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    vault.chmod(mode)
    with pytest.raises(ReplicaMismatch, match="writable by group or others"):
        dir_site(vault).check()


def test_a_dir_site_owned_by_another_user_is_misconfigured(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir(mode=0o700)
    os.chown(vault, NOBODY, NOBODY)
    with pytest.raises(ReplicaMismatch, match="owned by uid 65534"):
        dir_site(vault).check()
    vault.chmod(0o700)
    os.chown(vault, 0, 0)
    dir_site(vault).check()  # a private root-owned directory is fine


def test_reading_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "db.0000000001.full.delta"
    os.mkfifo(fifo)
    with pytest.raises(safefile.UnsafePath, match="a FIFO"):
        safefile.open_regular_for_reading(fifo)
    with pytest.raises(safefile.UnsafePath, match="a directory"):
        safefile.open_regular_for_reading(tmp_path)
