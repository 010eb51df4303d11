"""`s3` sites: deltas kept in an S3-compatible object store (AWS S3, Ceph RGW, Swift's
s3api, ...), from which any number of hosts restore (`dmrepl apply s3://...`) or follow
(`dmrepl pull`). The layout is dmrepl.s3layout's; the requests dmrepl.s3store's.

Receiving a delta: an incremental one is uploaded unchanged (one object; multipart above
`part_size`, resumed part by part after a cut-off upload) while it is verified, and only
completed once its trailer checks. A full image is cut into fixed-size chunks on the way;
a zero chunk is left out, and a chunk the store already has (by SHA-256) is not sent
again. Then the cut's manifest is written, last, as a conditional create: the cut exists
at the site from that moment, and not before. `keep` prunes after each delivery.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import time
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar, cast

import zstandard

from dmrepl import delta, phases, rebuild, retention, s3layout, s3restore, wire
from dmrepl.config import FieldReader, SiteSpec
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.s3layout import Chunk, DeltaObject, ImageIndex, Manifest
from dmrepl.s3store import (
    MIN_PART_BYTES,
    Location,
    ObjectUpload,
    Parallel,
    PreconditionFailed,
    Store,
    StoreError,
)
from dmrepl.sites.base import (
    CompareSeeder,
    Delivery,
    RecordUnreadable,
    SiteBroken,
    SiteContext,
    SiteDown,
    SiteFailure,
    SiteState,
    Transfer,
)

CONCURRENCY = 4  # requests in flight for one upload
DEFAULT_PART = 16 << 20
DEFAULT_FULL_EVERY = 32
DEFAULT_CHUNK = 4 << 20
MAX_CHUNK = 256 << 20


class StoreMisconfigured(SiteFailure):
    """The store refuses us for a reason time will not fix (no bucket, bad credentials)."""

    exit_code = ExitCode.CONFIG
    state = SiteState.MISCONFIGURED
    transient = False


@dataclass(frozen=True)
class S3SiteSpec(SiteSpec):
    """`transport = "s3"`: a bucket (and a prefix in it) of an S3-compatible store."""

    KEYS: ClassVar[frozenset[str]] = frozenset(
        {"endpoint", "bucket", "prefix", "region", "profile", "keep", "compress", "rate",
         "part_size", "chunk_size", "full_every"}
    )  # fmt: skip

    location: Location
    keep: retention.Grid = ()
    codec: str = "none"
    level: int = 3
    rate_bytes: int | None = None
    part_bytes: int = DEFAULT_PART
    chunk_bytes: int = DEFAULT_CHUNK
    full_every: int = DEFAULT_FULL_EVERY  # 0: never a synthetic full image

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        key = spec.key
        before = len(reader.problems)
        bucket = reader.string(raw, "bucket", key)
        if "bucket" not in raw:
            reader.problem(f"{key}.bucket", "missing (the bucket holding the site's objects)")
        endpoint = reader.string(raw, "endpoint", key)
        if endpoint is not None and not endpoint.startswith(("http://", "https://")):
            reader.problem(f"{key}.endpoint", f"{endpoint!r} is not an http:// or https:// URL")
        prefix = raw.get("prefix", "")
        if not isinstance(prefix, str) or any(c.isspace() for c in prefix):
            reader.problem(f"{key}.prefix", f"{prefix!r} must be a string without whitespace")
            prefix = ""
        region = reader.string(raw, "region", key)
        profile = reader.string(raw, "profile", key)
        keep: retention.Grid = ()
        if "keep" in raw:
            try:
                keep = retention.parse_grid(raw["keep"])
            except retention.GridError as exc:
                reader.problem(f"{key}.keep", str(exc))
        codec, level = _compression(reader, raw, key)
        rate = reader.size(raw, "rate", key)
        part = reader.size(raw, "part_size", key)
        if part is not None and part * 512 < MIN_PART_BYTES:
            reader.problem(f"{key}.part_size", "must be at least 5MiB (S3's smallest part)")
        chunk = reader.size(raw, "chunk_size", key)
        if chunk is not None and (chunk * 512 % 4096 or chunk * 512 > MAX_CHUNK):
            reader.problem(f"{key}.chunk_size", "must be a multiple of 4KiB, at most 256MiB")
        full_every = raw.get("full_every", DEFAULT_FULL_EVERY)
        if isinstance(full_every, bool) or not isinstance(full_every, int) or full_every < 0:
            reader.problem(
                f"{key}.full_every",
                f"{full_every!r} is not a whole number of deltas (0: never a synthetic full image)",
            )
        if bucket is None or len(reader.problems) > before:
            return None
        location = Location(bucket, prefix.strip("/"), endpoint, region, profile)
        return cls(
            spec.group, spec.name, spec.transport, spec.policy, location, keep, codec, level,
            None if rate is None else rate * 512,
            DEFAULT_PART if part is None else part * 512,
            DEFAULT_CHUNK if chunk is None else chunk * 512,
            full_every,
        )  # fmt: skip

    @property
    def base(self) -> str:
        """Where the group's objects are in the bucket."""
        return s3layout.group_prefix(self.location.prefix, self.group)


def _compression(reader: FieldReader, raw: dict[str, Any], key: str) -> tuple[str, int]:
    text = raw.get("compress", "none")
    name, _, level_text = str(text).partition(":")
    if name not in s3layout.CODECS or (level_text and (name != "zstd" or not level_text.isdigit())):
        reader.problem(f"{key}.compress", f'{text!r} is not "none", "zstd" or "zstd:LEVEL"')
        return "none", 0
    level = int(level_text) if level_text else 3
    if not 1 <= level <= 19:
        reader.problem(f"{key}.compress", f"zstd level {level} is not 1 to 19")
    return name, level


def site_failure(site: str, exc: StoreError) -> SiteFailure:
    """A store failure as the state the site is in."""
    message = f"site {site}: {exc.message}"
    if isinstance(exc, PreconditionFailed):
        return SiteBroken(message, hint=exc.hint)
    if exc.transient:
        return SiteDown(message, hint=exc.hint)
    return StoreMisconfigured(
        message,
        hint=exc.hint
        or "check the bucket, endpoint, region and the AWS credentials dmrepl "
        "finds (environment, ~/.aws, profile)",
    )


class S3Site:
    """An `s3` site: a Receiver that stores deltas, images and manifests as objects."""

    def __init__(self, spec: S3SiteSpec, context: SiteContext):
        self._spec = spec
        self._say = context.say
        self._store: Store | None = None
        self._manifests: dict[int, Manifest] = {}  # decoded ones (they never change)
        self._images: dict[str, ImageIndex] = {}

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> S3SiteSpec:
        return self._spec

    @property
    def store(self) -> Store:
        if self._store is None:
            try:
                self._store = Store(self._spec.location)
            except StoreError as exc:
                raise site_failure(self.name, exc) from None
        return self._store

    def check(self) -> None:
        try:
            self.store.check()
        except StoreError as exc:
            raise site_failure(self.name, exc) from None

    def cuts(self) -> list[int]:
        """The cuts whose manifests are in the store, oldest first."""
        base = self._spec.base
        listed = self.store.listing(f"{base}cuts/")
        return sorted(seq for key in listed if (seq := s3layout.cut_of(base, key)) is not None)

    def held(self) -> int | None:
        try:
            cuts = self.cuts()
        except StoreError as exc:
            raise site_failure(self.name, exc) from None
        return cuts[-1] if cuts else None

    def recorded(self) -> int | None:
        try:
            cuts = self.cuts()
        except StoreError as exc:
            raise RecordUnreadable(exc.message) from None
        return cuts[-1] if cuts else None

    def recover(self) -> Delivery | None:
        return None  # a cut exists iff its manifest does: there is nothing half done to finish

    def compare_seeder(self) -> CompareSeeder | None:
        return None

    def close(self) -> None:
        self._store = None

    def manifest(self, seq: int) -> Manifest:
        if seq not in self._manifests:
            key = s3layout.cut_key(self._spec.base, seq)
            self._manifests[seq] = s3layout.decode_manifest(self.store.get(key), key)
        return self._manifests[seq]

    def image(self, key: str) -> ImageIndex:
        if key not in self._images:
            self._images[key] = s3layout.decode_image(self.store.get(key), key)
        return self._images[key]

    def receive(self, stream: BinaryIO) -> Delivery:
        """Upload one delta (checked on the way), then write its cut's manifest."""
        label = f"delta for site {self.name}"
        head, header = _read_header(stream, label)
        if header.group != self._spec.group:
            raise delta.CorruptDelta(label, 0, f"it is of group {header.group}")
        source = cast(BinaryIO, _Prefixed(head, stream))
        bucket = None if self._spec.rate_bytes is None else wire.TokenBucket(self._spec.rate_bytes)
        started = time.monotonic()
        try:
            key = s3layout.cut_key(self._spec.base, header.seq)
            if self.store.exists(key):
                raise SiteBroken(
                    f"site {self.name}: cut {header.seq} is already at {self._spec.location.url}"
                    " (another writer shares this prefix, or the store was restored)",
                    hint="give each primary of a group its own prefix; nothing was overwritten",
                )
            base = None if header.base_seq is None else self._base(header.base_seq)
            phases.reached("journal-write")
            if base is None:
                manifest, transfer, data_bytes = self._upload_image(source, header, bucket)
            else:
                manifest, transfer, data_bytes = self._upload_delta(source, header, base, bucket)
            phases.reached("s3-manifest")
            self.store.create(key, s3layout.encode_manifest(manifest))
        except StoreError as exc:
            raise site_failure(self.name, exc) from None
        except s3layout.ManifestError as exc:
            raise SiteBroken(
                f"site {self.name}: {exc.message}",
                hint="`dmrepl verify` lists what is damaged; nothing was written for this cut",
            ) from None
        self._manifests[header.seq] = manifest
        phases.reached("applied")
        if self._spec.full_every and len(manifest.deltas) >= self._spec.full_every:
            self.synthesize(manifest)
        if self._spec.keep:
            self.prune()
        seconds = time.monotonic() - started
        return Delivery(
            header.seq,
            header.base_seq,
            data_bytes,
            Transfer(transfer[0], transfer[1], transfer[2], seconds),
        )

    def _base(self, seq: int) -> Manifest:
        """The manifest of the cut a delta builds on; the site must hold it."""
        try:
            return self.manifest(seq)
        except StoreError as exc:
            if exc.code in ("NoSuchKey", "404"):
                raise SiteDown(
                    f"site {self.name}: the store holds no cut {seq} to apply a delta onto",
                    hint="the next cycle ships from the cut the store holds",
                ) from None
            raise

    def _route_to(self, base: Manifest) -> tuple[int, str, str, tuple[DeltaObject, ...]]:
        """The shortest route to the base cut: from a synthetic full image of it if there is
        one (image cut, key, SHA-256, and the deltas after it), else the base's own route."""
        key = s3layout.image_key(self._spec.base, base.seq)
        if base.image == base.seq or not self.store.exists(key):
            return base.image, base.image_key, base.image_sha256, base.deltas
        return base.seq, key, s3layout.sha256(self.store.get(key)), ()

    def synthesize(self, manifest: Manifest) -> None:
        """Write a full image of the manifest's cut (its route fetched and applied to image
        files in a staging directory, then chunked: only chunks the store lacks are sent),
        so the next cuts' routes start there. A failure is said; nothing depends on it."""
        spec = self._spec
        staging = s3restore.staging_dir(None)
        try:
            remote = s3restore.Remote(self.store, spec.group)
            fetched = remote.fetch(manifest, staging)
            last = delta.open_verified(fetched.files[-1])
            targets = {}
            for device in last.devices:
                path = staging / f"{device.name}.image"
                with open(path, "xb") as image_file:
                    image_file.truncate(device.sectors * delta.SECTOR_BYTES)
                targets[device.name] = str(path)
            rebuild.apply_dir(
                staging, spec.group, targets, to_cut=manifest.seq, say=lambda _line: None
            )
            devices = tuple(
                delta.DeltaDevice(d.name, d.sectors, None, d.target_era) for d in last.devices
            )
            header = delta.DeltaHeader(spec.group, manifest.seq, None, devices, manifest.created)
            existing = set(self.store.listing(f"{spec.base}chunks/"))
            chunker = _Chunker(self.store, spec, header, existing, None)
            try:
                for index, device in enumerate(devices):
                    with open(targets[device.name], "rb") as image_file:
                        offset = 0
                        while data := image_file.read(spec.chunk_bytes):
                            if data != chunker.zeros[: len(data)]:
                                chunker.add(index, offset // delta.SECTOR_BYTES, data)
                            offset += len(data)
                image = chunker.finish()
            except BaseException:
                chunker.flight.close()
                raise
            key = s3layout.image_key(spec.base, manifest.seq)
            self.store.create(key, s3layout.encode_image(image))
            self._say(
                f"site {self.name}: wrote a full image of cut {manifest.seq} (its route held "
                f"{len(manifest.deltas)} deltas): {len(image.chunks)} chunks, "
                f"{chunker.raw_sent} bytes sent, {chunker.skipped} bytes already in the store"
            )
        except (StoreError, DmreplError, OSError) as exc:
            reason = exc.message if isinstance(exc, DmreplError) else str(exc)
            self._say(
                f"site {self.name}: warning: no full image of cut {manifest.seq}: {reason}; "
                "the cut stands, and a later delivery tries again"
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _upload_delta(
        self,
        source: BinaryIO,
        header: delta.DeltaHeader,
        base: Manifest,
        bucket: wire.TokenBucket | None,
    ) -> tuple[Manifest, tuple[int, int, int], int]:
        spec = self._spec
        assert header.base_seq is not None
        key = s3layout.delta_key(spec.base, spec.group, header.seq, header.base_seq, spec.codec)
        upload = ObjectUpload(
            self.store, key, part_bytes=spec.part_bytes, codec=spec.codec, level=spec.level,
            bucket=bucket, concurrency=CONCURRENCY,
        )  # fmt: skip
        try:
            _, summary = delta.verify(delta.Tee(source, upload), f"delta for site {self.name}")  # type: ignore[arg-type]
            done = upload.finish()
        except BaseException:
            upload.abandon()  # the parts sent stay for the next upload to resume
            raise
        stored = DeltaObject(
            key, header.seq, header.base_seq, done.size, done.sha256, summary.stream_bytes,
            spec.codec,
        )  # fmt: skip
        image, image_key, image_sha256, earlier = self._route_to(base)
        manifest = Manifest(
            spec.group, header.seq, header.created, image, image_key, image_sha256,
            (*earlier, stored),
        )  # fmt: skip
        transfer = (done.resumed_bytes, done.raw_bytes - done.resumed_bytes, done.sent_bytes)
        return manifest, transfer, summary.data_bytes

    def _upload_image(
        self, source: BinaryIO, header: delta.DeltaHeader, bucket: wire.TokenBucket | None
    ) -> tuple[Manifest, tuple[int, int, int], int]:
        spec = self._spec
        label = f"delta for site {self.name}"
        existing = set(self.store.listing(f"{spec.base}chunks/"))
        chunker = _Chunker(self.store, spec, header, existing, bucket)
        again = delta.read_header(source, label)
        data_bytes = 0
        try:
            for record in delta.records(source, again, label):
                chunker.add(record.device, record.offset, record.data)
                data_bytes += len(record.data)
            image = chunker.finish()
        except BaseException:
            chunker.flight.close()
            raise
        body = s3layout.encode_image(image)
        key = s3layout.image_key(spec.base, header.seq)
        self.store.create(key, body)  # an image of a cut is written once
        manifest = Manifest(
            spec.group, header.seq, header.created, header.seq, key, s3layout.sha256(body), ()
        )
        return manifest, (chunker.skipped, chunker.raw_sent, chunker.sent), data_bytes

    def prune(self) -> None:
        """Delete the cuts `keep` does not keep, then every object no kept cut needs. A
        failure is said and leaves every kept cut restorable; the next delivery tries again."""
        spec = self._spec
        try:
            listed = self.store.listing(spec.base)
            manifests = {seq: self.manifest(seq) for seq in self.cuts()}
            times = {seq: m.created for seq, m in manifests.items()}
            kept = retention.kept_cuts(times, spec.keep)
            images = {manifests[s].image_key: self.image(manifests[s].image_key) for s in kept}
            synthetic = s3layout.image_key(spec.base, max(manifests)) if manifests else None
            if synthetic is not None and synthetic in listed:
                images[synthetic] = self.image(synthetic)  # where the next route starts
            plan = s3layout.plan_prune(spec.base, manifests, images, listed, spec.keep)
            if plan.manifests:
                self.store.delete(list(plan.manifests))
                for key in plan.manifests:
                    seq = s3layout.cut_of(spec.base, key)
                    self._manifests.pop(seq or -1, None)
            if plan.objects:
                self.store.delete(list(plan.objects))
        except (StoreError, DmreplError) as exc:
            self._say(
                f"site {self.name}: warning: pruning {spec.location.url} stopped: "
                f"{exc.message}; every kept cut is still restorable, and the next delivery "
                "tries again"
            )
            return
        if plan.manifests or plan.objects:
            dropped = [str(s3layout.cut_of(spec.base, key)) for key in plan.manifests]
            count = len(plan.objects)
            self._say(
                f"site {self.name}: dropped cuts {', '.join(dropped) or 'none'} (not kept); "
                f"deleted {count} object{'' if count == 1 else 's'} no kept cut needs"
            )


class _Chunker:
    """Cuts a full image's records (in device and offset order) into fixed-size chunks and
    uploads each non-zero one the store does not have yet."""

    def __init__(
        self,
        store: Store,
        spec: S3SiteSpec,
        header: delta.DeltaHeader,
        existing: set[str],
        bucket: wire.TokenBucket | None,
    ):
        self.store, self.spec, self.header = store, spec, header
        self.size = spec.chunk_bytes
        self.existing = existing
        self.bucket = bucket
        self.zstd = zstandard.ZstdCompressor(level=spec.level) if spec.codec == "zstd" else None
        self.chunks: list[Chunk] = []
        self.at: tuple[int, int] | None = None  # (device, chunk index) being filled
        self.buffer = bytearray()
        self.zeros = bytes(self.size)
        self.skipped = self.raw_sent = self.sent = 0
        self.flight = Parallel(CONCURRENCY)

    def add(self, device: int, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        start = offset * delta.SECTOR_BYTES
        while view:
            index, within = divmod(start, self.size)
            if self.at != (device, index):
                if self.at is not None and (device, index) < self.at:
                    raise SiteBroken(
                        f"site {self.spec.name}: the full image's records are not in order "
                        f"(device {device} chunk {index} after chunk {self.at[1]})"
                    )
                self._flush()
                length = min(
                    self.size, self.header.devices[device].sectors * 512 - index * self.size
                )
                self.at, self.buffer = (device, index), bytearray(length)
            piece = view[: len(self.buffer) - within]
            self.buffer[within : within + len(piece)] = piece
            view = view[len(piece) :]
            start += len(piece)

    def _flush(self) -> None:
        if self.at is None or self.buffer == self.zeros[: len(self.buffer)]:
            return
        raw = bytes(self.buffer)
        digest = hashlib.sha256(raw).hexdigest()
        key = s3layout.chunk_key(self.spec.base, digest, self.spec.codec)
        body = raw if self.zstd is None else self.zstd.compress(raw)
        if key in self.existing:
            self.skipped += len(raw)
        else:
            if self.bucket is not None:
                self.bucket.take(len(body))
            self.flight.submit(lambda: self.store.put(key, body))
            self.existing.add(key)
            self.raw_sent += len(raw)
            self.sent += len(body)
        crcs = tuple(
            zlib.crc32(raw[i : i + s3layout.CRC_BLOCK])
            for i in range(0, len(raw), s3layout.CRC_BLOCK)
        )
        device, index = self.at
        self.chunks.append(Chunk(device, index, key, len(body), digest, len(raw), crcs))

    def finish(self) -> ImageIndex:
        """Wait for every chunk; the image index that names them."""
        self._flush()
        self.flight.wait()
        self.at = None
        header = self.header
        devices = tuple(
            delta.DeltaDevice(d.name, d.sectors, None, d.target_era) for d in header.devices
        )
        return ImageIndex(
            header.group, header.seq, header.created, self.size, devices, tuple(self.chunks),
            self.spec.codec,
        )  # fmt: skip


def _read_header(stream: BinaryIO, label: str) -> tuple[bytes, delta.DeltaHeader]:
    """The header's bytes as read from `stream`, and the header (checked)."""
    preamble = _read(stream, delta.HEADER_FIXED_BYTES - 4)
    length = int.from_bytes(preamble[-4:], "little")
    if length > delta.MAX_HEADER_JSON_BYTES:
        raise delta.CorruptDelta(label, 0, f"header length {length} is too large")
    head = preamble + _read(stream, length + 4)
    return head, delta.read_header(io.BytesIO(head), label)


def _read(stream: BinaryIO, size: int) -> bytes:
    parts, left = [], size
    while left:
        part = stream.read(left)
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


class _Prefixed:
    """A reader that gives `head` and then the rest of `stream`."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head = memoryview(head)
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        if self._head:
            take = len(self._head) if size < 0 else min(size, len(self._head))
            data = bytes(self._head[:take])
            self._head = self._head[take:]
            return data
        return self._stream.read(size)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)
