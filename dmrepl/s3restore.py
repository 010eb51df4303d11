"""Reading an `s3` site back: `dmrepl apply s3://...`, `dmrepl pull` and `dmrepl verify`.

One abstraction feeds dmrepl.rebuild: the route of the cut asked for (its manifest's image
and deltas) is fetched into a private staging directory as ordinary delta files, every
object checked on the way: a delta against the delta format's own checksums (a failure
names the object's key and the byte offset) and the manifest's size and SHA-256; an image
chunk against the CRC-32 of each MiB (naming key and offset) and its SHA-256; the image
becomes one full-image delta file. Only when the whole route is fetched and checked does
`rebuild.apply_dir` open the targets, verify the files again and write; so a corrupt
object leaves the targets untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import BinaryIO, cast

import zstandard

from dmrepl import blockio, delta, deltafiles, rebuild, s3layout
from dmrepl.errors import InvalidInput
from dmrepl.s3layout import DeltaObject, ImageIndex, Manifest
from dmrepl.s3store import Location, Store, StoreError, parse_url
from dmrepl.signals import Say

_UNTOUCHED = "nothing was written to the targets"


@dataclass(frozen=True)
class Fetched:
    """What a fetch read: objects, stored bytes, and the delta files it made."""

    objects: int
    stored_bytes: int
    files: tuple[Path, ...]


class Remote:
    """A group's objects in a store, read-only."""

    def __init__(self, store: Store, group: str):
        self.store, self.group = store, group
        self.base = s3layout.group_prefix(store.location.prefix, group)

    def cuts(self) -> list[int]:
        listed = self.store.listing(f"{self.base}cuts/")
        return sorted(c for key in listed if (c := s3layout.cut_of(self.base, key)) is not None)

    def manifest(self, seq: int) -> Manifest:
        key = s3layout.cut_key(self.base, seq)
        manifest = s3layout.decode_manifest(self.store.get(key), key)
        if (manifest.group, manifest.seq) != (self.group, seq):
            raise s3layout.ManifestError(
                f"{key}: it describes cut {manifest.seq} of {manifest.group}"
            )
        return manifest

    def url(self, key: str) -> str:
        return f"s3://{self.store.bucket}/{key}"

    def fetch(self, manifest: Manifest, directory: Path, *, from_cut: int | None = None) -> Fetched:
        """The delta files that bring targets to the manifest's cut (from a full image, or
        from `from_cut` on its route) into `directory`, every object checked."""
        objects = stored = 0
        files: list[Path] = []
        steps = list(manifest.deltas)
        if from_cut is None:
            image_body = self.store.get(manifest.image_key)
            if s3layout.sha256(image_body) != manifest.image_sha256:
                raise _corrupt(
                    self.url(manifest.image_key), 0, "its SHA-256 differs from the manifest's"
                )
            image = s3layout.decode_image(image_body, manifest.image_key)
            name = deltafiles.file_name(self.group, image.seq, None)
            path = directory / name
            with _new_file(path) as out:
                count, size = self.write_image(image, out)
            objects, stored = count + 1, size + len(image_body)
            files.append(path)
        else:
            steps = [d for d in steps if d.base_seq is not None and d.base_seq >= from_cut]
        for step in steps:
            path = directory / deltafiles.file_name(self.group, step.seq, step.base_seq)
            with _new_file(path) as out:
                self.write_delta(step, out)
            objects, stored = objects + 1, stored + step.size
            files.append(path)
        return Fetched(objects, stored, tuple(files))

    def write_delta(self, step: DeltaObject, out: BinaryIO) -> None:
        """The delta object, checked, as a plain delta stream into `out`."""
        source = self.url(step.key)
        reader = _ObjectReader(self.store.stream(step.key))
        stream: BinaryIO = reader  # type: ignore[assignment]
        if step.codec == "zstd":
            stream = zstandard.ZstdDecompressor().stream_reader(
                cast(BinaryIO, reader), read_across_frames=True
            )
        try:
            header, summary = delta.verify(delta.Tee(stream, out), source)  # type: ignore[arg-type]
        except zstandard.ZstdError as exc:
            raise _corrupt(source, reader.size, f"it does not decompress ({exc})") from None
        reader.drain()
        if (header.group, header.seq, header.base_seq) != (self.group, step.seq, step.base_seq):
            raise _corrupt(source, 0, "its header names another cut than the manifest")
        if reader.size != step.size or summary.stream_bytes != step.stream_bytes:
            raise _corrupt(
                source, min(reader.size, step.size),
                f"it holds {reader.size} bytes, the manifest says {step.size}",
            )  # fmt: skip
        if reader.sha256.hexdigest() != step.sha256:
            raise _corrupt(source, 0, "its SHA-256 differs from the manifest's")

    def write_image(self, image: ImageIndex, out: BinaryIO) -> tuple[int, int]:
        """The image's chunks, checked, as one full-image delta into `out`; (chunks, bytes)."""
        header = delta.DeltaHeader(image.group, image.seq, None, image.devices, image.created)
        writer = delta.DeltaWriter(out, header)
        stored = 0
        decompress = zstandard.ZstdDecompressor()
        chunks = sorted(image.chunks, key=lambda c: (c.device, c.index))
        bodies = _prefetch(self.store, [c.key for c in chunks])
        for chunk, body in zip(chunks, bodies, strict=True):
            source = self.url(chunk.key)
            stored += len(body)
            raw = body
            if image.codec == "zstd":
                try:
                    raw = decompress.decompress(body, max_output_size=image.chunk_bytes)
                except zstandard.ZstdError as exc:
                    raise _corrupt(source, 0, f"it does not decompress ({exc})") from None
            for number, crc in enumerate(chunk.crcs):
                start = number * s3layout.CRC_BLOCK
                if zlib.crc32(raw[start : start + s3layout.CRC_BLOCK]) != crc:
                    raise _corrupt(source, start, "a CRC-32 of the image index does not match")
            if len(raw) != chunk.length:
                raise _corrupt(source, min(len(raw), chunk.length), "it is not the chunk's size")
            if hashlib.sha256(raw).hexdigest() != chunk.sha256:
                raise _corrupt(source, 0, "its SHA-256 differs from the image index's")
            writer.add(chunk.device, chunk.index * image.chunk_bytes // delta.SECTOR_BYTES, raw)
        writer.finish()
        return len(image.chunks), stored


def _prefetch(store: Store, keys: list[str], width: int = 4) -> Iterator[bytes]:
    """The objects' bytes in order, up to `width` of them fetched ahead."""
    with ThreadPoolExecutor(width, thread_name_prefix="s3-get") as pool:
        ahead: deque[Future[bytes]] = deque()
        pending = iter(keys)
        for key in islice(pending, width):
            ahead.append(pool.submit(store.get, key))
        try:
            while ahead:
                body = ahead.popleft().result()
                following = next(pending, None)
                if following is not None:
                    ahead.append(pool.submit(store.get, following))
                yield body
        finally:
            for future in ahead:
                future.cancel()


def _corrupt(source: str, offset: int, problem: str) -> delta.CorruptDelta:
    return delta.CorruptDelta(
        source,
        offset,
        problem,
        hint=f"{_UNTOUCHED}; the object is damaged in the store (`dmrepl verify` lists all)",
    )


class _ObjectReader:
    """A file-like reader of an object's pieces that hashes and counts what it reads."""

    def __init__(self, pieces: Iterator[bytes]):
        self._pieces = pieces
        self._left = memoryview(b"")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1) -> bytes:
        if not self._left:
            piece = next(self._pieces, b"")
            self.sha256.update(piece)
            self.size += len(piece)
            self._left = memoryview(piece)
        take = len(self._left) if size < 0 else min(size, len(self._left))
        data = bytes(self._left[:take])
        self._left = self._left[take:]
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end (bytes after a delta's trailer still count against its size)."""
        while self.read(1 << 20):
            pass


def _new_file(path: Path) -> BinaryIO:
    """A fresh file in the staging directory (never an existing one)."""
    return open(path, "xb", buffering=blockio.CHUNK_BYTES)


def open_remote(url: str, group: str, *, endpoint: str | None, region: str | None,
                profile: str | None) -> Remote:  # fmt: skip
    """The group at `s3://bucket/prefix`, credentials from the standard AWS configuration."""
    try:
        bucket, prefix = parse_url(url)
    except ValueError as exc:
        raise InvalidInput(str(exc), hint="give s3://BUCKET/PREFIX as the site writes it") from None
    return Remote(Store(Location(bucket, prefix, endpoint, region, profile)), group)


def pick(remote: Remote, to_cut: int | None) -> Manifest:
    """The manifest of `to_cut` (default: the newest), or a clear refusal."""
    cuts = remote.cuts()
    where = f"s3://{remote.store.bucket}/{remote.base}"
    if not cuts:
        raise InvalidInput(f"{where} holds no cut of group {remote.group}")
    target = cuts[-1] if to_cut is None else to_cut
    if target not in cuts:
        raise InvalidInput(
            f"{where} holds no manifest of cut {target} (never written, or not kept)",
            hint=f"cuts it can restore: {rebuild.describe_cuts(cuts)}; {_UNTOUCHED}",
        )
    return remote.manifest(target)


STAGING = Path("/var/tmp")


def staging_dir(parent: Path | None) -> Path:
    """A private directory for the fetched route (mode 0700), in `parent` or /var/tmp."""
    return Path(tempfile.mkdtemp(prefix="dmrepl-s3.", dir=parent or STAGING))


def apply_s3(
    remote: Remote,
    targets: Mapping[str, str],
    *,
    from_cut: int | None = None,
    to_cut: int | None = None,
    staging: Path | None = None,
    dry_run: bool = False,
    say: Say = print,
) -> rebuild.ApplyResult:
    """Bring `targets` to cut `to_cut` (default: the newest) of the store, from a full image
    or (with `from_cut`) from the cut they hold. Everything is fetched and checked before a
    byte is written (`dry_run`: fetched, checked, and nothing written to the targets)."""
    for option, value in (("--from-cut", from_cut), ("--cut", to_cut)):
        if value is not None and value < 0:
            raise InvalidInput(f"{option} {value} is not a cut (cuts are numbered from 1)")
    manifest = pick(remote, to_cut)
    if from_cut is not None and from_cut != manifest.seq:
        on_route = {manifest.image, *(d.seq for d in manifest.deltas)}
        if from_cut not in on_route or from_cut > manifest.seq:
            raise InvalidInput(
                f"cut {manifest.seq} cannot be reached from cut {from_cut}: its route is "
                f"{rebuild.describe_cuts(sorted(on_route))}",
                hint=f"restore from the full image (leave out --from-cut); {_UNTOUCHED}",
            )
    if from_cut == manifest.seq:
        raise InvalidInput(
            f"the targets hold cut {from_cut} already: there is nothing to apply",
            hint="give a later --cut, or leave --from-cut out to restore from the full image",
        )
    directory = staging_dir(staging)
    try:
        fetched = remote.fetch(manifest, directory, from_cut=from_cut)
        say(
            f"fetched and checked {fetched.objects} objects "
            f"({fetched.stored_bytes} bytes) of cut {manifest.seq}"
        )
        return rebuild.apply_dir(
            directory, remote.group, targets, from_cut=from_cut, to_cut=manifest.seq,
            dry_run=dry_run, say=say,
        )  # fmt: skip
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Cursor:
    """Where a `dmrepl pull` replica is: the store, the group, its targets and their cut."""

    url: str
    group: str
    targets: dict[str, str]
    cut: int


def read_cursor(path: Path) -> Cursor | None:
    try:
        doc = json.loads(path.read_text())
        return Cursor(str(doc["url"]), str(doc["group"]), dict(doc["targets"]), int(doc["cut"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(
            f"{path}: not a pull cursor ({exc})", hint="move it aside to restore from scratch"
        ) from None


def write_cursor(path: Path, cursor: Cursor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps(cursor.__dict__, indent=1, sort_keys=True) + "\n"
    deltafiles.write_durably(path.parent, path.name, lambda out: out.write(body.encode()))


def pull(
    remote: Remote,
    url: str,
    targets: Mapping[str, str],
    cursor_path: Path,
    *,
    staging: Path | None = None,
    say: Say = print,
) -> tuple[int | None, rebuild.ApplyResult | None]:
    """Bring a local replica to the store's newest cut: roll forward from its cursor when
    the newest manifest's route passes through it, else restore the newest full route.
    Returns (the cut it held, what was applied; None: already there)."""
    cursor = read_cursor(cursor_path)
    if cursor is not None and (cursor.url, cursor.group, cursor.targets) != (
        url, remote.group, dict(targets),
    ):  # fmt: skip
        raise InvalidInput(
            f"{cursor_path} follows {cursor.url} group {cursor.group} onto "
            f"{', '.join(f'{k}={v}' for k, v in cursor.targets.items())}",
            hint="give the same store, group and targets, or another --cursor",
        )
    manifest = pick(remote, None)
    held = None if cursor is None else cursor.cut
    if held == manifest.seq:
        return held, None
    start = held
    on_route = {d.base_seq for d in manifest.deltas}
    if held is not None and held not in on_route:
        say(
            f"note: the store's route to cut {manifest.seq} does not pass cut {held} "
            "(pruned): restoring from its full image"
        )
        start = None
    result = apply_s3(
        remote, targets, from_cut=start, to_cut=manifest.seq, staging=staging, say=say
    )
    write_cursor(cursor_path, Cursor(url, remote.group, dict(targets), result.cut))
    return held, result


def verify_store(remote: Remote) -> tuple[int, int, list[str]]:
    """Check every cut's manifest and, once each, every object their routes need (read,
    written nowhere); returns (newest cut, stored bytes checked, problems, each naming the
    object, the offset and the cuts it breaks)."""
    problems: list[str] = []
    checked = 0
    cuts = remote.cuts()
    if not cuts:
        return 0, 0, [f"s3://{remote.store.bucket}/{remote.base} holds no cut"]
    images: dict[str, tuple[str, list[int]]] = {}
    deltas: dict[str, tuple[DeltaObject, list[int]]] = {}
    for seq in cuts:
        try:
            manifest = remote.manifest(seq)
        except (StoreError, s3layout.ManifestError) as exc:
            problems.append(f"cut {seq}: {exc.message}")
            continue
        images.setdefault(manifest.image_key, (manifest.image_sha256, []))[1].append(seq)
        for step in manifest.deltas:
            deltas.setdefault(step.key, (step, []))[1].append(seq)
    with open(os.devnull, "wb") as sink:
        for key, (digest, users) in images.items():
            try:
                body = remote.store.get(key)
                if s3layout.sha256(body) != digest:
                    raise _corrupt(remote.url(key), 0, "its SHA-256 differs from the manifest's")
                checked += len(body) + remote.write_image(s3layout.decode_image(body, key), sink)[1]
            except (StoreError, delta.CorruptDelta, s3layout.ManifestError) as exc:
                problems.append(f"{exc.message} (cuts {rebuild.describe_cuts(users)})")
        for step, users in deltas.values():
            try:
                remote.write_delta(step, sink)
                checked += step.size
            except (StoreError, delta.CorruptDelta) as exc:
                problems.append(f"{exc.message} (cuts {rebuild.describe_cuts(users)})")
    return cuts[-1], checked, problems
