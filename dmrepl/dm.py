"""dmsetup operations as `Op` values, and read-only probes of dm devices.

Every device dmrepl creates carries a dm UUID starting with `UUID_PREFIX`;
probing and teardown only touch devices that carry it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dmrepl.errors import DmreplError
from dmrepl.ops import Op, command, probe

if TYPE_CHECKING:  # the probes below run commands through the caller's runner
    from dmrepl.executor import Runner

UUID_PREFIX = "DMREPL-"


def mapper_path(name: str) -> str:
    return f"/dev/mapper/{name}"


def create(name: str, table: str, uuid: str) -> Op:
    """Create and activate `name` with `table` (text on stdin)."""
    if not uuid.startswith(UUID_PREFIX):
        raise ValueError(f"dm UUID {uuid!r} lacks the reserved prefix {UUID_PREFIX!r}")
    return command("dmsetup", "create", name, "--uuid", uuid, stdin=table)


def create_empty(name: str, uuid: str) -> Op:
    """Create `name` with no table (suspended, no I/O); a `load` and `resume` activate it."""
    if not uuid.startswith(UUID_PREFIX):
        raise ValueError(f"dm UUID {uuid!r} lacks the reserved prefix {UUID_PREFIX!r}")
    return command("dmsetup", "create", name, "--uuid", uuid, "--notable")


def mknodes(name: str) -> Op:
    """Make `/dev/mapper/NAME` match the kernel's device (when no udev made it)."""
    return command("dmsetup", "mknodes", name)


def create_readonly(name: str, table: str, uuid: str) -> Op:
    """Create `name` read-only (writes fail with EPERM): a view for readers."""
    if not uuid.startswith(UUID_PREFIX):
        raise ValueError(f"dm UUID {uuid!r} lacks the reserved prefix {UUID_PREFIX!r}")
    return command("dmsetup", "create", "--readonly", name, "--uuid", uuid, stdin=table)


def load(name: str, table: str) -> Op:
    """Load `table` as the inactive table of `name`; a suspend and resume make it live."""
    return command("dmsetup", "load", name, stdin=table)


def remove(name: str) -> Op:
    # --retry: udev rules or blkid may hold the node open for a moment after use.
    return command("dmsetup", "remove", "--retry", name)


def remove_deferred(name: str) -> Op:
    """Remove now if closed, else as soon as the last opener closes it (nothing is failed)."""
    return command("dmsetup", "remove", "--deferred", name)


def suspend(name: str) -> Op:
    return command("dmsetup", "suspend", name)


def resume(name: str) -> Op:
    return command("dmsetup", "resume", name)


def message(name: str, text: str) -> Op:
    return command("dmsetup", "message", name, "0", text)


def status(name: str) -> Op:
    return probe("dmsetup", "status", name)


def table(name: str) -> Op:
    return probe("dmsetup", "table", name)


def info_fields(name: str, fields: str) -> Op:
    return probe("dmsetup", "info", "-c", "--noheadings", "--separator", ":", "-o", fields, name)


def is_suspended(runner: Runner, name: str) -> bool:
    """Whether `name` is suspended. Uses the device-info ioctl, which never blocks."""
    state = runner.run(info_fields(name, "suspended")).stdout.strip()
    return state == "Suspended"


def require_active(runner: Runner, name: str) -> None:
    """Refuse to talk to a suspended device.

    `dmsetup message` and `dmsetup status` to a suspended era device block until
    it is resumed (seen on Debian 6.1: it hung the whole test VM).
    """
    if is_suspended(runner, name):
        raise DmreplError(
            f"{name} is suspended; refusing to send it a message or ask its status",
            hint=f"resume it first with `dmsetup resume {name}` if nothing else is using it",
        )


def list_owned(runner: Runner) -> list[tuple[str, str]]:
    """(name, uuid) of every dm device whose UUID carries dmrepl's prefix."""
    return [(name, uuid) for name, uuid, *_ in _info_rows(runner) if uuid.startswith(UUID_PREFIX)]


@dataclass(frozen=True)
class ObservedDevice:
    """A dm device as the kernel reports it."""

    name: str
    uuid: str
    kernel_name: str  # dm-N
    suspended: bool
    open_count: int
    table: str  # live table ("" when none is loaded, e.g. after a killed create)


@dataclass(frozen=True)
class Observation:
    """All dm devices at one moment: dmrepl's own (with tables) and every name's UUID."""

    owned: dict[str, ObservedDevice]
    names: dict[str, str]


def observe(runner: Runner) -> Observation:
    """Two commands for the whole system: `dmsetup info -c` and `dmsetup table`."""
    rows = _info_rows(runner)
    tables = _all_tables(runner) if any(r[1].startswith(UUID_PREFIX) for r in rows) else {}
    owned = {
        name: ObservedDevice(name, uuid, kernel_name, suspended, opened, tables.get(name, ""))
        for name, uuid, kernel_name, suspended, opened in rows
        if uuid.startswith(UUID_PREFIX)
    }
    return Observation(owned, {name: uuid for name, uuid, *_ in rows})


def _all_tables(runner: Runner) -> dict[str, str]:
    """Live tables of every device: `dmsetup table` prints `<name>: <line>` per table line."""
    tables: dict[str, list[str]] = {}
    for line in runner.run(probe("dmsetup", "table")).stdout.splitlines():
        name, sep, rest = line.partition(": ")
        if not sep:
            continue  # "No devices found"
        tables.setdefault(name, [])
        if rest.strip():
            tables[name].append(rest.strip())
    return {name: "\n".join(lines) for name, lines in tables.items()}


def _info_rows(runner: Runner) -> list[tuple[str, str, str, bool, int]]:
    out = runner.run(
        probe(
            "dmsetup", "info", "-c", "--noheadings", "--separator", "|",
            "-o", "name,uuid,blkdevname,suspended,open",
        )
    ).stdout  # fmt: skip
    rows = []
    for line in out.splitlines():
        if not line.strip() or line.strip() == "No devices found":
            continue
        name, uuid, kernel_name, suspended, opened = line.strip().split("|")
        rows.append((name, uuid, kernel_name, suspended == "Suspended", int(opened)))
    return rows
