"""`s3` sites against a real S3 server (Swift with s3api, tests/s3server.py): deltas and
full images uploaded, manifests written last, restores of the newest and an older cut,
a corrupt object refused with its key and offset, uploads cut off mid-multipart and before
the manifest, and retention deleting only what no kept manifest needs."""

from __future__ import annotations

import io
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from dmrepl import delta, phases, retention, s3layout, s3restore
from dmrepl.s3store import Location, Store
from dmrepl.sites.base import SiteContext, SiteDown
from dmrepl.sites.s3 import S3Site, S3SiteSpec
from dmrepl.statedir import StateDir
from tests import s3server
from tests.clirun import run_cli_here

MiB = 1 << 20
SECTORS = 24 * MiB // 512  # three 8 MiB chunks (the last partly zero) per device
DEVICES = ("a", "b")

pytestmark = pytest.mark.skipif(
    bool(s3server.missing_programs()), reason="Swift is not installed (bin/setup)"
)


@pytest.fixture(scope="module")
def swift() -> Iterator[s3server.SwiftS3]:
    with s3server.SwiftS3() as server:
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            yield server
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def spec(swift: s3server.SwiftS3) -> S3SiteSpec:
    bucket = f"t{uuid.uuid4().hex[:12]}"
    location = Location(bucket, "dr/fleet", swift.endpoint)
    Store(location).call("creating the bucket", "create_bucket")
    return S3SiteSpec(
        "g", "cloud", "s3", "asynchronous", location,
        part_bytes=5 * MiB, chunk_bytes=8 * MiB,
    )  # fmt: skip


class Primary:
    """Devices in memory and the deltas a primary would ship of them."""

    def __init__(self, seed: int = 1):
        self.images = [bytearray(SECTORS * 512) for _ in DEVICES]
        self.random = random.Random(seed)
        self.at: dict[int, list[bytes]] = {}
        self.seq = 0

    def write(self, count: int, size: int) -> list[tuple[int, int, bytes]]:
        writes = []
        for _ in range(count):
            device = self.random.randrange(len(DEVICES))
            offset = self.random.randrange(SECTORS * 512 // size) * size  # overlaps are whole
            data = self.random.randbytes(size)
            self.images[device][offset : offset + size] = data
            writes.append((device, offset // 512, data))
        return writes

    def header(self, base: int | None, created: float) -> delta.DeltaHeader:
        base_era = None if base is None else 10 * base + 1
        devices = tuple(delta.DeltaDevice(n, SECTORS, base_era, 10 * self.seq) for n in DEVICES)
        return delta.DeltaHeader("g", self.seq, base, devices, created)

    def full(self, created: float = 1000.0) -> bytes:
        self.seq += 1
        out = io.BytesIO()
        writer = delta.DeltaWriter(out, self.header(None, created))
        for device, image in enumerate(self.images):
            for start in range(0, len(image), MiB):
                piece = image[start : start + MiB]
                if any(piece):
                    writer.add(device, start // 512, piece)
        writer.finish()
        self.at[self.seq] = [bytes(i) for i in self.images]
        return out.getvalue()

    def delta(self, writes: list[tuple[int, int, bytes]], created: float) -> bytes:
        self.seq += 1
        out = io.BytesIO()
        writer = delta.DeltaWriter(out, self.header(self.seq - 1, created))
        for device, offset, data in sorted(writes, key=lambda w: (w[0], w[1])):
            writer.add(device, offset, data)
        writer.finish()
        self.at[self.seq] = [bytes(i) for i in self.images]
        return out.getvalue()


def site_of(spec: S3SiteSpec, tmp_path: Path, said: list[str] | None = None) -> S3Site:
    say = (lambda _line: None) if said is None else said.append
    return S3Site(spec, SiteContext({n: SECTORS for n in DEVICES}, StateDir(tmp_path), say))


def remote_of(spec: S3SiteSpec) -> s3restore.Remote:
    return s3restore.Remote(Store(spec.location), "g")


def restore(spec: S3SiteSpec, tmp_path: Path, cut: int | None = None) -> list[bytes]:
    targets = {}
    for name in DEVICES:
        target = tmp_path / f"{name}.img"
        target.write_bytes(b"\xee" * SECTORS * 512)
        targets[name] = str(target)
    result = s3restore.apply_s3(remote_of(spec), targets, to_cut=cut, say=lambda _: None)
    assert cut is None or result.cut == cut
    return [Path(targets[name]).read_bytes() for name in DEVICES]


def keys(spec: S3SiteSpec) -> set[str]:
    return set(Store(spec.location).listing(spec.base))


def test_cuts_upload_and_restore_byte_for_byte(spec: S3SiteSpec, tmp_path: Path) -> None:
    primary = Primary()
    primary.write(6, 64 * 1024)
    site = site_of(spec, tmp_path)
    site.check()
    assert site.held() is None
    first = site.receive(io.BytesIO(primary.full()))
    assert (first.seq, first.base_seq) == (1, None)
    for cycle in range(3):
        writes = primary.write(4, 128 * 1024) if cycle != 1 else []  # cut 3: no writes
        site.receive(io.BytesIO(primary.delta(writes, 1000.0 + cycle)))
    assert site.held() == 4
    assert restore(spec, tmp_path) == primary.at[4]
    assert restore(spec, tmp_path, cut=1) == primary.at[1]
    listed = keys(spec)
    chunks = [k for k in listed if "/chunks/" in k]
    # Six writes of 64 KiB touch at most six of the six 8 MiB chunks; zero chunks are absent.
    assert 1 <= len(chunks) <= 6
    assert {s3layout.cut_key(spec.base, n) for n in (1, 2, 3, 4)} <= listed


def test_a_delta_above_the_part_size_is_multipart_and_restores(
    spec: S3SiteSpec, tmp_path: Path
) -> None:
    primary = Primary(2)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    big = primary.delta(primary.write(12, MiB), 2000.0)  # 12 MiB: three parts of 5 MiB
    done = site.receive(io.BytesIO(big))
    assert done.transfer is not None and done.transfer.wire_bytes == len(big)
    key = s3layout.delta_key(spec.base, "g", 2, 1, "none")
    assert Store(spec.location).get(key) == big  # stored unchanged
    assert restore(spec, tmp_path) == primary.at[2]


def test_zstd_objects_restore(spec: S3SiteSpec, tmp_path: Path) -> None:
    spec = replace(spec, codec="zstd")
    primary = Primary(3)
    primary.images[0][: 3 * MiB] = b"z" * 3 * MiB  # compressible
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    primary.images[1][5 * MiB : 12 * MiB] = b"q" * 7 * MiB
    done = site.receive(io.BytesIO(primary.delta([(1, 5 * MiB // 512, b"q" * 7 * MiB)], 1.0)))
    assert done.transfer is not None and done.transfer.wire_bytes < MiB
    assert restore(spec, tmp_path) == primary.at[2]


class Killed(BaseException):
    """Stands in for the process dying at a phase."""


def _die_at(target: str, after: int = 1) -> None:
    seen = [0]

    def hook(phase: str) -> None:
        if phase == target:
            seen[0] += 1
            if seen[0] == after:
                raise Killed(phase)

    phases.set_hook(hook)


@pytest.fixture
def hooks() -> Iterator[None]:
    yield
    phases.set_hook(None)


def test_an_upload_cut_off_mid_multipart_resumes_by_part(
    spec: S3SiteSpec, tmp_path: Path, hooks: None
) -> None:
    primary = Primary(4)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    big = primary.delta(primary.write(16, MiB), 10.0)
    _die_at("s3-part", after=2)  # two parts are at the store
    with pytest.raises(Killed):
        site.receive(io.BytesIO(big))
    phases.set_hook(None)
    again = site_of(spec, tmp_path)
    assert again.held() == 1  # no manifest for the cut off cut
    assert restore(spec, tmp_path) == primary.at[1]  # a restore never sees a half cut
    done = again.receive(io.BytesIO(big))
    assert done.transfer is not None
    # Two 5 MiB parts were sent (more, if others were in flight when it was cut off), and
    # none of them is sent again.
    assert done.transfer.resumed_from >= 10 * MiB
    assert done.transfer.wire_bytes == len(big) - done.transfer.resumed_from
    assert restore(spec, tmp_path) == primary.at[2]


def test_an_upload_cut_off_before_its_manifest_is_no_cut(
    spec: S3SiteSpec, tmp_path: Path, hooks: None
) -> None:
    primary = Primary(5)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    second = primary.delta(primary.write(2, 4096), 11.0)
    _die_at("s3-manifest")
    with pytest.raises(Killed):
        site.receive(io.BytesIO(second))
    phases.set_hook(None)
    assert site_of(spec, tmp_path).held() == 1
    assert s3layout.cut_key(spec.base, 2) not in keys(spec)
    with pytest.raises(Exception, match="holds no manifest of cut 2"):
        restore(spec, tmp_path, cut=2)
    site_of(spec, tmp_path).receive(io.BytesIO(second))  # the next cycle sends it again
    assert restore(spec, tmp_path, cut=2) == primary.at[2]


def test_a_corrupt_object_is_refused_with_its_key_and_offset(
    spec: S3SiteSpec, tmp_path: Path
) -> None:
    primary = Primary(6)
    primary.write(4, MiB)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    site.receive(io.BytesIO(primary.delta(primary.write(3, 8192), 12.0)))
    store = Store(spec.location)
    key = s3layout.delta_key(spec.base, "g", 2, 1, "none")
    body = bytearray(store.get(key))
    body[len(body) // 2] ^= 0xFF
    store.put(key, bytes(body))
    targets = {}
    for name in DEVICES:
        target = tmp_path / f"{name}.img"
        target.write_bytes(b"\xee" * SECTORS * 512)
        targets[name] = str(target)
    with pytest.raises(delta.CorruptDelta) as caught:
        s3restore.apply_s3(remote_of(spec), targets, say=lambda _: None)
    assert f"s3://{spec.location.bucket}/{key}" in caught.value.message
    assert 0 < caught.value.offset <= len(body) // 2
    for target in targets.values():  # nothing written
        assert Path(target).read_bytes() == b"\xee" * SECTORS * 512
    # A chunk of the image: the MiB it is damaged in.
    chunk = next(k for k in keys(spec) if "/chunks/" in k)
    data = bytearray(store.get(chunk))
    data[3 * MiB + 5] ^= 1
    store.put(chunk, bytes(data))
    with pytest.raises(delta.CorruptDelta) as caught:
        s3restore.apply_s3(remote_of(spec), targets, to_cut=1, say=lambda _: None)
    assert chunk in caught.value.message and caught.value.offset == 3 * MiB
    _, _, problems = s3restore.verify_store(remote_of(spec))
    assert len(problems) == 2, problems
    assert chunk in problems[0] and "at byte 3145728" in problems[0] and "(cuts 1-2)" in problems[0]
    assert key in problems[1] and problems[1].endswith("(cuts 2)")


def test_retention_deletes_only_what_no_kept_manifest_needs(
    spec: S3SiteSpec, tmp_path: Path
) -> None:
    said: list[str] = []
    primary = Primary(7)
    primary.write(3, 8192)
    site = site_of(spec, tmp_path)  # no keep grid yet: every cut stays
    site.receive(io.BytesIO(primary.full(100.0)))
    for created in (101.0, 102.0, 111.0):  # cuts 2, 3 in one 10 s interval, 4 in the next
        site.receive(io.BytesIO(primary.delta(primary.write(2, 8192), created)))
    before = keys(spec)
    primary.write(1, 8192)
    kept_site = site_of(replace(spec, keep=retention.parse_grid("10s:2")), tmp_path, said)
    kept_site.receive(io.BytesIO(primary.full(112.0)))  # cut 5: a new full image
    after = keys(spec)
    # Kept: 5 (the newest) and 3 (the newest of the interval before): 1, 2 and 4 dropped.
    cuts = sorted(c for k in after if (c := s3layout.cut_of(spec.base, k)) is not None)
    assert cuts == [3, 5], said
    remote = remote_of(spec)
    three, five = remote.manifest(3), remote.manifest(5)
    needed = three.keys | five.keys
    for manifest in (three, five):
        image = s3layout.decode_image(Store(spec.location).get(manifest.image_key), "image")
        needed |= {chunk.key for chunk in image.chunks}
    assert needed <= after  # cut 3's image and deltas 2 and 3 stay: cut 3 needs them
    dropped = before - after
    assert dropped == {
        s3layout.cut_key(spec.base, 1),
        s3layout.cut_key(spec.base, 2),
        s3layout.cut_key(spec.base, 4),
        s3layout.delta_key(spec.base, "g", 4, 3, "none"),  # only cut 4 needed it
    }
    assert restore(spec, tmp_path, cut=3) == primary.at[3]
    assert restore(spec, tmp_path, cut=5) == primary.at[5]
    assert said == [
        "site cloud: dropped cuts 1, 2, 4 (not kept); deleted 1 object no kept cut needs"
    ]


def test_an_unreachable_store_is_a_down_site(tmp_path: Path) -> None:
    location = Location("nothere", "", "http://127.0.0.1:9")
    spec = S3SiteSpec("g", "cloud", "s3", "asynchronous", location)
    site = site_of(spec, tmp_path)
    with pytest.raises(SiteDown, match="site cloud"):
        site.check()


def test_apply_and_pull_from_the_command_line(spec: S3SiteSpec, tmp_path: Path) -> None:
    primary = Primary(8)
    primary.write(3, 65536)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    site.receive(io.BytesIO(primary.delta(primary.write(2, 8192), 2.0)))
    url = f"s3://{spec.location.bucket}/{spec.location.prefix}"
    store = ["--endpoint", str(spec.location.endpoint)]
    targets = []
    for name in DEVICES:
        target = tmp_path / f"{name}.img"
        target.write_bytes(bytes(SECTORS * 512))
        targets += ["--to", f"{name}={target}"]
    code, stdout, stderr = run_cli_here(
        "apply", url, "--group", "g", *targets, "--cut", "1", *store
    )
    assert code == 0, stderr
    assert "targets hold cut 1 of g" in stdout
    assert [(tmp_path / f"{n}.img").read_bytes() for n in DEVICES] == primary.at[1]
    code, _, stderr = run_cli_here("apply", url, "--group", "g", *targets, "--cut", "7", *store)
    assert code != 0 and "holds no manifest of cut 7" in stderr and "1-2" in stderr
    cursor = tmp_path / "cursor.json"
    pulling = ("pull", url, "--group", "g", *targets, "--cursor", str(cursor), *store)
    code, stdout, stderr = run_cli_here(*pulling)
    assert code == 0, stderr
    assert "targets hold cut 2 of g (were at no cut" in stdout
    site.receive(io.BytesIO(primary.delta(primary.write(2, 8192), 3.0)))
    code, stdout, stderr = run_cli_here(*pulling)
    assert code == 0, stderr
    assert "targets hold cut 3 of g (were at cut 2; 1 deltas" in stdout  # rolled forward
    assert [(tmp_path / f"{n}.img").read_bytes() for n in DEVICES] == primary.at[3]
    code, stdout, _ = run_cli_here(*pulling)
    assert code == 0 and "the store's newest" in stdout


def test_a_synthetic_full_image_starts_the_next_routes(spec: S3SiteSpec, tmp_path: Path) -> None:
    spec = replace(spec, full_every=2, keep=retention.parse_grid("1s:1000"))  # prunes, keeps all
    said: list[str] = []
    primary = Primary(9)
    primary.write(6, MiB)
    site = site_of(spec, tmp_path, said)
    site.receive(io.BytesIO(primary.full()))
    for created in (2.0, 3.0, 4.0):
        site.receive(io.BytesIO(primary.delta(primary.write(1, 65536), created)))
    remote = remote_of(spec)
    assert [len(remote.manifest(c).deltas) for c in (1, 2, 3, 4)] == [0, 1, 2, 1]
    assert remote.manifest(4).image == 3  # cut 4's route starts at the image of cut 3
    assert s3layout.image_key(spec.base, 3) in keys(spec)
    assert any("wrote a full image of cut 3" in line for line in said), said
    image = s3layout.decode_image(Store(spec.location).get(s3layout.image_key(spec.base, 3)), "i")
    sent = next(line for line in said if "wrote a full image" in line)
    assert "bytes already in the store" in sent and f"{len(image.chunks)} chunks" in sent
    for cut in (4, 3, 2):
        assert restore(spec, tmp_path, cut=cut) == primary.at[cut], cut


def test_the_rate_cap_holds_uploads_to_it(spec: S3SiteSpec, tmp_path: Path) -> None:
    spec = replace(spec, rate_bytes=8 * MiB)
    primary = Primary(10)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    big = primary.delta(primary.write(12, MiB), 2.0)
    started = time.monotonic()
    site.receive(io.BytesIO(big))
    burst = 8 * MiB / 4  # what the token bucket lets through at once
    assert time.monotonic() - started >= (len(big) - burst) / (8 * MiB)
    assert restore(spec, tmp_path) == primary.at[2]


def test_cuts_lists_the_manifests(spec: S3SiteSpec, tmp_path: Path) -> None:
    primary = Primary(15)
    primary.write(2, 65536)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    site.receive(io.BytesIO(primary.delta(primary.write(1, 8192), 2.0)))
    config = tmp_path / "dmrepl.toml"
    config.write_text(
        f'[dmrepl]\nstate_dir = "{tmp_path / "state"}"\n'
        '[group.g.device.a]\norigin = "/dev/vdb"\nmetadata = "/dev/vdc"\n'
        '[group.g.device.b]\norigin = "/dev/vdd"\nmetadata = "/dev/vde"\n'
        f'[group.g.site.cloud]\ntransport = "s3"\nbucket = "{spec.location.bucket}"\n'
        f'prefix = "{spec.location.prefix}"\nendpoint = "{spec.location.endpoint}"\n'
    )
    code, stdout, stderr = run_cli_here(
        "cuts", "g", "--site", "cloud", "--json", "--config", str(config)
    )
    assert code == 0, stderr
    listed = json.loads(stdout)
    assert listed["held"] == 2 and listed["transport"] == "s3"
    assert [(c["seq"], c["full"]) for c in listed["cuts"]] == [(1, True), (2, False)]
    assert listed["cuts"][1]["files"] == ["0000000001.json", "g.0000000002.0000000001.delta"]
