"""One run per group at a time: an exclusive, non-blocking lock file in the state directory.

The kernel releases a `flock` when its holder dies, even by `kill -9`, so a stale
lock never needs cleaning up. The file names its holder for the message a second
run prints; when the process the kernel says holds the lock is not the one the file
names (another program took it with `flock`), the message names that process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmrepl import safefile
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.statedir import StateDir


class Busy(DmreplError):
    """Another run holds the group's lock."""

    exit_code = ExitCode.BUSY


class LockUnusable(DmreplError):
    """The lock file cannot be opened or written (a read-only or full filesystem)."""

    exit_code = ExitCode.INVALID_INPUT  # like a state_dir that cannot be used (safefile)


def _unusable(path: Path, exc: OSError) -> LockUnusable:
    return LockUnusable(
        f"cannot use the lock file {path}: {exc.strerror or exc}",
        hint="check that the state directory is writable and not on a full or read-only "
        "filesystem; nothing was changed",
    )


PROC_LOCKS = Path("/proc/locks")


def flock_holders(fd: int, proc_locks: Path = PROC_LOCKS) -> list[int]:
    """The pids /proc/locks names as holding a `flock` on the file open as `fd` (empty if it
    cannot tell: no /proc, or a holder in another pid namespace)."""
    st = os.fstat(fd)
    try:
        lines = proc_locks.read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # "->" lines are waiters
            continue
        try:
            major, minor, inode = fields[5].split(":")
            pid = int(fields[4])
            same = (int(major, 16), int(minor, 16), int(inode)) == (
                os.major(st.st_dev),
                os.minor(st.st_dev),
                st.st_ino,
            )
        except ValueError:
            continue
        if same and pid > 0 and pid not in pids:
            pids.append(pid)
    return pids


def _command_of(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "exited meanwhile"
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return text[:200] or "no command line"


def describe_holder(fd: int) -> str:
    """Who holds the lock open as `fd`: the record a dmrepl run wrote, if that run is the
    holder the kernel reports; else the holder's pid and command line."""
    recorded = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    pids = flock_holders(fd)
    if not pids or any(recorded.startswith(f"pid {pid} ") for pid in pids):
        return recorded or "unknown"
    return ", ".join(f"pid {pid} ({_command_of(pid)})" for pid in pids)


@contextmanager
def group_lock(state_dir: Path, group: str, purpose: str) -> Iterator[None]:
    """Hold `<state>/locks/<group>.lock` for the body; raise Busy at once if it is held."""
    paths = StateDir(state_dir)
    safefile.private_dir(paths.locks, what="state_dir", strict_from=state_dir)
    path = paths.lock(group)
    try:
        fd = safefile.open_own(path)
    except OSError as exc:
        raise _unusable(path, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(
                f"group {group} is busy: {describe_holder(fd)}",
                hint="wait for that run to finish (or stop it); this run changed nothing",
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} ({purpose}, started {started}, {' '.join(sys.argv[:3])})"
        record = holder.encode()
        try:  # written before the old record is cut off: a full disk leaves that one whole
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        except OSError as exc:
            raise _unusable(path, exc) from None
        yield
    finally:
        os.close(fd)  # releases the lock


@contextmanager
def takeover_lock(
    path: Path, state_dir: Path, purpose: str, *, grace_s: float = 10.0
) -> Iterator[list[int]]:
    """Hold `path` exclusively for the body, killing (SIGKILL) any process holding it; yields
    the pids killed. For a receiver: an older session on the same site is one its primary
    already gave up on (the primary's group lock allows one sync at a time), and left running
    it could still write a delta it received late into the journal the new session uses."""
    safefile.private_dir(path.parent, what="state_dir", strict_from=state_dir)
    try:
        fd = safefile.open_own(path)
    except OSError as exc:
        raise _unusable(path, exc) from None
    killed: list[int] = []
    deadline = time.monotonic() + grace_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                for pid in flock_holders(fd):
                    if pid != os.getpid() and pid not in killed:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                        killed.append(pid)
                if time.monotonic() > deadline:
                    raise Busy(
                        f"{path} stays locked: {describe_holder(fd)}",
                        hint="another receiver session on this site does not exit",
                    ) from None
                time.sleep(0.05)
        record = f"pid {os.getpid()} ({purpose})".encode()
        os.pwrite(fd, record, 0)
        os.ftruncate(fd, len(record))
        yield killed
    finally:
        os.close(fd)


def lock_holder(state_dir: Path, group: str) -> str | None:
    """Who holds the group's lock now, or None if nobody does (never blocks).

    Opens an existing lock file read-only and creates nothing: no lock file (or no state
    directory) means nobody holds it.
    """
    return holder_of(StateDir(state_dir).lock(group))


def holder_of(path: Path) -> str | None:
    """Who holds the lock file `path` now, or None if nobody does or it does not exist
    (never blocks, creates nothing)."""
    try:
        fd = safefile.open_own(path, os.O_RDONLY, create=False)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return describe_holder(fd)
        return None
    finally:
        os.close(fd)
