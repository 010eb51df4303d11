"""`ssh` sites: replicas on another host, written by `dmrepl serve --stdio` there (dmrepl.serve)
and reached through OpenSSH, which brings the user's ssh config, agents and ProxyJump.

The site here is a proxy: each Receiver call is a request over dmrepl.wire, answered by the
receiver's own journaled site. A delta is streamed in frames, compressed per frame and held
under a bandwidth cap; a transfer cut off mid-delta resumes at the next attempt from what
the receiver journaled durably. A stall watchdog kills a connection that moves no byte for
`stall_timeout` seconds, so a dead link makes the site `down` instead of hanging cron.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, ClassVar

import xxhash

from dmrepl import blockio, delta, wire
from dmrepl.config import FieldReader, SiteSpec, SshAddress
from dmrepl.sites.base import (
    CompareSeeder,
    Delivery,
    Piece,
    Progress,
    RecordUnreadable,
    ReplicaMismatch,
    SiteBroken,
    SiteContext,
    SiteDown,
    SiteFailure,
    SiteState,
    Transfer,
)

DEFAULT_STALL_S = 180.0
CODECS = {"none": wire.Codec.RAW, "zstd": wire.Codec.ZSTD, "lz4": wire.Codec.LZ4}
_FAILURES: dict[str, type[SiteFailure]] = {
    SiteState.DOWN: SiteDown,
    SiteState.MISCONFIGURED: ReplicaMismatch,
    SiteState.BROKEN: SiteBroken,
}


@dataclass(frozen=True)
class SshSiteSpec(SiteSpec):
    """`transport = "ssh"`: a receiver on `host`, replicas named by their paths there."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"host", "user", "port", "identity", "ssh_options", "ssh", "replica", "compress",
         "rate", "stall_timeout"}
    )  # fmt: skip

    address: SshAddress  # how OpenSSH reaches the receiver
    replicas: dict[str, str]  # group device name -> replica path on the remote host
    codec: wire.Codec
    level: int
    rate_bytes: int | None  # per second; None: no cap
    stall_s: float

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        key = spec.key
        address = reader.ssh_address(raw, key, alone=False)
        codec, level = _compression(reader, raw, key)
        rate = reader.size(raw, "rate", key)
        stall = reader.duration(raw, "stall_timeout", key)
        replicas = _replicas(reader, raw.get("replica"), f"{key}.replica", devices)
        if address is None:
            return None
        return cls(
            spec.group, spec.name, spec.transport, spec.policy, address,
            replicas, codec, level, None if rate is None else rate * 512,
            DEFAULT_STALL_S if stall is None else stall,
        )  # fmt: skip

    @property
    def host(self) -> str:
        return self.address.host

    def argv(self) -> list[str]:
        """The ssh command that reaches the receiver (its forced command may replace ours)."""
        return self.address.argv("dmrepl", "serve", "--stdio", "--group", self.group)


def _compression(reader: FieldReader, raw: dict[str, Any], key: str) -> tuple[wire.Codec, int]:
    text = raw.get("compress", "zstd")
    name, _, level_text = str(text).partition(":")
    if name not in CODECS or (level_text and not level_text.isdigit()):
        reader.problem(f"{key}.compress", f'{text!r} is not "zstd", "zstd:LEVEL", "lz4" or "none"')
        return wire.Codec.RAW, 0
    # Plain "lz4" is LZ4's fast mode (level 0): its levels from 3 up are LZ4-HC, which
    # compressed 1 MiB frames here at ~30 MiB/s where level 0 did ~200 MiB/s.
    level = int(level_text) if level_text else 0 if name == "lz4" else 3
    if name == "zstd" and not 1 <= level <= 19:
        reader.problem(f"{key}.compress", f"zstd level {level} is not 1 to 19")
    return CODECS[name], level


def _replicas(reader: FieldReader, raw: Any, key: str, devices: list[str]) -> dict[str, str]:
    if not isinstance(raw, dict):
        reader.problem(key, "missing: a table naming each device's replica path on the host")
        return {}
    replicas = {}
    for device in devices:
        path = reader.path(raw, device, key, required=True)
        if path is not None:
            replicas[device] = path
    for extra in sorted(set(raw) - set(devices)):
        reader.problem(f"{key}.{extra}", "not a device of this group")
    return replicas


class Watchdog:
    """Calls `on_stall` once when no progress was reported for `timeout` seconds."""

    def __init__(self, timeout: float, on_stall: Callable[[], object]):
        self.timeout, self.on_stall = timeout, on_stall
        self.last = time.monotonic()
        self.stalled = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            if time.monotonic() - self.last > self.timeout:
                self.stalled = True
                self.on_stall()
                return

    def stop(self) -> None:
        self._done.set()


class _Session:
    """One ssh connection to the receiver, after a successful hello."""

    def __init__(self, spec: SshSiteSpec, devices: dict[str, int]):
        self.spec = spec
        self.stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close)
        self.process = subprocess.Popen(
            spec.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
        )  # fmt: skip
        assert self.process.stdin is not None and self.process.stdout is not None
        self.watchdog = Watchdog(spec.stall_s, self.process.kill)
        self.channel = wire.Channel(
            self.process.stdout, self.process.stdin, peer=f"{spec.host} (site {spec.name})",
            progress=self.watchdog.progress,
        )  # fmt: skip
        self.receiver = ""
        reply = self.request({
            "op": "hello", "protocol": wire.PROTOCOL, "group": spec.group, "site": spec.name,
            "primary": socket.gethostname(),
            "devices": [[name, sectors] for name, sectors in devices.items()],
            "replicas": spec.replicas,
        })  # fmt: skip
        self.receiver = str(reply.get("receiver", spec.host))

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a request and return the reply; its failure raised as the site's failure."""
        try:
            self.channel.send(message)
            reply = self.channel.receive()
        except wire.WireError as exc:
            raise self.lost(exc) from None
        assert reply is not None
        return self.checked(reply)

    def checked(self, reply: dict[str, Any]) -> dict[str, Any]:
        if reply.get("ok"):
            return reply
        text = f"site {self.spec.name}: {self.spec.host}: {reply.get('message')}"
        if reply.get("corrupt"):
            raise delta.CorruptDelta(self.spec.host, 0, "", message=text)
        if reply.get("unreadable"):
            raise RecordUnreadable(text)
        failure = _FAILURES.get(str(reply.get("state")), SiteDown)
        hint = reply.get("hint")
        raise failure(text, hint=hint if isinstance(hint, str) else None)

    def lost(self, exc: wire.WireError) -> SiteDown:
        """The connection failed: say why (the stall watchdog, or what ssh printed)."""
        self._end()
        if self.watchdog.stalled:
            return SiteDown(
                f"site {self.spec.name}: no progress for {self.spec.stall_s:.0f} s "
                f"(stall_timeout): the connection to {self.spec.host} was cut",
                hint="the next cycle resumes from what the receiver journaled",
            )
        self.stderr.seek(0)
        said = self.stderr.read().decode(errors="replace").strip().splitlines()[-3:]
        self.stderr.close()
        detail = "; ".join(said) if said else exc.message
        return SiteDown(f"site {self.spec.name}: ssh to {self.spec.host} failed: {detail}")

    def close(self) -> None:
        self._end()
        self.stderr.close()

    def _end(self) -> None:
        """Close the pipes and reap ssh (killed if it does not exit in 10 s)."""
        self.watchdog.stop()
        for pipe in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                if pipe is not None:
                    pipe.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class RemoteSite:
    """An `ssh` site: a Receiver whose calls are answered by `dmrepl serve` on the host."""

    def __init__(self, spec: SshSiteSpec, context: SiteContext):
        self._spec = spec
        self.devices = dict(context.devices)
        self._session: _Session | None = None
        self.last_transfer: Transfer | None = None

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> SshSiteSpec:
        return self._spec

    def _connected(self) -> _Session:
        if self._session is None or self._session.process.poll() is not None:
            try:
                self._session = _Session(self._spec, self.devices)
            except OSError as exc:
                raise SiteDown(
                    f"site {self.name}: cannot run {self._spec.address.program}: {exc}"
                ) from None
        return self._session

    def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            return self._connected().request(message)
        except SiteDown:
            self._session = None
            raise

    def check(self) -> None:
        self._request({"op": "check"})

    def held(self) -> int | None:
        held = self._request({"op": "held"}).get("held")
        return held if isinstance(held, int) else None

    def recorded(self) -> int | None:
        try:
            recorded = self._request({"op": "recorded"}).get("recorded")
        except SiteFailure as exc:
            raise RecordUnreadable(exc.message) from None
        return recorded if isinstance(recorded, int) else None

    def recover(self) -> Delivery | None:
        return _delivery(self._request({"op": "recover"}).get("delivery"))

    def compare_seeder(self) -> CompareSeeder | None:
        return self

    def seed(
        self, images: Mapping[str, str], *, target_zeroed: bool, progress: Progress
    ) -> blockio.CopyStats:
        """Seed over the network: the receiver sends a digest of each chunk of its replicas
        and only chunks whose digest differs from the cut's image cross the link (on a
        zeroed target nothing is hashed and all-zero chunks are skipped)."""
        session = self._connected()
        chunk = blockio.CHUNK_BYTES
        theirs = b""
        try:
            if not target_zeroed:
                self._request({"op": "hashes", "chunk": chunk})
                theirs = b"".join(session.channel.data())
                session.checked(_reply(session.channel))
            self._request({"op": "seed_write"})
            compressor = wire.Compressor(self._spec.codec, self._spec.level)
            sink = wire.FrameSink(session.channel, compressor, self._bucket(session))
            stats = self._send_differing(sink, images, theirs, chunk, target_zeroed, progress)
            sink.flush()
            session.channel.end_data()
            session.checked(_reply(session.channel))
        except wire.WireError as exc:
            self._session = None
            raise session.lost(exc) from None
        except BaseException:
            self._session = None
            session.close()
            raise
        return stats

    def _send_differing(
        self,
        sink: wire.FrameSink,
        images: Mapping[str, str],
        theirs: bytes,
        chunk: int,
        target_zeroed: bool,
        progress: Progress,
    ) -> blockio.CopyStats:
        """Read each image chunk by chunk; send (as a seed delta) those that differ."""
        header = delta.DeltaHeader(
            group=self._spec.group, seq=0, base_seq=None, created=time.time(),
            devices=tuple(delta.DeltaDevice(d, n, None, 0) for d, n in self.devices.items()),
        )  # fmt: skip
        writer = delta.DeltaWriter(sink, header)  # type: ignore[arg-type]
        stats = blockio.CopyStats()
        index = 0
        for number, (device, sectors) in enumerate(self.devices.items()):
            fd = os.open(images[device], os.O_RDONLY)
            try:
                for offset in range(0, sectors * 512, chunk):
                    data = os.pread(fd, chunk, offset)
                    if target_zeroed:
                        same = not any(data)
                        stats.zero_skipped += len(data) if same else 0
                    else:
                        mine = xxhash.xxh3_64_digest(data)
                        same = mine == theirs[index * 8 : index * 8 + 8]
                        stats.equal += len(data) if same else 0
                    index += 1
                    if not same:
                        writer.add(number, offset // 512, data)
                        stats.written += len(data)
                    stats.compared += len(data)
                    progress(len(data))
            finally:
                os.close(fd)
        writer.finish()
        return stats

    def digests(self, pieces: Sequence[Piece]) -> list[bytes]:
        """Digests of pieces of the replicas, hashed by the receiver where they are
        (`Verifier`): only 8 bytes a piece cross the link."""
        session = self._connected()
        index = {device: number for number, device in enumerate(self.devices)}
        try:
            self._request({"op": "digests"})
            for payload in wire.pack_pieces([(index[d], s, n) for d, s, n in pieces]):
                session.channel.send_data(wire.Codec.RAW, payload)
            session.channel.end_data()
            found = b"".join(session.channel.data())
            session.checked(_reply(session.channel))
        except wire.WireError as exc:
            self._session = None
            raise session.lost(exc) from None
        if len(found) != 8 * len(pieces):
            raise SiteDown(f"site {self.name}: {len(found) // 8} digests for {len(pieces)} pieces")
        return [found[at : at + 8] for at in range(0, len(found), 8)]

    def mark_seeded(self, seq: int) -> None:
        self._request({"op": "mark_seeded", "seq": seq})

    def promote(self) -> int:
        """The receiver's host takes over the group (`Promoter`); the cut it holds."""
        cut = self._request({"op": "promote"}).get("cut")
        if not isinstance(cut, int):
            raise SiteDown(f"site {self.name}: the receiver's promotion answered no cut")
        return cut

    def _bucket(self, session: _Session) -> wire.TokenBucket | None:
        rate = self._spec.rate_bytes
        return None if rate is None else wire.TokenBucket(rate, waiting=session.watchdog.progress)

    def receive(self, stream: BinaryIO) -> Delivery:
        """Stream one delta; resume where an earlier, cut-off transfer of it stopped."""
        kept = io.BytesIO()  # the header, read here to name the delta, is sent too
        header = delta.read_header(delta.Tee(stream, kept), f"delta for site {self.name}")  # type: ignore[arg-type]
        session = self._connected()
        started = time.monotonic()
        reply = self._request({"op": "receive", "seq": header.seq, "base": header.base_seq})
        skip = int(reply.get("resume_from", 0))
        compressor = wire.Compressor(self._spec.codec, self._spec.level)
        bucket = self._bucket(session)
        try:
            for chunk in _chunks(kept.getvalue(), stream, skip):
                codec, payload = compressor.encode(chunk)
                if bucket is not None:
                    bucket.take(len(payload))
                session.channel.send_data(codec, payload)
            session.channel.end_data()
            final = session.channel.receive()
        except wire.WireError as exc:
            self._session = None
            raise session.lost(exc) from None
        except BaseException:
            self._session = None  # mid-stream: this connection cannot be used again
            session.close()
            raise
        assert final is not None
        delivered = _delivery(session.checked(final).get("delivery"))
        assert delivered is not None
        self.last_transfer = Transfer(
            skip, compressor.raw_bytes, compressor.wire_bytes, time.monotonic() - started
        )
        return dataclasses.replace(delivered, transfer=self.last_transfer)

    def close(self) -> None:
        if self._session is not None:
            with contextlib.suppress(SiteDown):
                self._session.request({"op": "bye"})
            self._session.close()
            self._session = None


def _reply(channel: wire.Channel) -> dict[str, Any]:
    reply = channel.receive()
    assert reply is not None
    return reply


def _delivery(raw: Any) -> Delivery | None:
    if not isinstance(raw, dict):
        return None
    return Delivery(int(raw["seq"]), raw.get("base"), int(raw.get("data_bytes", 0)))


def _chunks(prefix: bytes, stream: BinaryIO, skip: int) -> Iterator[bytes]:
    """The whole delta (`prefix` was already read from `stream`) in frames, less the first
    `skip` bytes, which the receiver journaled before."""

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(prefix), wire.STREAM_CHUNK):
            yield prefix[start : start + wire.STREAM_CHUNK]
        while chunk := stream.read(wire.STREAM_CHUNK):
            yield chunk

    for piece in pieces():
        if skip >= len(piece):
            skip -= len(piece)
            continue
        yield piece[skip:]
        skip = 0
