"""Which role a group has on this host, by two durable records under the state directory.

A group is primary where it is configured, until it is demoted (`dmrepl switchover`, or
`dmrepl demote` on an old primary back after a failover): from then on this host is a site
of the new primary, and nothing here may cut, ship or bring the group's stack up, which
would fork its history. `dmrepl promote` makes it primary again (and, on a DR host, for the
first time). Each record is written whole and durably: a crash leaves the old one or the
new one.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dmrepl import deltafiles, dm
from dmrepl.config import Config, SshAddress
from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import lock_holder
from dmrepl.ranges import Extent
from dmrepl.safefile import private_dir
from dmrepl.stack import Layer, layer_name
from dmrepl.state import StateStore
from dmrepl.statedir import StateDir

ASK_TIMEOUT_S = 30.0  # for the whole `ssh ... dmrepl role` exchange


class NotPrimary(DmreplError):
    """The group was demoted on this host."""

    exit_code = ExitCode.NOT_PRIMARY


@dataclass(frozen=True)
class Demotion:
    """An old primary's record of its demotion; `dmrepl reverse` reads it on the new one.

    `discarded` holds what this host wrote after `cut` (sectors, per device): the new
    primary never got it, so it sends those ranges back when this host becomes its site.
    """

    group: str
    site: str  # the site that became (or becomes) primary
    cut: int  # the last cut that site is known to hold
    reason: str  # "switchover" or "failover"
    devices: dict[str, int]  # device -> sectors
    discarded: dict[str, list[Extent]] = field(default_factory=dict)
    saved: str | None = None  # the directory holding their data as a delta file
    time: float = 0.0

    @property
    def discarded_bytes(self) -> int:
        return 512 * sum(e.length for extents in self.discarded.values() for e in extents)

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group, "site": self.site, "cut": self.cut, "reason": self.reason,
            "devices": self.devices, "time": self.time, "saved": self.saved,
            "discarded": {d: [[e.begin, e.end] for e in es] for d, es in self.discarded.items()},
            "discarded_bytes": self.discarded_bytes,
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: object, source: str) -> Demotion:
        """Parse a record, saying what is wrong with one that does not fit."""
        try:
            assert isinstance(doc, dict)
            devices = {str(k): int(v) for k, v in doc["devices"].items()}
            discarded = {
                str(d): [Extent(int(b), int(e)) for b, e in extents]
                for d, extents in doc.get("discarded", {}).items()
            }
            record = cls(
                group=str(doc["group"]), site=str(doc["site"]), cut=int(doc["cut"]),
                reason=str(doc["reason"]), devices=devices, discarded=discarded,
                saved=doc.get("saved"), time=float(doc.get("time", 0.0)),
            )  # fmt: skip
        except (AssertionError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInput(
                f"{source} is not a demotion record ({type(exc).__name__}: {exc})",
                hint="give the demoted/<group>.json that `dmrepl demote` or `dmrepl "
                "switchover` wrote on the old primary",
            ) from None
        return record


def read_json(path: Path) -> object | None:
    """A record's JSON, or None if there is none; one that cannot be read is an error."""
    try:
        doc: object = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None  # (a state_dir that is no directory is refused where it is used)
    except (OSError, ValueError) as exc:
        raise InvalidInput(
            f"cannot read {path}: {exc}", hint="restore it, or move it aside if it is stale"
        ) from None
    return doc


def write_record(state: StateDir, path: Path, record: dict[str, Any]) -> None:
    """Write a record whole and durably (a crash leaves the old one or this)."""
    private_dir(path.parent, what="state_dir", strict_from=state.root)
    text = json.dumps(record, indent=1).encode()
    deltafiles.write_durably(path.parent, path.name, lambda out: out.write(text))


def remove_record(path: Path) -> None:
    """Remove a record durably."""
    if path.exists():
        path.unlink()
        deltafiles.fsync_directory(path.parent)


def promoted_cut(config: Config, group: str) -> int | None:
    """The cut at which `group` was promoted on this host, if it was (and not demoted since)."""
    record = read_json(StateDir(config.state_dir).promoted(group))
    cut = record.get("cut") if isinstance(record, dict) else None
    return cut if isinstance(cut, int) else None


def demotion(config: Config, group: str) -> Demotion | None:
    """The record of `group`'s demotion on this host, if it was demoted."""
    path = StateDir(config.state_dir).demoted(group)
    doc = read_json(path)
    return None if doc is None else Demotion.from_json(doc, str(path))


def record_demotion(config: Config, demoted: Demotion) -> Path:
    """This host is a site of the new primary from now on."""
    state = StateDir(config.state_dir)
    path = state.demoted(demoted.group)
    write_record(state, path, demoted.to_json() | {"time": demoted.time or time.time()})
    remove_record(state.promoted(demoted.group))
    return path


def require_primary(config: Config, group: str, doing: str) -> None:
    """Refuse to `doing` a group demoted on this host."""
    demoted = demotion(config, group)
    if demoted is None:
        return
    raise NotPrimary(
        f"group {group} was demoted on this host at cut {demoted.cut} ({demoted.reason} to "
        f"site {demoted.site}): it is a site of the new primary now, and to {doing} it here "
        "would fork its history",
        hint=f"make this host primary again with `dmrepl promote {group} --site SITE` once "
        "the new primary has switched back to it (docs/replication.md, Failback)",
    )


@dataclass(frozen=True)
class RoleReport:
    """What `dmrepl role` says of a group on its host (and a DR host asks its old primary)."""

    group: str
    host: str
    role: str  # primary, promoted, demoted, receiver, or unknown (neither configured)
    cut: int | None  # the cut it was promoted or demoted at
    stack_up: bool  # the group's gates exist
    last_cut: int | None  # the newest cut the state store records
    busy: str | None  # who holds the group's lock (a cycle running), if anyone

    @property
    def holds_group(self) -> bool:
        """Whether this host still counts itself the group's primary."""
        return self.role in ("primary", "promoted")

    def describe(self) -> str:
        role = self.role if self.cut is None else f"{self.role} at cut {self.cut}"
        text = f"{role}, stack {'up' if self.stack_up else 'down'}"
        if self.last_cut is not None:
            text += f", last cut {self.last_cut}"
        return text + (f", busy: {self.busy}" if self.busy else "")


def report(runner: Runner, config: Config, group: str) -> RoleReport:
    """This host's role for `group` (reads the records, the kernel's devices and the store)."""
    demoted, promoted = demotion(config, group), promoted_cut(config, group)
    spec = config.groups.get(group)
    if demoted is not None:
        role, cut = "demoted", demoted.cut
    elif promoted is not None:
        role, cut = "promoted", promoted
    elif spec is not None:
        role, cut = "primary", None
    else:
        role, cut = ("receiver" if group in config.receive else "unknown"), None
    gates = [layer_name(d.name, Layer.GATE) for d in spec.devices] if spec else []
    names = dm.observe(runner).names if gates else {}
    last = None
    store = StateStore.open_readonly(config.state_dir)
    if store is not None:
        try:
            newest = store.cuts(group, limit=1)
            last = newest[0].seq if newest else None
        finally:
            store.close()
    return RoleReport(
        group, socket.gethostname(), role, cut, bool(gates) and all(g in names for g in gates),
        last, lock_holder(config.state_dir, group),
    )  # fmt: skip


class PrimaryUnreachable(DmreplError):
    """The old primary could not be asked (ssh failed, or it answered nonsense)."""


def ask(address: SshAddress, group: str) -> RoleReport:
    """Ask the host at `address` for its role of `group` (`dmrepl role --json GROUP`, which
    its authorized_keys may force)."""
    argv = address.argv("dmrepl", "role", "--json", group)
    argv[1:1] = ["-o", f"ConnectTimeout={int(ASK_TIMEOUT_S / 2)}"]
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=ASK_TIMEOUT_S, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PrimaryUnreachable(f"ssh to {address.host}: {exc}") from None
    if done.returncode != 0:
        said = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise PrimaryUnreachable(f"ssh to {address.host} failed: {said}")
    try:
        doc = json.loads(done.stdout)
        answer = RoleReport(**{k: doc[k] for k in RoleReport.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as exc:
        raise PrimaryUnreachable(
            f"{address.host} answered something that is not `dmrepl role --json` ({exc})"
        ) from None
    if answer.group != group:
        raise PrimaryUnreachable(f"{address.host} answered for group {answer.group}, not {group}")
    return answer


def to_json(answer: RoleReport) -> dict[str, Any]:
    return asdict(answer) | {"holds_group": answer.holds_group}
