"""The wire protocol between a primary and a remote receiver (`dmrepl serve --stdio`), over any
byte pipe (ssh's stdin and stdout). docs/wire-protocol.md describes it for implementers.

Everything is a frame: a kind byte, a 4-byte big-endian payload length, the payload.

    M  a message: one JSON object (requests, replies, the hello)
    D  data: a codec byte (0 raw, 1 zstd, 2 lz4) and the (compressed) bytes of a delta stream
    E  the end of a data stream
    K  keepalive: the receiver is working on a request (applying a large delta); no payload

Data is compressed frame by frame (one frame is at most 1 MiB of stream) and kept raw when
compressing does not make it smaller. The delta stream inside keeps its own checksums, so
the receiver verifies what it journaled whatever the wire did.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from enum import IntEnum
from typing import IO, Any

import lz4.frame
import zstandard

from dmrepl.errors import DmreplError, ExitCode

PROTOCOL = 1
FRAME = struct.Struct(">cI")
MAX_MESSAGE = 1 << 20  # a JSON message larger than this is a protocol violation
MAX_DATA = (1 << 20) + 4096  # one frame of stream, plus what compression may add
STREAM_CHUNK = 1 << 20
MESSAGE, DATA, END, KEEPALIVE = b"M", b"D", b"E", b"K"


class Codec(IntEnum):
    RAW = 0
    ZSTD = 1
    LZ4 = 2


class WireError(DmreplError):
    """The other side broke the protocol, or the pipe closed mid-conversation."""

    exit_code = ExitCode.CORRUPT


class Compressor:
    """Per-frame compression; a frame that does not shrink is sent raw."""

    def __init__(self, codec: Codec, level: int = 3):
        self.codec = codec
        self.level = level
        self._zstd = zstandard.ZstdCompressor(level=level) if codec is Codec.ZSTD else None
        self.raw_bytes = 0  # stream bytes given
        self.wire_bytes = 0  # bytes of frames sent for them

    def encode(self, data: bytes) -> tuple[Codec, bytes]:
        packed: bytes | None = None
        if self._zstd is not None:
            packed = self._zstd.compress(data)
        elif self.codec is Codec.LZ4:
            packed = lz4.frame.compress(data, compression_level=self.level)
        self.raw_bytes += len(data)
        if packed is None or len(packed) >= len(data):
            self.wire_bytes += len(data) + 1
            return Codec.RAW, data
        self.wire_bytes += len(packed) + 1
        return self.codec, packed


def decode(codec: int, payload: bytes) -> bytes:
    """The stream bytes of one data frame."""
    if codec == Codec.RAW:
        return payload
    try:
        if codec == Codec.ZSTD:
            return zstandard.ZstdDecompressor().decompress(payload, max_output_size=STREAM_CHUNK)
        if codec == Codec.LZ4:
            return bytes(lz4.frame.decompress(payload))
    except (zstandard.ZstdError, RuntimeError) as exc:
        raise WireError(f"a data frame does not decompress: {exc}") from None
    raise WireError(f"a data frame names codec {codec}, which this side does not know")


class Channel:
    """Frames over a pipe. `progress` is called whenever bytes moved (for a stall watchdog);
    sends are safe from two threads (the keepalive)."""

    def __init__(
        self,
        reader: IO[bytes],
        writer: IO[bytes],
        *,
        peer: str,
        progress: Callable[[], None] = lambda: None,
    ):
        self.reader, self.writer, self.peer = reader, writer, peer
        self.progress = progress
        self._send_lock = threading.Lock()

    # -- sending

    def _frame(self, kind: bytes, payload: bytes) -> None:
        with self._send_lock:
            try:
                self.writer.write(FRAME.pack(kind, len(payload)))
                self.writer.write(payload)
                self.writer.flush()
            except (BrokenPipeError, ConnectionError, ValueError) as exc:
                raise WireError(f"the connection to {self.peer} closed ({exc})") from None
        self.progress()

    def send(self, message: dict[str, Any]) -> None:
        self._frame(MESSAGE, json.dumps(message, separators=(",", ":")).encode())

    def send_data(self, codec: Codec, payload: bytes) -> None:
        self._frame(DATA, bytes([codec]) + payload)

    def end_data(self) -> None:
        self._frame(END, b"")

    def keepalive(self) -> None:
        self._frame(KEEPALIVE, b"")

    # -- receiving

    def _read_exactly(self, size: int) -> bytes:
        parts, left = [], size
        while left:
            try:
                part = self.reader.read(left)
            except (ConnectionError, ValueError, OSError) as exc:
                raise WireError(f"the connection to {self.peer} failed ({exc})") from None
            if not part:
                raise WireError(f"the connection to {self.peer} closed mid-frame")
            parts.append(part)
            left -= len(part)
            self.progress()
        return b"".join(parts)

    def _next_frame(self, *, eof_ok: bool = False) -> tuple[bytes, bytes] | None:
        while True:
            head = self.reader.read(FRAME.size)
            if not head and eof_ok:
                return None
            if len(head) < FRAME.size:
                head += self._read_exactly(FRAME.size - len(head)) if head else b""
            if len(head) < FRAME.size:
                raise WireError(f"the connection to {self.peer} closed")
            kind, length = FRAME.unpack(head)
            limit = MAX_MESSAGE if kind == MESSAGE else MAX_DATA
            if kind not in (MESSAGE, DATA, END, KEEPALIVE) or length > limit:
                raise WireError(
                    f"{self.peer} sent a frame of kind {kind!r} and {length} bytes: not this "
                    f"protocol (version {PROTOCOL}), or a damaged stream"
                )
            payload = self._read_exactly(length) if length else b""
            self.progress()
            if kind != KEEPALIVE:
                return kind, payload

    def receive(self, *, eof_ok: bool = False) -> dict[str, Any] | None:
        """The next message (None at a clean end of the conversation, with `eof_ok`)."""
        frame = self._next_frame(eof_ok=eof_ok)
        if frame is None:
            return None
        kind, payload = frame
        if kind != MESSAGE:
            raise WireError(f"{self.peer} sent data where a message was expected")
        try:
            message = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireError(f"{self.peer} sent a message that is not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise WireError(f"{self.peer} sent a message that is not an object")
        return message

    def data(self) -> Iterator[bytes]:
        """The stream bytes of data frames up to the end frame."""
        while True:
            frame = self._next_frame()
            assert frame is not None
            kind, payload = frame
            if kind == END:
                return
            if kind != DATA or not payload:
                raise WireError(f"{self.peer} sent a message in the middle of a data stream")
            yield decode(payload[0], payload[1:])


class TokenBucket:
    """A bandwidth cap: `take(n)` waits until n more bytes fit under `rate` bytes/second
    (bursts of up to a quarter second's worth)."""

    def __init__(
        self,
        rate: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        waiting: Callable[[], None] = lambda: None,
    ):
        self.rate = rate
        self.burst = max(rate / 4, 64 * 1024)
        self.clock, self.sleep, self.waiting = clock, sleep, waiting
        self.tokens = self.burst
        self.last = clock()

    def take(self, size: int) -> None:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= size
        if self.tokens >= 0:
            return
        wait = -self.tokens / self.rate
        while wait > 0:
            step = min(1.0, wait)
            self.sleep(step)
            self.waiting()  # waiting for the cap is not a stall
            wait -= step
        self.tokens = 0.0
        self.last = self.clock()


class StreamReader:
    """A file-like reader over the byte chunks of a data stream (what `Channel.data` yields)."""

    def __init__(self, chunks: Iterator[bytes]):
        self.chunks = chunks
        self.pending = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self.pending) < size:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.pending += chunk
        if size < 0:
            size = len(self.pending)
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


class FrameSink:
    """A file-like writer that sends what is written as compressed data frames, under a cap."""

    def __init__(self, channel: Channel, compressor: Compressor, bucket: TokenBucket | None):
        self.channel, self.compressor, self.bucket = channel, compressor, bucket
        self.pending = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.pending += data
        while len(self.pending) >= STREAM_CHUNK:
            self._send(bytes(self.pending[:STREAM_CHUNK]))
            del self.pending[:STREAM_CHUNK]
        return len(data)

    def flush(self) -> None:
        if self.pending:
            self._send(bytes(self.pending))
            self.pending.clear()

    def _send(self, chunk: bytes) -> None:
        codec, payload = self.compressor.encode(chunk)
        if self.bucket is not None:
            self.bucket.take(len(payload))
        self.channel.send_data(codec, payload)


PIECE = struct.Struct("<HQI")  # device index, first sector, sectors: one piece to hash


def pack_pieces(pieces: Sequence[tuple[int, int, int]]) -> Iterator[bytes]:
    """`digests` request pieces (device index, first sector, sectors) as data payloads."""
    for at in range(0, len(pieces), STREAM_CHUNK // PIECE.size):
        batch = pieces[at : at + STREAM_CHUNK // PIECE.size]
        yield b"".join(PIECE.pack(*piece) for piece in batch)


def unpack_pieces(payload: bytes) -> list[tuple[int, int, int]]:
    if len(payload) % PIECE.size:
        raise WireError(f"a digests request of {len(payload)} bytes (not whole pieces)")
    return [PIECE.unpack_from(payload, at) for at in range(0, len(payload), PIECE.size)]
