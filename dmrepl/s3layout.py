"""What an `s3` site keeps in its bucket, and which of it retention deletes. Pure: no I/O.

Under `<prefix>/<group>/`:

    deltas/<group>.<seq>.<base>.delta[.zst]   a spool delta, uploaded as it is (zstd: per part)
    chunks/<sha256>[.zst]                     one fixed-size chunk of a full image (never zero)
    images/<seq>.json                         a full image: its devices and chunks, in order
    cuts/<seq>.json                           a cut's manifest, written last

A cut exists at the site iff its manifest does. The manifest names the route that restores
it (a full image and the deltas after it), with the size and SHA-256 of every object, so a
restore reads nothing else and checks everything it reads. Each JSON document carries the
SHA-256 of its own canonical body.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from dmrepl import deltafiles, retention
from dmrepl.delta import DeltaDevice
from dmrepl.errors import DmreplError, ExitCode

FORMAT = 1
CRC_BLOCK = 1 << 20  # a chunk carries the CRC-32 of each MiB, to say where it is corrupt
CODECS = ("none", "zstd")
_CUT = re.compile(r"^cuts/(\d{10})\.json$")


class ManifestError(DmreplError):
    """A manifest or image index in the store is not what dmrepl wrote."""

    exit_code = ExitCode.CORRUPT


def group_prefix(prefix: str, group: str) -> str:
    """Where a group's objects live: `prefix/group/` (a prefix's slashes are trimmed)."""
    clean = prefix.strip("/")
    return f"{clean}/{group}/" if clean else f"{group}/"


def cut_key(base: str, seq: int) -> str:
    return f"{base}cuts/{seq:010d}.json"


def image_key(base: str, seq: int) -> str:
    return f"{base}images/{seq:010d}.json"


def delta_key(base: str, group: str, seq: int, base_seq: int | None, codec: str) -> str:
    suffix = ".zst" if codec == "zstd" else ""
    return f"{base}deltas/{deltafiles.file_name(group, seq, base_seq)}{suffix}"


def chunk_key(base: str, sha256: str, codec: str) -> str:
    return f"{base}chunks/{sha256}{'.zst' if codec == 'zstd' else ''}"


def cut_of(base: str, key: str) -> int | None:
    """The cut a manifest key names, or None for any other key."""
    match = _CUT.match(key[len(base) :]) if key.startswith(base) else None
    return None if match is None else int(match[1])


@dataclass(frozen=True)
class DeltaObject:
    """A delta as stored: its key, the stored bytes' size and SHA-256, the stream's size."""

    key: str
    seq: int
    base_seq: int | None
    size: int
    sha256: str
    stream_bytes: int
    codec: str


@dataclass(frozen=True)
class Chunk:
    """One non-zero chunk of a full image: device index, chunk number, object, checks."""

    device: int
    index: int
    key: str
    size: int  # stored bytes
    sha256: str  # of the raw chunk
    length: int  # raw bytes (the device's last chunk may be short)
    crcs: tuple[int, ...]  # CRC-32 of each CRC_BLOCK of the raw chunk


@dataclass(frozen=True)
class ImageIndex:
    """A full image of cut `seq`: every non-zero chunk of every device."""

    group: str
    seq: int
    created: float
    chunk_bytes: int
    devices: tuple[DeltaDevice, ...]
    chunks: tuple[Chunk, ...]
    codec: str


@dataclass(frozen=True)
class Manifest:
    """Cut `seq` of the group: the image and the deltas (in order) that restore it."""

    group: str
    seq: int
    created: float
    image: int  # the cut of the full image the route starts from
    image_key: str
    image_sha256: str
    deltas: tuple[DeltaObject, ...]

    @property
    def keys(self) -> frozenset[str]:
        """The objects the manifest references directly (an image's chunks come through it)."""
        return frozenset({self.image_key, *(d.key for d in self.deltas)})


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _seal(kind: str, body: dict[str, Any]) -> bytes:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    doc = {"kind": kind, "format": FORMAT, "body": body, "sha256": sha256(canonical.encode())}
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def _open(kind: str, data: bytes, key: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
        body = doc["body"]
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (ValueError, KeyError, TypeError) as exc:
        raise ManifestError(f"{key}: not a dmrepl {kind} ({exc})") from None
    if doc.get("kind") != kind or doc.get("format") != FORMAT:
        raise ManifestError(f"{key}: not a format-{FORMAT} dmrepl {kind}")
    if doc.get("sha256") != sha256(canonical.encode()):
        raise ManifestError(
            f"{key}: its checksum does not match its contents (corrupt at rest or in transit)"
        )
    if not isinstance(body, dict):
        raise ManifestError(f"{key}: not a dmrepl {kind}")
    return body


def encode_manifest(manifest: Manifest) -> bytes:
    return _seal(
        "cut",
        {
            "group": manifest.group,
            "seq": manifest.seq,
            "created": manifest.created,
            "image": {
                "seq": manifest.image,
                "key": manifest.image_key,
                "sha256": manifest.image_sha256,
            },
            "deltas": [
                {
                    "key": d.key, "seq": d.seq, "base_seq": d.base_seq, "size": d.size,
                    "sha256": d.sha256, "stream_bytes": d.stream_bytes, "codec": d.codec,
                }
                for d in manifest.deltas
            ],
        },
    )  # fmt: skip


def decode_manifest(data: bytes, key: str) -> Manifest:
    body = _open("cut", data, key)
    try:
        image = body["image"]
        manifest = Manifest(
            str(body["group"]),
            int(body["seq"]),
            float(body["created"]),
            int(image["seq"]),
            str(image["key"]),
            str(image["sha256"]),
            tuple(
                DeltaObject(
                    str(d["key"]), int(d["seq"]),
                    None if d["base_seq"] is None else int(d["base_seq"]),
                    int(d["size"]), str(d["sha256"]), int(d["stream_bytes"]), _codec(d["codec"]),
                )
                for d in body["deltas"]
            ),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as exc:
        raise ManifestError(f"{key}: a field is missing or of the wrong type ({exc})") from None
    _check_route(manifest, key)
    return manifest


def _codec(value: object) -> str:
    if value not in CODECS:
        raise ValueError(f"codec {value!r}")
    return str(value)


def _check_route(manifest: Manifest, key: str) -> None:
    at = manifest.image
    for step in manifest.deltas:
        if step.base_seq != at or step.seq <= at:
            raise ManifestError(f"{key}: its route does not link at cut {at} ({step.key})")
        at = step.seq
    if at != manifest.seq:
        raise ManifestError(f"{key}: its route ends at cut {at}, not at cut {manifest.seq}")


def encode_image(image: ImageIndex) -> bytes:
    return _seal(
        "image",
        {
            "group": image.group,
            "seq": image.seq,
            "created": image.created,
            "chunk_bytes": image.chunk_bytes,
            "codec": image.codec,
            "devices": [
                {"name": d.name, "sectors": d.sectors, "target_era": d.target_era}
                for d in image.devices
            ],
            "chunks": [
                [c.device, c.index, c.key, c.size, c.sha256, c.length, list(c.crcs)]
                for c in image.chunks
            ],
        },
    )


def decode_image(data: bytes, key: str) -> ImageIndex:
    body = _open("image", data, key)
    try:
        devices = tuple(
            DeltaDevice(str(d["name"]), int(d["sectors"]), None, int(d["target_era"]))
            for d in body["devices"]
        )
        image = ImageIndex(
            str(body["group"]),
            int(body["seq"]),
            float(body["created"]),
            int(body["chunk_bytes"]),
            devices,
            tuple(
                Chunk(
                    int(c[0]),
                    int(c[1]),
                    str(c[2]),
                    int(c[3]),
                    str(c[4]),
                    int(c[5]),
                    tuple(int(x) for x in c[6]),
                )
                for c in body["chunks"]
            ),
            _codec(body["codec"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ManifestError(f"{key}: a field is missing or of the wrong type ({exc})") from None
    for chunk in image.chunks:
        if not 0 <= chunk.device < len(devices) or chunk.index < 0:
            raise ManifestError(f"{key}: chunk {chunk.key} names no device of the image")
        end = chunk.index * image.chunk_bytes + chunk.length
        if chunk.length <= 0 or end > devices[chunk.device].sectors * 512:
            raise ManifestError(f"{key}: chunk {chunk.key} lies beyond its device")
    return image


@dataclass(frozen=True)
class PrunePlan:
    """What retention deletes: manifests of the cuts not kept first, then every object no
    kept cut needs. Deleting in this order, a crash in between leaves only garbage."""

    kept: frozenset[int]
    manifests: tuple[str, ...]
    objects: tuple[str, ...]


def plan_prune(
    base: str,
    manifests: Mapping[int, Manifest],
    images: Mapping[str, ImageIndex],
    listed: Iterable[str],
    grid: retention.Grid,
) -> PrunePlan:
    """Which keys to delete so the store holds the cuts `grid` keeps and what they need.

    `images` are the image indexes (by key) of the kept manifests, and of a synthetic full
    image of the newest cut if there is one (the next cut's route starts there: it stays
    with its chunks); `listed` is every key under `base`. Objects of cuts newer than the
    newest manifest stay (an upload the next cycle resumes); an empty grid keeps every cut.
    """
    if not manifests:
        return PrunePlan(frozenset(), (), ())
    times = {seq: m.created for seq, m in manifests.items()}
    kept = frozenset(manifests) if not grid else retention.kept_cuts(times, grid)
    needed: set[str] = set()
    for seq in kept:
        manifest = manifests[seq]
        needed |= manifest.keys
        image = images.get(manifest.image_key)
        if image is None:
            raise ManifestError(f"{manifest.image_key}: the image of kept cut {seq} is not given")
        needed.update(chunk.key for chunk in image.chunks)
    newest = max(manifests)
    synthetic = images.get(image_key(base, newest))
    if synthetic is not None:
        needed.add(image_key(base, newest))
        needed.update(chunk.key for chunk in synthetic.chunks)
    drop = tuple(cut_key(base, seq) for seq in sorted(manifests) if seq not in kept)
    objects = []
    for key in sorted(listed):
        if not key.startswith(base) or key in needed or cut_of(base, key) is not None:
            continue  # another group's, needed, or a manifest (dropped above or kept)
        later = _seq_of(base, key)
        if later is not None and later > newest:
            continue  # uploaded for a cut whose manifest is not written yet
        objects.append(key)
    return PrunePlan(kept, drop, tuple(objects))


_NUMBERED = re.compile(r"^(?:images/(\d{10})\.json|deltas/[^.]+\.(\d{10})\.[^/]*)$")


def _seq_of(base: str, key: str) -> int | None:
    """The cut an image or delta object belongs to (None: a chunk or a foreign key)."""
    match = _NUMBERED.match(key[len(base) :]) if key.startswith(base) else None
    if match is None:
        return None
    return int(match[1] or match[2])
