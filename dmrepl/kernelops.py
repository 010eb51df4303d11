"""Ops the runner answers with ioctls instead of a process.

A `dmsetup` or `losetup` is a process start (about 0.1 s in user-mode Linux, where
every system call is traced) around one or a few ioctls. `perform` recognises the exact
ops `dmrepl.dm` and `dmrepl.loop` build for queries and for the cycle's short-lived
devices, makes the same ioctls, and answers with the text the command would have
printed, so the parsers, dry runs and logs stay as they are. Any other op (a `create`
with a table, a read-only or deferred remove, anything with other options) returns None
and runs as the command. Failures come back as the command's would: exit code 1 and
the kernel's error on stderr.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

from dmrepl import dmioctl, loopioctl
from dmrepl.ops import Op, Result

INFO_FIELDS = frozenset({"name", "uuid", "blkdevname", "suspended", "open"})
Answer = Callable[[], str]


def perform(op: Op) -> Result | None:
    """Answer `op` with ioctls, or None when it must run as a process."""
    answer = _answer_for(op)
    if answer is None:
        return None
    try:
        stdout = answer()
    except loopioctl.NotSupported:
        return None
    except (OSError, ValueError) as exc:  # ValueError: a name the kernel cannot hold
        reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
        return Result(op.argv, 1, "", f"{op.argv[0]}: {op.argv[1]}: {reason}\n", 0.0)
    return Result(op.argv, 0, stdout, "", 0.0)


def _answer_for(op: Op) -> Answer | None:
    argv = op.argv
    if argv[0] == "losetup":
        return _losetup(argv[1:])
    if argv[0] != "dmsetup" or len(argv) < 2:
        return None
    request = dmioctl.request_for(op)  # suspend, resume, message, load
    if request is not None:
        return _silent(dmioctl.issue, request)
    return _dmsetup(argv[1], argv[2:])


def _silent(action: Callable[..., object], *args: str | dmioctl.Request) -> Answer:
    """An answer that does `action(*args)` and prints nothing, as the command would."""

    def answer() -> str:
        action(*args)
        return ""

    return answer


def _dmsetup(verb: str, args: tuple[str, ...]) -> Answer | None:
    match verb, args:
        case (("status" | "table"), (name,)) if not name.startswith("-"):
            return lambda: _target_lines(name, table=verb == "table")
        case "table", ():
            return _all_tables
        case "info", ("-c", "--noheadings", "--separator", sep, "-o", fields, *names):
            wanted = fields.split(",")
            if set(wanted) <= INFO_FIELDS and len(names) <= 1:
                return lambda: _info_rows(names, wanted, sep)
        case "create", (name, "--uuid", uuid, "--notable"):
            return _silent(dmioctl.issue, dmioctl.create(name, uuid))
        case "mknodes", (name,):
            return _silent(dmioctl.make_node, name)
        case "remove", ("--retry", name):
            return _silent(dmioctl.remove_device, name)
    return None


def _losetup(args: tuple[str, ...]) -> Answer | None:
    match args:
        case ("--find", "--show", path):
            return lambda: loopioctl.attach(path) + "\n"
        case ("--detach", node):
            return _silent(loopioctl.detach, node)
    return None


def _target_lines(name: str, *, table: bool) -> str:
    """`dmsetup status NAME` / `dmsetup table NAME`: one line per target (an empty
    line when no table is loaded)."""
    lines = [
        f"{start} {length} {kind} {text}"
        for start, length, kind, text in dmioctl.targets(name, table=table)
    ]
    return "\n".join(lines or [""]) + "\n"


def _all_tables() -> str:
    """`dmsetup table`: every device's lines, each prefixed with `NAME: `."""
    lines = []
    for name in dmioctl.devices():
        try:
            own = _target_lines(name, table=True).splitlines()
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
            continue  # removed since the list was read
        lines += [f"{name}: {line}" for line in own]
    return "".join(line + "\n" for line in lines) or "No devices found\n"


def _info_rows(names: list[str], fields: list[str], separator: str) -> str:
    """`dmsetup info -c --noheadings -o FIELDS [NAME]`, for one device or all of them."""
    rows = []
    for name in names or dmioctl.devices():
        try:
            reply = dmioctl.device(name)
        except OSError as exc:
            if names or exc.errno != errno.ENXIO:
                raise  # the named device is missing: dmsetup fails the same way
            continue  # removed since the list was read
        values = {
            "name": reply.name,
            "uuid": reply.uuid,
            "blkdevname": f"dm-{os.minor(reply.dev)}",
            "suspended": "Suspended" if reply.suspended else "Active",
            "open": str(reply.open_count),
        }
        rows.append(separator.join(values[field] for field in fields))
    if not rows:
        return "No devices found\n"
    return "".join(row + "\n" for row in rows)
