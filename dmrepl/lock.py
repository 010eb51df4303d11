"""One run per group at a time: an exclusive, non-blocking lock file in the state directory.

The kernel releases a `flock` when its holder dies, even by `kill -9`, so a stale
lock never needs cleaning up. The file names its holder for the message a second
run prints.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dmrepl import safefile
from dmrepl.errors import DmreplError, ExitCode


class Busy(DmreplError):
    """Another run holds the group's lock."""

    exit_code = ExitCode.BUSY


@contextmanager
def group_lock(state_dir: Path, group: str, purpose: str) -> Iterator[None]:
    """Hold `<state>/locks/<group>.lock` for the body; raise Busy at once if it is held."""
    directory = safefile.private_dir(state_dir / "locks", what="state_dir", strict_from=state_dir)
    fd = safefile.open_own(directory / f"{group}.lock")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise Busy(
                f"group {group} is busy: {holder}",
                hint="wait for that run to finish (or stop it); this run changed nothing",
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        holder = f"pid {os.getpid()} ({purpose}, started {started}, {' '.join(sys.argv[:3])})"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_holder(state_dir: Path, group: str) -> str | None:
    """Who holds the group's lock now, or None if nobody does (never blocks)."""
    path = state_dir / "locks" / f"{group}.lock"
    try:
        fd = safefile.open_own(path, os.O_RDONLY, create=False)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
        return None
    finally:
        os.close(fd)
