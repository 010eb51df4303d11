"""Creating and opening dmrepl's own files safely, as root, in directories others may reach.

Files that hold replicated data (spool deltas, journals, dir-site files, `.partial`
files, copy-on-write files) are created 0600 in 0700 directories. Every file
dmrepl creates is opened with `O_NOFOLLOW` (a planted symlink never makes root
write elsewhere), new ones with `O_EXCL`. A directory dmrepl writes into must be
owned by root (or the user running dmrepl) and writable by nobody else, and so
must every directory above it, unless that one has the sticky bit (like /tmp).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from dmrepl.errors import InvalidInput

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700
PRIVATE_UMASK = 0o077

_NEW_FILE_FLAGS = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(InvalidInput):
    """A directory or file dmrepl would write is reachable by other users, or not its own."""


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _describe_mode(mode: int) -> str:
    return f"{stat.S_IMODE(mode):04o}"


def check_directory(path: Path, *, what: str, strict_from: Path | None = None) -> None:
    """Raise UnsafePath unless the existing directory `path` and all above it are safe.

    From `strict_from` (default: `path` itself) down, a directory must be owned by
    root (or us) and not writable by group or others. Above it, the same holds
    except that a sticky directory (such as /tmp) may be writable by all.
    """
    absolute = Path(os.path.abspath(path))
    shown = strict_from or path  # the configured path, in messages
    try:
        resolved = absolute.resolve(strict=True)
        strict = Path(os.path.abspath(strict_from or path)).resolve()
    except FileNotFoundError:
        raise UnsafePath(f"{what} {shown} does not exist") from None
    except OSError as exc:
        raise UnsafePath(f"{what} {shown} cannot be used: {exc.strerror}") from None
    for component in (*reversed(resolved.parents), resolved):
        info = os.stat(component)
        if not stat.S_ISDIR(info.st_mode):
            raise UnsafePath(
                f"{what} {shown}: {component} is not a directory",
                hint="point it at a directory",
            )
        if not _trusted_owner(info.st_uid):
            raise UnsafePath(
                f"{what} {shown}: {component} is owned by uid {info.st_uid}, not root; "
                "another user could replace what dmrepl writes there",
                hint=f"chown root {component} (or choose a directory root owns); "
                "nothing was changed",
            )
        sticky = bool(info.st_mode & stat.S_ISVTX)
        lenient = not component.is_relative_to(strict) and sticky
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not lenient:
            raise UnsafePath(
                f"{what} {shown}: {component} is writable by group or others "
                f"(mode {_describe_mode(info.st_mode)})",
                hint=f"chmod go-w {component} (dmrepl keeps replicated data there); "
                "nothing was changed",
            )


def private_dir(path: Path, *, what: str, strict_from: Path | None = None) -> Path:
    """Create `path` and its missing parents 0700, or check the existing ones; return `path`.

    What exists is checked (`check_directory`) before anything is created, so
    an unsafe location is refused with nothing created in it.
    """
    absolute = Path(os.path.abspath(path))
    missing: list[Path] = []
    existing = absolute
    while not os.path.lexists(existing):
        missing.append(existing)
        existing = existing.parent
    strict = strict_from or absolute
    check_directory(existing, what=what, strict_from=strict)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, PRIVATE_DIR_MODE)
        except FileExistsError:
            pass
        except OSError as exc:
            raise UnsafePath(
                f"{what}: cannot create {directory}: {exc.strerror}",
                hint="check the path and the filesystem it is on",
            ) from None
        check_directory(directory, what=what, strict_from=strict)
    return absolute


def create_new(path: Path, *, mode: int = PRIVATE_FILE_MODE) -> int:
    """A new file at `path` (O_EXCL: never an existing file, never through a symlink); its fd.

    Raises FileExistsError if anything, a symlink included, is at `path`.
    """
    return os.open(path, os.O_RDWR | _NEW_FILE_FLAGS, mode)


def replace_new(path: Path, *, mode: int = PRIVATE_FILE_MODE) -> int:
    """Like `create_new`, after removing whatever is at `path` (a stale file or a planted link).

    Removing a symlink removes the link, never its target.
    """
    path.unlink(missing_ok=True)
    return create_new(path, mode=mode)


def open_new(path: Path, *, buffering: int = -1) -> BinaryIO:
    """`replace_new`, as a binary file object for writing."""
    return os.fdopen(replace_new(path), "wb", buffering=buffering)


def open_own(path: Path, flags: int = os.O_RDWR, *, create: bool = True) -> int:
    """Open (creating 0600 if asked) one of dmrepl's own files, such as a lock; its fd.

    Refuses a symlink (O_NOFOLLOW), anything but a regular file, a file owned by
    another user and a file with other hard links: each could make root write a
    file that is not dmrepl's.
    """
    extra = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags | extra, PRIVATE_FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(
                f"{path} is a symbolic link; dmrepl does not follow links to its own files",
                hint=f"remove {path} (and find out who planted it); nothing was changed",
            ) from None
        raise
    try:
        _require_own_file(fd, path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_own_or_block_device(path: Path, *, create: bool = True) -> int:
    """Open read-write a block device (links followed, as in /dev/disk/by-id) or else,
    through `open_own`, one of dmrepl's own files (created 0600 if missing and `create`)."""
    try:
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        is_device = False
    if not is_device:
        return open_own(path, create=create)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    if not stat.S_ISBLK(os.fstat(fd).st_mode):  # replaced since the stat
        os.close(fd)
        raise UnsafePath(f"{path} changed while it was opened", hint="try again")
    return fd


def _require_own_file(fd: int, path: Path) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePath(
            f"{path} is not a regular file ({describe_kind(info.st_mode)})",
            hint=f"remove {path}; nothing was changed",
        )
    if not _trusted_owner(info.st_uid) or info.st_nlink > 1:
        raise UnsafePath(
            f"{path} is owned by uid {info.st_uid} or has other hard links ({info.st_nlink})",
            hint=f"remove {path} (and find out who planted it); nothing was changed",
        )


def open_regular_for_reading(path: Path, *, buffering: int = -1) -> BinaryIO:
    """Open an existing regular file to read, never blocking on a FIFO or device node.

    Links are followed (reading is harmless), but what they lead to must be a
    regular file; raises UnsafePath (exit 10) otherwise, OSError if it cannot open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePath(
                f"{path} is not a regular file ({describe_kind(mode)})",
                hint="a delta must be a regular file; remove or rename it",
            )
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def describe_kind(mode: int) -> str:
    """What a file of this mode is, for messages: "a FIFO", "a directory", ..."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a regular file")
