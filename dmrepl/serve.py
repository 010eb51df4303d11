"""`dmrepl serve --stdio`: the receiver at a remote site, speaking dmrepl.wire on stdin/stdout.

Meant as the forced command of the primary's key in `authorized_keys`
(`command="dmrepl serve --stdio --group db",restrict`). It writes only what this host's
own configuration grants (`[receive.GROUP]`: a replica per device, a journal), and only the
groups its command line names; everything else is refused with a message the primary shows.
Deltas go through this host's journal exactly as at a local `blockdev` site, so the replicas
here always hold one cut, whatever dies when; a transfer cut off mid-delta resumes from what
was journaled durably.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

from dmrepl import delta, phases, wire
from dmrepl.config import Config, ReceiveGrant
from dmrepl.errors import DmreplError
from dmrepl.executor import Runner
from dmrepl.lock import takeover_lock
from dmrepl.promote import promote_in_session
from dmrepl.sites import Delivery, RecordUnreadable, SiteContext, SiteFailure, SiteState
from dmrepl.sites.journaled import BlockdevSiteSpec, JournaledSite
from dmrepl.statedir import StateDir
from dmrepl.units import format_bytes

KEEPALIVE_S = 2.0
log = logging.getLogger(__name__)
progress_log = logging.getLogger("dmrepl.progress")  # to syslog only (see cli.replication)
progress_log.propagate = False  # stderr goes back to the primary: its last lines explain a failure


class Refused(DmreplError):
    """The primary asked for something this receiver does not grant."""


def serve(reader: BinaryIO, writer: BinaryIO, config: Config, groups: tuple[str, ...]) -> int:
    """Answer one primary until it says goodbye or the pipe closes; the exit code."""
    channel = wire.Channel(reader, writer, peer="the primary")
    hello = channel.receive(eof_ok=True)
    if hello is None:
        return 0
    phases.reached("hello")
    try:
        site = _accept(hello, config, groups)
    except (Refused, SiteFailure) as exc:
        channel.send(_failure(exc))
        return int(exc.exit_code)
    progress_log.info(
        "primary %s: site %s of group %s", hello.get("primary", "?"), site.name, site.spec.group
    )
    lock = StateDir(config.state_dir).receive_lock(site.spec.group, site.name)
    with takeover_lock(lock, config.state_dir, "serve") as killed:
        for pid in killed:
            log.warning("stopped an older session on site %s (pid %d)", site.name, pid)
        channel.send({"ok": True, "protocol": wire.PROTOCOL, "receiver": socket.gethostname()})
        while (request := channel.receive(eof_ok=True)) is not None:
            if request.get("op") == "bye":
                channel.send({"ok": True})
                break
            with _keepalive(channel):
                if request.get("op") == "promote":
                    reply = _promote(site, config)
                else:
                    reply = _answer(site, request, channel)
            channel.send(reply)
    return 0


def _promote(site: JournaledSite, config: Config) -> dict[str, Any]:
    """The primary demoted itself (`dmrepl switchover`) and asks this host to take over:
    its replicas become the group's devices, if this host configures the group over them."""
    group = site.spec.group
    try:
        done = promote_in_session(Runner(), config, group, site.name, say=progress_log.info)
    except DmreplError as exc:
        return {"ok": False, "state": str(SiteState.MISCONFIGURED), "transient": False,
                "message": f"promotion refused: {exc.message}", "hint": exc.hint}  # fmt: skip
    progress_log.info("group %s promoted at cut %d (switchover)", group, done.cut)
    return {"ok": True, "cut": done.cut, "gates": done.gates, "receiver": socket.gethostname()}


def _accept(hello: dict[str, Any], config: Config, groups: tuple[str, ...]) -> JournaledSite:
    """Check the hello against this host's grants; the journaled site it may write."""
    if hello.get("op") != "hello" or hello.get("protocol") != wire.PROTOCOL:
        raise Refused(
            f"the primary speaks protocol {hello.get('protocol')!r}; this receiver speaks "
            f"{wire.PROTOCOL}",
            hint="run the same dmrepl version on both hosts",
        )
    group, site_name = hello.get("group"), hello.get("site")
    if not isinstance(group, str) or not isinstance(site_name, str):
        raise Refused("the hello names no group or site")
    if group not in groups:
        allowed = ", ".join(groups) or "none"
        raise Refused(
            f"this key may write group(s) {allowed}, not {group}",
            hint="the forced command in the receiver's authorized_keys names the groups",
        )
    grant = config.receive.get(group)
    if grant is None:
        raise Refused(
            f"this receiver's configuration ({config.path}) grants nothing for group {group}",
            hint=f"add a [receive.{group}] table naming each device's replica",
        )
    if StateDir(config.state_dir).promoted(group).exists():
        raise Refused(
            f"group {group} was promoted on this host: its replicas are the group's devices "
            "here now, and take no delivery",
            hint="this host is the group's primary; the old one comes back as its site",
        )
    devices = _devices(hello.get("devices"))
    _check_replicas(grant, devices, hello.get("replicas"))
    spec = BlockdevSiteSpec(
        group, site_name, "blockdev", "asynchronous", grant.replicas, grant.journal
    )
    return JournaledSite(spec, SiteContext(devices, StateDir(config.state_dir)))


def _devices(raw: object) -> dict[str, int]:
    if not isinstance(raw, list) or not all(
        isinstance(d, list) and len(d) == 2 and isinstance(d[0], str) and isinstance(d[1], int)
        for d in raw
    ):
        raise Refused("the hello's device list is not [[name, sectors], ...]")
    return {name: sectors for name, sectors in raw}


def _check_replicas(grant: ReceiveGrant, devices: dict[str, int], asked: object) -> None:
    if set(devices) != set(grant.replicas):
        raise Refused(
            f"group {grant.group} has devices {', '.join(devices)} at the primary; this receiver "
            f"grants replicas of {', '.join(grant.replicas)}",
            hint=f"make [receive.{grant.group}.replica] name exactly the group's devices",
        )
    if asked is not None and asked != grant.replicas:
        raise Refused(
            f"the primary asks to write {asked}; this receiver grants {grant.replicas}",
            hint="make the site's replica paths at the primary those of [receive."
            f"{grant.group}.replica] here",
        )


def _answer(site: JournaledSite, request: dict[str, Any], channel: wire.Channel) -> dict[str, Any]:
    """Carry out one request; failures are replies, never exceptions (but the pipe's)."""
    op = request.get("op")
    try:
        if op == "check":
            site.check()
            return {"ok": True}
        if op == "held":
            return {"ok": True, "held": site.held()}
        if op == "recorded":
            try:
                return {"ok": True, "recorded": site.recorded()}
            except RecordUnreadable as exc:
                return {"ok": False, "unreadable": True, "message": str(exc)}
        if op == "recover":
            return {"ok": True, "delivery": _delivery(site.recover())}
        if op == "receive":
            return _receive(site, request, channel)
        if op == "hashes":
            return _hashes(site, request, channel)
        if op == "digests":
            return _digests(site, channel)
        if op == "seed_write":
            channel.send({"ok": True})
            meter = Meter(f"site {site.name}: seed, receiving the chunks that differ")
            stream = wire.StreamReader(meter.metered(channel.data()))
            written = site.write_seed(stream)  # type: ignore[arg-type]
            meter.finish()
            return {"ok": True, "written": written}
        if op == "mark_seeded":
            site.mark_seeded(int(request["seq"]))
            return {"ok": True}
        return {"ok": False, "state": str(SiteState.MISCONFIGURED), "transient": False,
                "message": f"unknown request {op!r}"}  # fmt: skip
    except SiteFailure as exc:
        return _failure(exc)
    except delta.CorruptDelta as exc:
        return {"ok": False, "corrupt": True, "message": exc.message}


def _receive(site: JournaledSite, request: dict[str, Any], channel: wire.Channel) -> dict[str, Any]:
    seq, base = request.get("seq"), request.get("base")
    if not isinstance(seq, int) or not (base is None or isinstance(base, int)):
        raise wire.WireError("a receive request without its cut numbers")
    start = site.staged_so_far(seq, base)
    channel.send({"ok": True, "resume_from": start})
    meter = Meter(
        f"site {site.name}: receiving cut {seq}" + (f" from byte {start}" if start else "")
    )
    delivery = site.receive_chunks(meter.metered(channel.data()), seq=seq, base=base, start=start)
    meter.finish()
    return {"ok": True, "delivery": _delivery(delivery)}


def _hashes(site: JournaledSite, request: dict[str, Any], channel: wire.Channel) -> dict[str, Any]:
    chunk = request.get("chunk")
    if not isinstance(chunk, int) or not 4096 <= chunk <= wire.STREAM_CHUNK or chunk % 4096:
        raise wire.WireError(f"a hashes request with chunk {chunk!r}")
    channel.send({"ok": True})
    total = sum(site.devices.values()) * 512
    meter = Meter(f"site {site.name}: seed, hashing the replicas", total)
    pending = bytearray()
    for digest in site.chunk_digests(chunk):
        meter.add(chunk)
        pending += digest
        if len(pending) >= wire.STREAM_CHUNK:
            channel.send_data(wire.Codec.RAW, bytes(pending))
            pending.clear()
    if pending:
        channel.send_data(wire.Codec.RAW, bytes(pending))
    channel.end_data()
    meter.finish()
    return {"ok": True}


def _digests(site: JournaledSite, channel: wire.Channel) -> dict[str, Any]:
    """`dmrepl verify`: digests of the pieces the primary names (in data frames)."""
    channel.send({"ok": True})
    names = list(site.devices)
    pieces = []
    for payload in channel.data():
        for index, start, sectors in wire.unpack_pieces(payload):
            if index >= len(names) or start + sectors > site.devices[names[index]] or not sectors:
                raise wire.WireError("a digests request for a piece outside the replicas")
            pieces.append((names[index], start, sectors))
    found = site.digests(pieces)
    step = wire.STREAM_CHUNK // 8
    for at in range(0, len(found), step):
        channel.send_data(wire.Codec.RAW, b"".join(found[at : at + step]))
    channel.end_data()
    return {"ok": True}


class Meter:
    """Logs how a long transfer goes (bytes, rate, and the ETA when the total is known) at
    most every `every` seconds: the receiver's side of the progress the primary shows."""

    def __init__(self, what: str, total: int | None = None, every: float = 10.0):
        self.what, self.total, self.every = what, total, every
        self.done = 0
        self.started = self.last = time.monotonic()

    def add(self, size: int) -> None:
        self.done += size
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            progress_log.info("%s", self.line(now))

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.started, 1e-6)
        text = f"{self.what}: {format_bytes(self.done)} at {format_bytes(int(rate))}/s"
        if self.total:
            left = max(self.total - self.done, 0) / max(rate, 1.0)
            text += f", {100 * self.done / self.total:.0f} % of {format_bytes(self.total)}"
            text += f", about {left:.0f} s left"
        return text

    def metered(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            self.add(len(chunk))
            yield chunk

    def finish(self) -> None:
        progress_log.info("%s (done)", self.line(time.monotonic()))


def _delivery(delivery: Delivery | None) -> dict[str, Any] | None:
    if delivery is None:
        return None
    return {"seq": delivery.seq, "base": delivery.base_seq, "data_bytes": delivery.data_bytes}


def _failure(exc: DmreplError) -> dict[str, Any]:
    state = exc.state if isinstance(exc, SiteFailure) else SiteState.MISCONFIGURED
    transient = exc.transient if isinstance(exc, SiteFailure) else False
    return {"ok": False, "state": str(state), "transient": transient, "message": exc.message,
            "hint": exc.hint}  # fmt: skip


@contextmanager
def _keepalive(channel: wire.Channel) -> Iterator[None]:
    """Tell the primary every few seconds that a long request (an apply) is still going."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(KEEPALIVE_S):
            try:
                channel.keepalive()
            except wire.WireError:
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
