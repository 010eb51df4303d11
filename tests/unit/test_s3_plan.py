"""`s3` sites without a server: the keys, manifests and image indexes (dmrepl.s3layout),
retention's plan, and the site's configuration keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl import retention, s3layout
from dmrepl.config import ConfigError, parse_config
from dmrepl.delta import DeltaDevice
from dmrepl.s3layout import Chunk, DeltaObject, ImageIndex, Manifest
from dmrepl.sites.s3 import DEFAULT_CHUNK, DEFAULT_PART, S3SiteSpec

BASE = s3layout.group_prefix("/dr/fleet/", "g")


def image(seq: int, chunks: tuple[str, ...]) -> ImageIndex:
    devices = (DeltaDevice("a", 8192, None, 10 * seq),)
    return ImageIndex(
        "g", seq, float(seq), 1 << 20, devices,
        tuple(Chunk(0, i, BASE + f"chunks/{c}", 9, c, 512, (1,)) for i, c in enumerate(chunks)),
        "none",
    )  # fmt: skip


def manifest(seq: int, image_seq: int, created: float) -> Manifest:
    deltas = tuple(
        DeltaObject(s3layout.delta_key(BASE, "g", s, s - 1, "none"), s, s - 1, 10, "x", 10, "none")
        for s in range(image_seq + 1, seq + 1)
    )
    return Manifest("g", seq, created, image_seq, s3layout.image_key(BASE, image_seq), "y", deltas)


def test_keys_and_documents_round_trip() -> None:
    assert BASE == "dr/fleet/g/"
    assert s3layout.cut_key(BASE, 7) == "dr/fleet/g/cuts/0000000007.json"
    assert s3layout.cut_of(BASE, "dr/fleet/g/cuts/0000000007.json") == 7
    assert s3layout.cut_of(BASE, "dr/fleet/g/images/0000000007.json") is None
    assert s3layout.delta_key(BASE, "g", 3, 2, "zstd").endswith(".0000000003.0000000002.delta.zst")
    made = manifest(3, 1, 5.5)
    assert s3layout.decode_manifest(s3layout.encode_manifest(made), "k") == made
    index = image(1, ("aa", "bb"))
    assert s3layout.decode_image(s3layout.encode_image(index), "k") == index


def test_a_damaged_or_foreign_manifest_is_refused() -> None:
    body = s3layout.encode_manifest(manifest(3, 1, 5.5))
    with pytest.raises(s3layout.ManifestError, match="checksum does not match"):
        s3layout.decode_manifest(body.replace(b'"seq": 3', b'"seq": 4'), "k")
    with pytest.raises(s3layout.ManifestError, match="not a dmrepl cut"):
        s3layout.decode_manifest(b"{}", "k")
    with pytest.raises(s3layout.ManifestError, match="not a format-1 dmrepl cut"):
        s3layout.decode_manifest(s3layout.encode_image(image(1, ())), "k")
    broken = Manifest("g", 5, 1.0, 1, "i", "y", manifest(3, 1, 1.0).deltas)
    with pytest.raises(s3layout.ManifestError, match="ends at cut 3, not at cut 5"):
        s3layout.decode_manifest(s3layout.encode_manifest(broken), "k")


def test_prune_keeps_what_kept_cuts_need_and_uploads_in_flight() -> None:
    manifests = {
        1: manifest(1, 1, 100.0),
        2: manifest(2, 1, 101.0),
        3: manifest(3, 1, 102.0),
        4: manifest(4, 4, 111.0),
    }
    images = {s3layout.image_key(BASE, 1): image(1, ("a1", "shared")),
              s3layout.image_key(BASE, 4): image(4, ("b4", "shared"))}  # fmt: skip
    listed = {
        *(s3layout.cut_key(BASE, s) for s in manifests),
        *(k for m in manifests.values() for k in m.keys),
        *(c.key for i in images.values() for c in i.chunks),
        BASE + "chunks/orphan",
        s3layout.delta_key(BASE, "g", 5, 4, "none"),  # cut 5: its manifest is not written yet
        "elsewhere/x",
    }
    plan = s3layout.plan_prune(BASE, manifests, images, listed, retention.parse_grid("10s:1"))
    assert plan.kept == {4}
    assert plan.manifests == tuple(s3layout.cut_key(BASE, s) for s in (1, 2, 3))
    assert set(plan.objects) == {
        s3layout.image_key(BASE, 1),
        BASE + "chunks/a1",
        BASE + "chunks/orphan",
        *(s3layout.delta_key(BASE, "g", s, s - 1, "none") for s in (2, 3)),
    }
    everything = s3layout.plan_prune(BASE, manifests, images, listed, ())
    assert everything.kept == {1, 2, 3, 4} and everything.manifests == ()
    assert everything.objects == (BASE + "chunks/orphan",)


def test_prune_keeps_a_synthetic_image_of_the_newest_cut() -> None:
    manifests = {seq: manifest(seq, 1, 100.0 + seq) for seq in (1, 2, 3)}
    images = {
        s3layout.image_key(BASE, 1): image(1, ("a1",)),
        s3layout.image_key(BASE, 3): image(3, ("s3",)),  # no manifest names it yet
    }
    listed = {
        *(s3layout.cut_key(BASE, s) for s in manifests),
        *(k for m in manifests.values() for k in m.keys),
        s3layout.image_key(BASE, 3),
        BASE + "chunks/a1",
        BASE + "chunks/s3",
    }
    plan = s3layout.plan_prune(BASE, manifests, images, listed, retention.parse_grid("1s:1"))
    assert plan.kept == {3}
    assert s3layout.image_key(BASE, 3) not in plan.objects
    assert BASE + "chunks/s3" not in plan.objects
    assert BASE + "chunks/a1" not in plan.objects  # cut 3's own route still needs image 1


SITE = """
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"

[group.db.site.cloud]
transport = "s3"
"""


def test_the_keys_are_read_from_the_configuration() -> None:
    text = SITE + (
        'bucket = "b1"\nprefix = "/x/y/"\nendpoint = "http://127.0.0.1:8080"\nregion = "r"\n'
        'profile = "p"\nkeep = "1h:2"\ncompress = "zstd:5"\nrate = "1MiB"\n'
        'part_size = "8MiB"\nchunk_size = "1MiB"\nfull_every = 0\n'
    )
    spec = parse_config(text, Path("x.toml")).groups["db"].site("cloud")
    assert isinstance(spec, S3SiteSpec)
    assert spec.location.url == "s3://b1/x/y" and spec.base == "x/y/db/"
    assert (spec.location.endpoint, spec.location.region, spec.location.profile) == (
        "http://127.0.0.1:8080", "r", "p",
    )  # fmt: skip
    assert (spec.codec, spec.level, spec.rate_bytes) == ("zstd", 5, 1 << 20)
    assert (spec.part_bytes, spec.chunk_bytes, spec.full_every) == (8 << 20, 1 << 20, 0)
    plain = parse_config(SITE + 'bucket = "b1"\n', Path("x.toml")).groups["db"].site("cloud")
    assert isinstance(plain, S3SiteSpec)
    assert (plain.codec, plain.part_bytes, plain.chunk_bytes) == (
        "none",
        DEFAULT_PART,
        DEFAULT_CHUNK,
    )


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("", "group.db.site.cloud.bucket: missing"),
        ('bucket = "b"\nendpoint = "s3.example"', "group.db.site.cloud.endpoint: 's3.example' is"),
        ('bucket = "b"\npart_size = "1MiB"', "group.db.site.cloud.part_size: must be at least 5"),
        ('bucket = "b"\nchunk_size = "1001"', "group.db.site.cloud.chunk_size: must be a multiple"),
        ('bucket = "b"\ncompress = "lz4"', "group.db.site.cloud.compress: 'lz4' is not"),
        ('bucket = "b"\nkeep = "1h:0"', "group.db.site.cloud.keep: count 0"),
        ('bucket = "b"\nfull_every = -1', "group.db.site.cloud.full_every: -1 is not"),
        ('bucket = "b"\naws_secret_access_key = "x"', "group.db.site.cloud.aws_secret_access_key"),
    ],
)
def test_bad_keys_are_configuration_problems(extra: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(SITE + extra + "\n", Path("x.toml"))
    assert [p for p in caught.value.problems if p.startswith(problem)], caught.value.problems
