"""Every case of the report's sections "State store, lock, filesystem" (S*) and "With a fake
`dmsetup` that reports no devices" (F*) (../shared/reports/bad-input-2026-12.md), table-driven
like test_report_cases.py: the exit code docs/cli.md gives that kind of problem, a message
naming it, no traceback, and a hash of every file under the scratch tree `$W` the same before
and after, or changed exactly as the row says (`writes`, `creates`).

Case ids are the report's. dm="fake" pretends the kernel has device-mapper and puts the
report's fake `dmsetup` (no devices; refuses everything else) first on PATH. The scratch
devices are regular files, so a command that needs its devices stops at the device check
(exit 11) before the lock and the state store; rows with probes=True let them pass the probe
as block devices, so the command reaches the lock and the state store the S cases are about.
Past those, the fake dmsetup has no stacks running: "the group's stacks are not running"
(exit 18, changes.require_running) is where such a sync ends.

The state each case needs ($W/st-corrupt, a flock holder, a read-only or full tmpfs) is set
up by PREPARE, keyed by case id; mounts and holders are undone after the case.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmrepl.cli import filesystem_error
from dmrepl.errors import ExitCode
from dmrepl.lock import describe_holder, flock_holders, lock_holder
from dmrepl.replication import cycle
from dmrepl.spool import Spool
from dmrepl.state import StateStore
from dmrepl.statedir import StateDir
from tests.unit.badinput import (
    NOBODY,
    ROOT,
    Case,
    check_case,
    good_config,
    public_scratch,
)

ERR = ExitCode
FAKE = "fake"
GOOD = good_config()
NOT_RUNNING = "the group's stacks are not running"
STALE = "pid 11396 (sync, started 2026-12-01 21:21:54, .venv/bin/dmrepl run db)"


def at(state_dir: str) -> str:
    """good.toml with its state_dir elsewhere under $W."""
    return GOOD.replace('state_dir = "$W/state"', f'state_dir = "{state_dir}"')


def _device(extra: str) -> str:
    return good_config(device=extra)


STATE_STORE = [
    Case(
        "S01",
        ("sync", "db"),
        ERR.NOT_RUNNING,
        "state.db is corrupt (file is not a database); moved it to state.db.corrupt-",
        at("$W/st-corrupt"),
        dm=FAKE,
        probes=True,
        writes=("st-corrupt/state.db", "st-corrupt/locks/db.lock"),
        creates=("st-corrupt/state.db.corrupt-*",),
        why="was a sqlite3.DatabaseError traceback: the store is a cache, so a corrupt one is "
        "kept aside as evidence and a new one started; the cycle then stops where this host "
        f"stops every sync ({NOT_RUNNING}, exit 18)",
    ),
    Case(
        "S01=",
        ("sync", "db"),
        ERR.DEVICE_MISSING,
        "refusing to sync group db: 2 configured device paths cannot be used",
        at("$W/st-corrupt"),
        dm=FAKE,
        why="the report's S01 devices (regular files) never pass the probe: exit 11 comes "
        "first, and the lock and the corrupt store are not touched",
    ),
    Case(
        "S01b",
        ("status", "db"),
        ERR.NO_DEVICE_MAPPER,
        "this kernel has no device-mapper",
        at("$W/st-corrupt"),
        why="was exit 4 with libdevmapper's text: on a kernel without device-mapper, exit 6 "
        "before dmsetup or the store (the store with the fake dmsetup: F12)",
    ),
    Case(
        "S01c",
        ("status", "db", "--json"),
        ERR.NO_DEVICE_MAPPER,
        "this kernel has no device-mapper",
        at("$W/st-corrupt"),
    ),
    Case(
        "S01d",
        ("sync", "db"),
        ERR.NOT_RUNNING,
        "state.db is corrupt (database disk image is malformed)",
        at("$W/st-trunc"),
        dm=FAKE,
        probes=True,
        writes=("st-trunc/state.db",),
        creates=("st-trunc/state.db.corrupt-*", "st-trunc/locks", "st-trunc/locks/db.lock"),
        why="was a traceback: a truncated store is corrupt too, kept aside and started anew",
    ),
    Case(
        "S02",
        ("sync", "db"),
        ERR.BUSY,
        "(flock $W/state/locks/db.lock sleep 60)",
        dm=FAKE,
        probes=True,
        config=GOOD,
        forbid=("11396",),
        why="the holder is `flock`, not dmrepl: the message names the process that holds the "
        "lock (from /proc/locks), never the stale record an earlier run left in the file",
    ),
    Case(
        "S02b",
        ("sync", "db"),
        ERR.BUSY,
        "(run, started ",
        GOOD,
        dm=FAKE,
        probes=True,
        why="baseline: a concurrent dmrepl run is named by its own record",
    ),
    Case(
        "S03",
        ("sync", "db"),
        ERR.NOT_RUNNING,
        NOT_RUNNING,
        GOOD,
        dm=FAKE,
        probes=True,
        forbid=("busy",),
        writes=("state/locks/db.lock",),
        creates=("state/state.db",),
        why="baseline: a lock file nobody holds (a run killed with -9) is no obstacle; the "
        "run takes it and writes its own record",
    ),
    Case(
        "S04",
        ("sync", "db"),
        ERR.INVALID_INPUT,
        "Read-only file system",
        at("$W/mnt-ro/state"),
        dm=FAKE,
        probes=True,
        why="was an OSError traceback: a state_dir that cannot be created is refused with "
        "nothing written",
    ),
    Case(
        "S04=",
        ("sync", "db"),
        ERR.INVALID_INPUT,
        "Read-only file system",
        at("$W/mnt-ro/kept"),
        dm=FAKE,
        probes=True,
        why="an existing state dir (lock, store) on a filesystem remounted read-only",
    ),
    Case(
        "S04b",
        ("status", "db"),
        ERR.DEVICE_MISSING,
        "site db/dr (blockdev, asynchronous): not seeded",
        at("$W/mnt-ro/kept"),
        dm=FAKE,
        why="was exit 4 with libdevmapper's text (6 on this kernel without the fake dmsetup), "
        "then exit 10 (Read-only file system): status only reads, so it shows what a state "
        "dir on a read-only filesystem holds, then exits 11 for the devices that do not probe",
    ),
    Case(
        "S05",
        ("sync", "db"),
        ERR.INVALID_INPUT,
        "No space left on device",
        at("$W/mnt-full/state"),
        dm=FAKE,
        probes=True,
        creates=("mnt-full/state", "mnt-full/state/locks", "mnt-full/state/locks/db.lock"),
        why="was an ENOSPC traceback: the run stops at the lock's record, leaving the empty "
        "lock file and its directories (a lock nobody holds: harmless, and no data)",
    ),
    Case(
        "S05=",
        ("sync", "db"),
        ERR.INVALID_INPUT,
        "cannot use the state store $W/mnt-full/kept/state.db: database or disk is full",
        at("$W/mnt-full/kept"),
        dm=FAKE,
        probes=True,
        writes=("mnt-full/kept/locks/db.lock",),
        creates=("mnt-full/kept/state.db",),
        why="the lock's record fits (its page is the old record's); the new store does not: "
        "a clear exit 10, with an empty state.db that the next run fills",
    ),
    Case(
        "S05+",
        ("sync", "db"),
        ERR.FAILURE,
        "No space left on device: $W/state/spool/db/.db.0000000002.0000000001.delta.partial",
        GOOD,
        dm=FAKE,
        probes=True,
        creates=("state", "state/state.db", "state/locks", "state/locks/db.lock"),
        why="the report's S05 traceback came from a write in the middle of a cycle (this host "
        "has no stacks to get there: the cycle is replaced by one whose spool write fails); "
        "said plainly, exit 1 like apply's write errors, the lock released",
    ),
    Case(
        "S05b",
        ("apply", "$W/deltas", "--group", "db", "--to", "data=$W/mnt-full/t"),
        ERR.FAILURE,
        "No space left on device",
        why="was a traceback with the target partly written: docs/cli.md gives a write error "
        "exit 1 with what the target holds now",
    ),
    Case(
        "S06",
        ("sync", "db"),
        ERR.INVALID_INPUT,
        "is not a directory",
        at("$W/dev/origin"),
        dm=FAKE,
        probes=True,
        why="was a NotADirectoryError traceback",
    ),
    Case(
        "S07",
        ("sync", "db"),
        ERR.INVALID_INPUT,
        "owned by uid 65534",
        at("$W/evil-state"),
        dm=FAKE,
        probes=True,
        why="was root overwriting a root-only file through a planted lock symlink: a state "
        "dir another user owns is refused before anything in it is opened",
    ),
]

CHECK_MESSAGE = "origin $W/dev/origin is not a block device"
FAKE_DMSETUP = [
    Case("F01", ("check-config",), ERR.DEVICE_MISSING, CHECK_MESSAGE, GOOD, dm=FAKE),
    Case(
        "F02",
        ("check-config",),
        ERR.DEVICE_MISSING,
        "origin /nonexistent/origin does not exist",
        GOOD.replace("$W/dev/origin", "/nonexistent/origin").replace(
            "$W/dev/metadata", "/nonexistent/metadata"
        ),
        dm=FAKE,
    ),
    Case(
        "F03",
        ("check-config",),
        ERR.DEVICE_MISSING,
        "origin $W/dev/adir is not a block device",
        GOOD.replace("$W/dev/origin", "$W/dev/adir").replace("$W/dev/metadata", "/dev/null"),
        dm=FAKE,
    ),
    Case(
        "F04",
        ("check-config",),
        ERR.CONFIG,
        "$W/dev/origin is also the origin",
        GOOD.replace('metadata = "$W/dev/metadata"', 'metadata = "$W/dev/origin"'),
        dm=FAKE,
        why="was exit 11 that hid the overlap: the same path as origin and metadata is now a "
        "configuration error, found before any device is probed",
    ),
    Case(
        "F05",
        ("check-config",),
        ERR.CONFIG,
        "metadata_size: must be greater than 0",
        _device('metadata_size = "0"'),
        dm=FAKE,
        why="was exit 11 first, with 0 accepted: now refused by the parser",
    ),
    Case(
        "F06",
        ("check-config",),
        ERR.CONFIG,
        "reserved by device-mapper",
        GOOD.replace("device.data]", "device.control]").replace(
            'data = "$W/dev/replica"', 'control = "$W/dev/replica"'
        ),
        dm=FAKE,
        why="was exit 11 first, with the name the kernel refuses accepted",
    ),
    Case(
        "F07",
        ("check-config",),
        ERR.CONFIG,
        "dm allows 128",
        good_config(sites="")
        .replace("group.db.", f"group.{'g' * 64}.")
        .replace("device.data]", f"device.{'d' * 64}]"),
        dm=FAKE,
        why="was exit 11 first, with a UUID over dm's 128 characters accepted",
    ),
    Case(
        "F08",
        ("check-config",),
        ERR.CONFIG,
        "would also be a layer of",
        good_config(sites="")
        + '[group.db.device.data-meta]\norigin = "$W/dev/replica"\nmetadata = "$W/nb/t"\n',
        dm=FAKE,
        why="was exit 11 first: devices `data` and `data-meta` would share a dm name",
    ),
    Case(
        "F09",
        ("sync", "db"),
        ERR.DEVICE_MISSING,
        "refusing to sync group db: 2 configured device paths cannot be used; nothing",
        GOOD,
        dm=FAKE,
        why="was exit 0 with a cut of 0 devices and both sites marked in sync (finding 1)",
    ),
    Case("F10", ("up", "--dry-run"), ERR.DEVICE_MISSING, CHECK_MESSAGE, GOOD, dm=FAKE),
    Case(
        "F11",
        ("changes", "db", "--since-cut", "-1"),
        ERR.INVALID_INPUT,
        "--since-cut -1 is out of range",
        GOOD,
        dm=FAKE,
        why="now checked before the config, the kernel and recovery (exit 10 either way)",
    ),
    Case(
        "F12",
        ("status",),
        ERR.DEVICE_MISSING,
        "state.db is corrupt (file is not a database): read as holding no history, and left",
        at("$W/st-corrupt"),
        dm=FAKE,
        why="was a sqlite3.DatabaseError traceback, then a store moved aside by status: status "
        "only reads, so it warns and shows no history (the next sync moves the store aside), "
        "then exits 11 for the devices that do not probe",
    ),
    Case(
        "F13",
        ("changes", "db"),
        ERR.DEVICE_MISSING,
        "refusing to take a cut of group db: 2 configured device paths cannot be used",
        GOOD,
        dm=FAKE,
        why="was exit 0 recording a cut with no devices (finding 1)",
    ),
    Case(
        "F14",
        ("status",),
        ERR.DEVICE_MISSING,
        "2 configured device path(s) cannot be used",
        GOOD,
        dm=FAKE,
        why="was exit 0 leaving the device out: status shows what it can and names the device",
    ),
    Case(
        "F15",
        ("sync", "db"),
        ERR.CONFIG,
        "group.db.site.vault.path: $W/dev/origin is not a directory",
        GOOD.replace('path = "$W/vault"', 'path = "$W/dev/origin"'),
        dm=FAKE,
        why="was exit 17 after a cut was taken and a spool delta written: a configuration "
        "error now, before anything is created",
    ),
    Case(
        "F16",
        ("sync", "db"),
        ERR.DEVICE_MISSING,
        "origin /nonexistent/origin does not exist",
        at("$W/state-nodev").replace("$W/dev/origin", "/nonexistent/origin"),
        dm=FAKE,
        why="was an AssertionError after the cut (a store without the cut a site holds): the "
        "missing path now stops it first; the lost-store path itself is "
        "test_state_rebuild.py's",
    ),
    Case(
        "F17",
        ("seed", "db", "--site", "dr"),
        ERR.DEVICE_MISSING,
        "refusing to seed group db",
        at("$W/state-nodev").replace("$W/dev/origin", "/nonexistent/origin"),
        dm=FAKE,
    ),
]

CASES = STATE_STORE + FAKE_DMSETUP


# -- the state each case starts from ------------------------------------------------------


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _earlier_sync(state: Path) -> Path:
    """The state dir as an earlier `sync` left it: store, spool, lock."""
    _private(state)
    StateStore(state, warn=pytest.fail).close()
    Spool(StateDir(state), "db", 1 << 30).prepare()
    (_private(state / "locks") / "db.lock").write_text(STALE)
    return state


def _corrupt(w: Path, _stack: contextlib.ExitStack) -> None:
    (_earlier_sync(w / "st-corrupt") / "state.db").write_bytes(b"not a database at all" * 300)


def _truncated(w: Path, _stack: contextlib.ExitStack) -> None:
    state = _private(w / "st-trunc")
    store = StateStore(state, warn=pytest.fail)
    for seq in range(1, 400):
        store.record_cut("db", {f"dev{n}": seq for n in range(8)}, 0.0)
    store.close()
    with (state / "state.db").open("r+b") as handle:
        handle.truncate(5000)


def _stale_lock(w: Path) -> Path:
    lock = _private(w / "state" / "locks") / "db.lock"
    lock.write_text(STALE)
    lock.chmod(0o600)
    return lock


def _held_by(stack: contextlib.ExitStack, w: Path, argv: list[str]) -> None:
    holder = subprocess.Popen(argv, cwd=ROOT)
    stack.callback(holder.wait)
    stack.callback(holder.kill)
    for _ in range(200):
        if lock_holder(w / "state", "db") is not None:
            return
        time.sleep(0.02)
    raise AssertionError("the holder never took the lock")


def _flock_holder(w: Path, stack: contextlib.ExitStack) -> None:
    _held_by(stack, w, ["flock", str(_stale_lock(w)), "sleep", "60"])


def _dmrepl_holder(w: Path, stack: contextlib.ExitStack) -> None:
    _stale_lock(w)
    code = (
        "import sys, time; from pathlib import Path; from dmrepl.lock import group_lock\n"
        "with group_lock(Path(sys.argv[1]), 'db', 'run'): time.sleep(60)"
    )
    _held_by(stack, w, [sys.executable, "-c", code, str(w / "state")])


def _mount(stack: contextlib.ExitStack, where: Path, options: str) -> None:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True)
    stack.callback(subprocess.run, ["umount", str(where)], check=True)


def _read_only(w: Path, stack: contextlib.ExitStack) -> None:
    where = w / "mnt-ro"
    _mount(stack, where, "size=1m,mode=0755")
    kept = _private(where / "kept")
    StateStore(kept, warn=pytest.fail).close()  # an earlier run's lock and store
    (_private(kept / "locks") / "db.lock").write_text(STALE)
    subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)


def _full(w: Path, stack: contextlib.ExitStack) -> None:
    where = w / "mnt-full"
    _mount(stack, where, "size=256k,mode=0755")
    with open(where / "t", "wb") as target:  # apply's target: a sparse image (S05b)
        target.truncate(2048 * 512)
    kept = _private(where / "kept")  # an earlier run's lock, its store lost (S05=)
    (_private(kept / "locks") / "db.lock").write_text(STALE)
    with open(where / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:
            filler.write(b"\xff" * 4096)


def _full_mid_cycle(w: Path, stack: contextlib.ExitStack) -> None:
    partial = w / "state/spool/db/.db.0000000002.0000000001.delta.partial"

    class Cycle:
        def __init__(self, *_args: object) -> None:
            pass

        def run(self, *_args: object, **_kwargs: object) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(partial))

        def close(self) -> None:
            pass

    patch = stack.enter_context(pytest.MonkeyPatch.context())
    patch.setattr(cycle, "Cycle", Cycle)


def _evil_state(w: Path, _stack: contextlib.ExitStack) -> None:
    victim = w / "victim.txt"
    victim.write_text("ROOT ONLY\n")
    victim.chmod(0o600)
    evil = w / "evil-state"
    (evil / "locks").mkdir(parents=True)
    (evil / "locks" / "db.lock").symlink_to(victim)
    for path in (evil, evil / "locks"):
        os.chown(path, NOBODY, NOBODY)
    os.lchown(evil / "locks" / "db.lock", NOBODY, NOBODY)


def _unheld_stale_lock(w: Path, _stack: contextlib.ExitStack) -> None:
    _stale_lock(w)


def _after_a_sync(w: Path, _stack: contextlib.ExitStack) -> None:
    _earlier_sync(w / "state")


PREPARE: dict[str, Callable[[Path, contextlib.ExitStack], None]] = {
    "S01": _corrupt,
    "S01=": _corrupt,
    "S01b": _corrupt,
    "S01c": _corrupt,
    "S01d": _truncated,
    "S02": _flock_holder,
    "S02b": _dmrepl_holder,
    "S03": _unheld_stale_lock,
    "S04": _read_only,
    "S04=": _read_only,
    "S04b": _read_only,
    "S05": _full,
    "S05=": _full,
    "S05+": _full_mid_cycle,
    "S05b": _full,
    "S07": _evil_state,
    "F12": _corrupt,
    "F14": _after_a_sync,
}


@pytest.fixture
def scratch() -> Iterator[Path]:
    with public_scratch() as w:
        yield w


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_report_case(case: Case, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with contextlib.ExitStack() as stack:
        PREPARE.get(case.id, lambda _w, _stack: None)(scratch, stack)
        check_case(case, scratch, monkeypatch)


def test_every_case_is_named_once() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


def test_every_state_and_fake_dmsetup_case_of_the_report_is_here() -> None:
    report = [f"S0{n}" for n in range(1, 8)] + [f"F{n:02}" for n in range(1, 18)]
    report += ["S01b", "S01c", "S01d", "S02b", "S04b", "S05b"]
    assert sorted(set(report) - {c.id for c in CASES}) == []


def test_proc_locks_is_read_for_flock_holders_of_that_file_only(tmp_path: Path) -> None:
    """S02's fix reads /proc/locks: FLOCK lines of this inode, never waiters or POSIX locks."""
    lock = tmp_path / "db.lock"
    lock.write_text(STALE)
    fd = os.open(lock, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        here = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        table = tmp_path / "locks"
        table.write_text(
            f"1: FLOCK  ADVISORY  WRITE 4242 {here} 0 EOF\n"
            f"1: -> FLOCK  ADVISORY  WRITE 5353 {here} 0 EOF\n"
            f"2: POSIX  ADVISORY  WRITE 6464 {here} 0 EOF\n"
            f"3: FLOCK  ADVISORY  WRITE 7575 {here}0 0 EOF\n"
            "4: FLOCK  ADVISORY  WRITE x y 0 EOF\n"
        )
        assert flock_holders(fd, table) == [4242]
        assert flock_holders(fd, tmp_path / "no-such-table") == []
        with lock.open("rb") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            assert flock_holders(fd) == [os.getpid()]  # the real table, this process
            shown = describe_holder(fd)
            assert shown.startswith(f"pid {os.getpid()} (") and "11396" not in shown
            own = f"pid {os.getpid()} (sync, started 2026-12-02 00:00:00, dmrepl sync db)"
            lock.write_text(own)
            assert describe_holder(fd) == own  # the holder's own record
    finally:
        os.close(fd)


def test_only_a_full_read_only_or_failing_filesystem_is_rendered_without_traceback() -> None:
    """Any other OSError is a bug of dmrepl's: its traceback stays (exit 1)."""
    full = filesystem_error(OSError(errno.EROFS, "Read-only file system", "/x/state.db"))
    assert full is not None and full.message == "Read-only file system: /x/state.db"
    assert full.exit_code == ERR.FAILURE
    assert filesystem_error(OSError(errno.ENOENT, "No such file or directory")) is None
