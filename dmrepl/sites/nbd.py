"""`nbd` sites: replicas that are NBD exports on another host (nbd-server, qemu-nbd, nbdkit),
named by `nbd://HOST[:PORT]/EXPORT`. dmrepl attaches them to free `/dev/nbdN` devices here
with `nbd-client` when it has something to write, and detaches them when the cycle ends or
a step fails (a server that restarted leaves a device failing every I/O until it is
attached again).

Over the attached devices the site is a `blockdev` site (sites.journaled): the same journal,
verify, commit and apply. That journal is kept here, at the primary (a file in the state
directory, or the configured `journal`), so:

- the exports move from one cut to the next atomically *as seen through this journal*: an
  apply cut off half way (the server restarting, the link failing for `timeout` seconds,
  this host crashing) leaves the exports a mix of two cuts, and the next sync from this host
  finishes the committed delta before anything else;
- if this host is lost for good in that window, the exports stay a torn mix until a host with
  this journal replays it; nothing at the DR host records which cut they hold.

An `ssh` site's journal is at the receiver instead, so its replicas always equal a cut there.

Reading the site attaches nothing: `check` speaks the NBD handshake itself (`probe`: the size
and flags of each export, then a disconnect before any I/O), `held` and `recorded` read the
local journal. Which devices are attached is recorded next to the journal
(`StateDir.nbd_attached`), so a run killed before it detached them has them detached by the
next one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import socket
import struct
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, TypeVar
from urllib.parse import quote, unquote, urlsplit

from dmrepl import blockio, deltafiles, safefile
from dmrepl.config import FieldReader, SiteSpec
from dmrepl.executor import CommandFailed, CommandNotFound, CommandTimedOut, Runner
from dmrepl.ops import Op, command
from dmrepl.sites.base import (
    CompareSeeder,
    Delivery,
    Piece,
    Progress,
    RecordUnreadable,
    ReplicaMismatch,
    SiteContext,
    SiteDown,
    SiteFailure,
)
from dmrepl.sites.journaled import BlockdevSiteSpec, JournaledSite
from dmrepl.units import format_sectors

T = TypeVar("T")
log = logging.getLogger(__name__)

DEFAULT_PORT = 10809
DEFAULT_TIMEOUT_S = 30
CONNECT_GRACE_S = 10  # what `nbd-client` may take beyond `timeout` to attach (or detach)
URL_FORM = "nbd://HOST[:PORT]/EXPORT"
DEVICE_RE = re.compile(r"^/dev/nbd[0-9]+$")

# The NBD handshake (the protocol's doc/proto.md): fixed newstyle negotiation, NBD_OPT_GO (not
# NBD_OPT_INFO: nbd-server 3.24 answers that with size 0), then NBD_CMD_DISC.
NBD_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT": newstyle negotiation; also before each option
OLDSTYLE_MAGIC = 0x00420281861253  # the old handshake: no export names
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags; the client's flags use the same two bits
FLAG_NO_ZEROES = 1 << 1
OPT_ABORT = 2
OPT_GO = 7
REQUEST_MAGIC = 0x25609513
CMD_DISC = 2
REP_ACK = 1
REP_INFO = 3
REP_FLAG_ERROR = 1 << 31
INFO_EXPORT = 0
TRANSMISSION_READ_ONLY = 1 << 1
MAX_REPLY_BYTES = 1 << 16
ERR_UNSUP, ERR_SHUTDOWN = 1, 7
REPLY_ERRORS = {
    1: "does not know the NBD_OPT_GO option",
    2: "refuses it by its policy",
    3: "calls the request invalid",
    4: "cannot serve it on its platform",
    5: "requires TLS, which dmrepl's nbd transport does not speak",
    6: "has no such export",
    7: "is shutting down",
    8: "requires a block size",
    9: "finds it too big",
}


@dataclass(frozen=True)
class NbdExport:
    """One export of an NBD server."""

    host: str
    port: int
    name: str

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """The canonical URL (port always given): the same export is always the same string."""
        return f"nbd://{self.where}/{quote(self.name, safe='')}"


def parse_url(text: str) -> NbdExport:
    """The export an `nbd://HOST[:PORT]/EXPORT` URL names; ValueError says what is wrong
    (to follow the quoted value in a problem)."""
    parts = urlsplit(text)
    if parts.scheme in ("nbds", "nbd+unix", "nbds+unix"):
        raise ValueError(f"uses {parts.scheme}://, which is not supported: only {URL_FORM}")
    if parts.scheme != "nbd" or not text.lower().startswith("nbd://"):
        raise ValueError(f"is not an {URL_FORM} URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"has a user name; NBD has none ({URL_FORM})")
    if parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError(f"has a query or a fragment; only {URL_FORM}")
    host = parts.hostname
    if not host or any(c.isspace() or not c.isprintable() for c in host):
        raise ValueError(f"names no host ({URL_FORM})")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0 or (port is None and parts.netloc.endswith(":")):
        raise ValueError("has a port that is not a number from 1 to 65535")
    name = unquote(parts.path.removeprefix("/"))
    if not name:
        raise ValueError(f"names no export ({URL_FORM})")
    if any(not c.isprintable() for c in name) or len(name.encode()) > 4096:
        raise ValueError("has an export name with control characters or over 4096 bytes")
    return NbdExport(host, port or DEFAULT_PORT, name)


@dataclass(frozen=True)
class NbdSiteSpec(SiteSpec):
    """`transport = "nbd"`: one NBD export per group device, and a journal kept here."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"export", "journal", "timeout"})

    exports: Mapping[str, NbdExport]  # group device name -> its export
    journal: str | None  # a journal device or file here; None: a file in the state directory
    timeout_s: int  # nbd-client -t: a request unanswered this long fails; bounds the probe too

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        journal = reader.path(raw, "journal", spec.key, required=False)
        timeout = reader.duration(raw, "timeout", spec.key)
        key = f"{spec.key}.export"
        table = raw.get("export")
        if not isinstance(table, dict):
            reader.problem(key, f"missing: a table naming the {URL_FORM} of every group device")
            return None
        exports: dict[str, NbdExport] = {}
        for device in devices:
            value = table.get(device)
            if value is None:
                reader.problem(f"{key}.{device}", f"missing (the {URL_FORM} of this group device)")
            elif not isinstance(value, str):
                reader.problem(
                    f"{key}.{device}", f"must be a string like {URL_FORM}, not {value!r}"
                )
            else:
                try:
                    exports[device] = parse_url(value)
                except ValueError as exc:
                    reader.problem(f"{key}.{device}", f"{value!r} {exc}")
        for extra in sorted(set(table) - set(devices)):
            reader.problem(f"{key}.{extra}", "not a device of this group")
        seconds = DEFAULT_TIMEOUT_S if timeout is None else math.ceil(timeout)
        return cls(spec.group, spec.name, spec.transport, spec.policy, exports, journal, seconds)

    def claims(self) -> list[tuple[str, str, str]]:
        # An export is claimed by its canonical URL: two sites (or devices) writing one export
        # are reported like two writing one device.
        used = [(f"{self.key}.export", device, e.url) for device, e in self.exports.items()]
        if self.journal is not None:
            used.append((self.key, "journal", self.journal))
        return used


# -- the handshake probe


@dataclass(frozen=True)
class ExportInfo:
    """What a server says of an export before it is attached."""

    size_bytes: int | None  # None: the server does not know NBD_OPT_GO (too old)
    read_only: bool


class ProbeFailed(Exception):
    """The server could not be asked, or refused; `transient`: it may answer next time."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


def probe(export: NbdExport, timeout_s: float) -> ExportInfo:
    """Ask the server for `export`'s size and flags (NBD_OPT_GO), then disconnect before any
    I/O: nothing is attached here and nothing is read or written. Each connect and each read
    waits at most `timeout_s`."""
    try:
        with socket.create_connection((export.host, export.port), timeout=timeout_s) as sock:
            return _negotiate(sock, export)
    except TimeoutError:
        raise ProbeFailed(
            f"no answer from {export.where} within {timeout_s:g} s", transient=True
        ) from None
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ProbeFailed(f"cannot reach {export.where}: {reason}", transient=True) from None


def _negotiate(sock: socket.socket, export: NbdExport) -> ExportInfo:
    where = export.where
    magic, style = struct.unpack(">QQ", _read(sock, 16, where))
    if magic == NBD_MAGIC and style == OLDSTYLE_MAGIC:
        raise ProbeFailed(
            f"{where} speaks the old NBD handshake, which names no exports", transient=False
        )
    if magic != NBD_MAGIC or style != OPTS_MAGIC:
        raise ProbeFailed(f"{where} is not an NBD server", transient=False)
    (flags,) = struct.unpack(">H", _read(sock, 2, where))
    if not flags & FLAG_FIXED_NEWSTYLE:
        raise ProbeFailed(f"{where} does not offer the fixed newstyle handshake", transient=False)
    sock.sendall(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
    name = export.name.encode()
    request = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    sock.sendall(struct.pack(">QII", OPTS_MAGIC, OPT_GO, len(request)) + request)
    size: int | None = None
    read_only = False
    while True:
        magic, option, reply, length = struct.unpack(">QIII", _read(sock, 20, where))
        if magic != REPLY_MAGIC or option != OPT_GO or length > MAX_REPLY_BYTES:
            raise ProbeFailed(f"{where} answered with something that is not NBD", transient=False)
        data = _read(sock, length, where)
        if reply == REP_ACK:  # in the transmission phase now: leave before any request
            with suppress(OSError):
                sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            break
        if reply & REP_FLAG_ERROR:
            with suppress(OSError):
                sock.sendall(struct.pack(">QII", OPTS_MAGIC, OPT_ABORT, 0))
            code = reply & ~REP_FLAG_ERROR
            if code == ERR_UNSUP:
                break  # an old server: the size is checked once the export is attached
            said = data.decode(errors="replace").strip()
            text = REPLY_ERRORS.get(code, f"answers error {code}")
            raise ProbeFailed(
                f"{where} {text} (export {export.name!r})" + (f": {said}" if said else ""),
                transient=code == ERR_SHUTDOWN,
            )
        if reply == REP_INFO and len(data) >= 12 and data[:2] == struct.pack(">H", INFO_EXPORT):
            size, transmission = struct.unpack(">QH", data[2:12])
            read_only = bool(transmission & TRANSMISSION_READ_ONLY)
    return ExportInfo(size, read_only)


def _read(sock: socket.socket, count: int, where: str) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ProbeFailed(f"{where} closed the connection during the handshake", transient=True)
        data += chunk
    return data


# -- the site


@dataclass(frozen=True)
class Attached:
    """An export attached here: its device and the pid the kernel recorded for the attach
    (`/sys/block/nbdN/pid`), which tells our attachment from a later one of the device."""

    device: str
    pid: str


class NbdSite:
    """An `nbd` site: a Receiver (and CompareSeeder) that attaches the exports and delegates
    to a JournaledSite over the attached devices."""

    def __init__(self, spec: NbdSiteSpec, context: SiteContext, runner: Runner | None = None):
        self._spec = spec
        self.context = context
        self.devices = context.devices
        self.runner = runner or Runner()
        self.record = context.state_dir.nbd_attached(spec.group, spec.name)
        # The journal alone (no replicas): what reading the site needs.
        self._journal = JournaledSite(self._blockdev({}), context)
        self._attached: dict[str, Attached] = {}
        self._site: JournaledSite | None = None

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> NbdSiteSpec:
        return self._spec

    @property
    def attached(self) -> dict[str, str]:
        """Group device -> the /dev/nbdN its export is attached to now."""
        return {device: a.device for device, a in self._attached.items()}

    def check(self) -> None:
        """Raise SiteDown unless every server answers, ReplicaMismatch unless every export
        exists, is writable and is its origin's size. Attaches nothing."""
        for device, export in self._spec.exports.items():
            try:
                info = probe(export, self._spec.timeout_s)
            except ProbeFailed as exc:
                failure = SiteDown if exc.transient else ReplicaMismatch
                raise failure(f"site {self.name}: export {export.url} of {device}: {exc}") from None
            if info.read_only:
                raise ReplicaMismatch(
                    f"site {self.name}: export {export.url} of {device} is read-only",
                    hint="serve it writable; nothing was written",
                )
            origin = self.devices[device] * 512
            if info.size_bytes is not None and info.size_bytes != origin:
                size = (
                    format_sectors(info.size_bytes // 512)
                    if info.size_bytes % 512 == 0
                    else f"{info.size_bytes} bytes"
                )
                raise ReplicaMismatch(
                    f"site {self.name}: export {export.url} of {device} is {size}, the origin "
                    f"is {format_sectors(self.devices[device])}",
                    hint="an export must be exactly the size of its origin; nothing was written",
                )
        self._journal.held()  # a configured journal that is missing, unreadable or not one

    def held(self) -> int | None:
        return self._journal.held()

    def recorded(self) -> int | None:
        return self._journal.recorded()

    def recover(self) -> Delivery | None:
        """Finish applying a committed journal (attaching the exports only then)."""
        if self._journal.held() is not None:
            return None
        try:
            pending = self._journal.recorded()
        except RecordUnreadable as exc:
            raise SiteDown(str(exc)) from None
        if pending is None:
            return None
        return self._on_exports(lambda site: site.recover())

    def receive(self, stream: BinaryIO) -> Delivery:
        return self._on_exports(lambda site: site.receive(stream))

    def compare_seeder(self) -> CompareSeeder | None:
        return self

    def seed(
        self, images: Mapping[str, str], *, target_zeroed: bool, progress: Progress
    ) -> blockio.CopyStats:
        """Compare-copy the cut's images onto the exports (reading them over the network,
        unless `target_zeroed`)."""
        return self._on_exports(
            lambda site: site.seed(images, target_zeroed=target_zeroed, progress=progress)
        )

    def mark_seeded(self, seq: int) -> None:
        self._journal.mark_seeded(seq)

    def digests(self, pieces: Sequence[Piece]) -> list[bytes]:
        """Digests of pieces of the exports (`Verifier`), read over the network."""
        return self._on_exports(lambda site: site.digests(pieces))

    def close(self) -> None:
        """Detach the exports (if attached)."""
        self._detach()

    # -- attaching

    def _on_exports(self, step: Callable[[JournaledSite], T]) -> T:
        """Run a step of the journaled site over the attached exports; any failure detaches
        them, so the next attempt starts from a fresh connection."""
        site = self._attach()
        try:
            return step(site)
        except BaseException:
            self._detach()
            raise

    def _blockdev(self, replicas: Mapping[str, str]) -> BlockdevSiteSpec:
        spec = self._spec
        return BlockdevSiteSpec(
            spec.group, spec.name, spec.transport, spec.policy, dict(replicas), spec.journal
        )

    def _attach(self) -> JournaledSite:
        if self._site is not None:
            return self._site
        self._detach()  # what an earlier failure in this run could not detach
        self._detach_leftovers()
        if self._attached:
            stuck = ", ".join(a.device for a in self._attached.values())
            raise SiteDown(f"site {self.name}: cannot detach {stuck} (nbd-client -d failed)")
        try:
            if not Path("/sys/module/nbd").exists():
                self._run(command("modprobe", "nbd"), "loading the nbd module")
            for device, export in self._spec.exports.items():
                self._attached[device] = self._connect(export)
                self._write_record()
            site = JournaledSite(self._blockdev(self.attached), self.context)
            site.check()  # sizes as the kernel sees them; not mounted
        except BaseException:
            self._detach()
            raise
        self._site = site
        return site

    def _connect(self, export: NbdExport) -> Attached:
        """`nbd-client` attaches the export to a free /dev/nbdN, which the kernel picks."""
        timeout = str(self._spec.timeout_s)
        op = command("nbd-client", export.host, export.port, "-N", export.name, "-t", timeout)
        result = self._run(op, f"attaching {export.url}")
        found = re.search(r"Connected (/dev/nbd[0-9]+)", result)
        if found is None:
            raise SiteDown(
                f"site {self.name}: nbd-client attached {export.url} but named no device",
                context=result,
            )
        device = found.group(1)
        pid = _attach_pid(device)
        if pid is None:
            raise SiteDown(f"site {self.name}: {device} is not attached after nbd-client said so")
        return Attached(device, pid)

    def _run(self, op: Op, doing: str) -> str:
        """Run a command of the attach (bounded in time); its failure is the site's."""
        op = dataclasses.replace(op, timeout_s=self._spec.timeout_s + CONNECT_GRACE_S)
        try:
            return self.runner.run(op).stdout
        except CommandNotFound as exc:
            raise ReplicaMismatch(
                f"site {self.name}: {doing}: {exc.message}", hint=exc.hint
            ) from None
        except CommandTimedOut as exc:
            raise SiteDown(f"site {self.name}: {doing}: {exc.message}") from None
        except CommandFailed as exc:
            said = (exc.stderr.strip() or exc.stdout.strip() or "(no output)").splitlines()
            raise SiteDown(f"site {self.name}: {doing} failed: {' '.join(said[-2:])}") from None

    def _detach(self) -> None:
        """Detach every export this site attached; what could not be detached stays recorded."""
        self._site = None
        if not self._attached:
            return
        self._attached = {d: a for d, a in self._attached.items() if not self._detached(a)}
        with suppress(SiteFailure):
            self._write_record()

    def _detached(self, attached: Attached) -> bool:
        """`nbd-client -d` (also of a dead connection); whether the device is free of it now."""
        op = command("nbd-client", "-d", attached.device)
        self.runner.run_best_effort(
            dataclasses.replace(op, timeout_s=self._spec.timeout_s + CONNECT_GRACE_S)
        )
        return _attach_pid(attached.device) != attached.pid

    def _detach_leftovers(self) -> None:
        """Detach what a killed run left attached: each recorded device still attached by the
        same `nbd-client` run (the pid the kernel recorded). The group's lock is held, so no
        other run of this site is using it."""
        try:
            entries = json.loads(self.record.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            entries = []
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict):
                continue
            device, pid = entry.get("device"), entry.get("pid")
            if isinstance(device, str) and DEVICE_RE.match(device) and _attach_pid(device) == pid:
                log.warning(
                    "site %s: detaching %s, left attached by a killed run", self.name, device
                )
                self._detached(Attached(device, str(pid)))
        with suppress(OSError):
            self.record.unlink()

    def _write_record(self) -> None:
        """Record the attached devices (durably), or remove the record when there are none."""
        if not self._attached:
            self.record.unlink(missing_ok=True)
            return
        entries = [{"device": a.device, "pid": a.pid} for a in self._attached.values()]
        try:
            directory = safefile.private_dir(
                self.record.parent, what="state_dir", strict_from=self.context.state_dir.root
            )
            deltafiles.write_durably(
                directory, self.record.name, lambda out: out.write(json.dumps(entries).encode())
            )
        except safefile.UnsafePath as exc:
            raise ReplicaMismatch(f"site {self.name}: {exc.message}", hint=exc.hint) from None
        except OSError as exc:
            raise SiteDown(f"site {self.name}: {self.record}: {exc.strerror or exc}") from None


def _attach_pid(device: str) -> str | None:
    """The pid the kernel recorded when `device` was attached; None if it is not attached."""
    try:
        return (Path("/sys/block") / Path(device).name / "pid").read_text().strip() or None
    except OSError:
        return None
