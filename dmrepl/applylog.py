"""A record, kept while `dmrepl apply` writes, of what its targets hold.

`apply` verifies everything before it writes, and says what the targets hold
when an error or a signal stops it. A `kill -9`, a crash or a power cut leaves
no process to say it: so before each delta is written, a small record naming
the targets, the cut they held and the cut being written is made durable, and
it is removed once the targets hold a whole cut again. The next `apply` onto
the same targets finds it, says what they hold, and refuses a `--from-cut` that
the targets do not hold.

Records live under /var/lib/dmrepl/apply (root only; another user's under
~/.local/state/dmrepl/apply), one per set of targets; DMREPL_APPLY_RECORDS
names another directory (the tests use their own). The record is an aid, not a
lock: where it cannot be kept, `apply` says so and goes on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from dmrepl import safefile
from dmrepl.config import DEFAULT_STATE_DIR
from dmrepl.deltafiles import fsync_directory, write_durably
from dmrepl.errors import DmreplError

RECORD_DIR = DEFAULT_STATE_DIR / "apply"


def record_dir() -> Path:
    configured = os.environ.get("DMREPL_APPLY_RECORDS")
    if configured:
        return Path(configured)
    if os.geteuid() == 0:
        return RECORD_DIR
    return Path.home() / ".local/state/dmrepl/apply"


@dataclass(frozen=True)
class InProgress:
    """An apply that was writing `writing` (a delta file) onto `targets` when it stopped."""

    group: str
    targets: dict[str, str]  # device name -> target path
    held: int | None  # the cut the targets held before (None: a full image was being written)
    writing: int  # the cut being written
    file: str
    started: float

    def describe(self) -> str:
        """What the targets hold, in words."""
        if self.held is None:
            return (
                f"the targets hold no complete cut: a full image of cut {self.writing} "
                f"({self.file}) was partly written"
            )
        return (
            f"the targets are between cut {self.held} and cut {self.writing}: they held cut "
            f"{self.held}, and {self.file} was partly written"
        )


def target_identity(path: str) -> str:
    """What names a target across reboots: a dm device by its dm UUID (an LV's /dev/dm-N
    changes), another block device by the path given (use /dev/disk/by-id links), a file by
    its real path."""
    try:
        info = os.stat(path)
    except OSError:
        return f"path:{path}"
    if not stat.S_ISBLK(info.st_mode):
        return f"file:{os.path.realpath(path)}"
    uuid_file = Path(f"/sys/dev/block/{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}/dm/uuid")
    with contextlib.suppress(OSError):
        uuid = uuid_file.read_text().strip()
        if uuid:
            return f"dm:{uuid}"
    return f"path:{path}"


def record_path(targets: Mapping[str, str], directory: Path | None = None) -> Path:
    """Where the record of this set of targets lives (named by their identities)."""
    key = json.dumps(sorted((name, target_identity(path)) for name, path in targets.items()))
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return (directory or record_dir()) / f"{digest}.json"


def read(targets: Mapping[str, str], directory: Path | None = None) -> InProgress | None:
    """The record left by an apply onto these targets that did not finish (None: none)."""
    path = record_path(targets, directory)
    try:
        if not path.is_file():
            return None
        with safefile.open_regular_for_reading(path) as stream:
            fields = json.loads(stream.read())
        return InProgress(**fields)
    except (OSError, ValueError, TypeError):
        return InProgress("?", dict(targets), None, 0, f"an unreadable record {path}", 0.0)


def write(record: InProgress, directory: Path | None = None) -> str | None:
    """Make the record durable before any byte of `record.writing` reaches the targets.

    Returns why it could not be kept (None: kept).
    """
    path = record_path(record.targets, directory)
    try:
        safefile.private_dir(path.parent, what="the apply records' directory")
        write_durably(
            path.parent, path.name, lambda out: out.write(json.dumps(asdict(record)).encode())
        )
    except OSError as exc:
        return f"{path.parent}: {exc.strerror or exc}"
    except DmreplError as exc:
        return exc.message
    return None


def clear(targets: Mapping[str, str], directory: Path | None = None) -> None:
    """The targets hold a whole cut again: drop the record."""
    path = record_path(targets, directory)
    with contextlib.suppress(OSError):
        if os.path.lexists(path):
            path.unlink()
            fsync_directory(path.parent)


def started(
    group: str, targets: Mapping[str, str], held: int | None, writing: int, file: str
) -> InProgress:
    return InProgress(group, dict(targets), held, writing, file, time.time())
