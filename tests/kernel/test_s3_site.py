"""An `s3` site on the real kernel, against a real S3 server (Swift with s3api, started in the
guest by tests/s3server.py): ext4 replicated over several cycles and restored on another
device at the newest and an older kept cut; uploads killed mid-multipart and before the
manifest; retention; a corrupt object refused with nothing written."""

from __future__ import annotations

import math
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from dmrepl import phases, retention, s3layout, s3restore
from dmrepl.errors import ExitCode
from dmrepl.s3store import Location, Store
from tests import s3server
from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed
from tests.kernel.test_replicate import MiB, digest
from tests.kernel.test_retention import next_interval

PREFIX = "dr/fleet"


@pytest.fixture
def swift(
    workdir: Path, make_loop: Callable[[str, int], str], cleanup: ExitStack
) -> Iterator[tuple[Store, str]]:
    """A Swift started in the guest (its storage on a loop-mounted ext4: the object server
    needs user xattrs), an empty bucket, and the AWS variables set for it."""
    if s3server.missing_programs():
        pytest.skip(f"Swift is not installed: {', '.join(s3server.missing_programs())}")
    storage = workdir / "swift-storage"
    storage.mkdir()
    device = make_loop("swift-storage", 512 * MiB)
    subprocess.run(["mkfs.ext4", "-q", device], check=True)
    subprocess.run(["mount", device, str(storage)], check=True)
    cleanup.callback(subprocess.run, ["umount", str(storage)], check=False)
    with s3server.SwiftS3(workdir / "swift", storage) as server:
        print(f"swift up at {server.endpoint}")
        saved = {k: os.environ.get(k) for k in server.env()}
        os.environ.update(server.env())
        try:
            bucket = f"kt{uuid.uuid4().hex[:10]}"
            store = Store(Location(bucket, PREFIX, server.endpoint))
            store.call("creating the bucket", "create_bucket")
            yield store, server.endpoint
        finally:
            print(f"swift log:\n{server.log_tail()}")
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture
def captured() -> Iterator[list[str]]:
    """The digest of device sa's cut (its `-pit` image) each time a capture completes."""
    seen: list[str] = []

    def hook(phase: str) -> None:
        if phase == "captured":
            seen.append(digest("/dev/mapper/sa-pit"))

    phases.set_hook(hook)
    yield seen
    phases.set_hook(None)


def _site(bed: Bed, store: Store, endpoint: str, **extra: object) -> s3restore.Remote:
    bed.add_site(
        "cloud", transport="s3", endpoint=endpoint, bucket=store.bucket, prefix=PREFIX, **extra
    )
    return s3restore.Remote(store, bed.group)


def _apply(store: Store, endpoint: str, group: str, target: str, *extra: str) -> tuple[int, str]:
    code, stdout, stderr = run_cli_here(
        "apply", f"s3://{store.bucket}/{PREFIX}", "--group", group, "--to", f"sa={target}",
        "--endpoint", endpoint, *extra,
    )  # fmt: skip
    return code, stdout + stderr


def _needed(remote: s3restore.Remote) -> set[str]:
    """Every object the manifests in the store reference (their chunks through the images)."""
    needed: set[str] = set()
    for seq in remote.cuts():
        manifest = remote.manifest(seq)
        needed |= manifest.keys
        body = remote.store.get(manifest.image_key)
        needed |= {c.key for c in s3layout.decode_image(body, manifest.image_key).chunks}
    return needed


def _fsck(device: str) -> None:
    fsck = subprocess.run(["fsck.ext4", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


@pytest.mark.timeout(1500)
def test_ext4_restores_at_the_newest_and_an_older_kept_cut(
    bed: Bed, workdir: Path, swift: tuple[Store, str], captured: list[str]
) -> None:
    store, endpoint = swift
    bed.add_device("sa", origin_mib=48)
    remote = _site(bed, store, endpoint, part_size="5MiB", chunk_size="1MiB")
    bed.cli("up")
    gate = "/dev/mapper/sa"
    subprocess.run(["mkfs.ext4", "-q", gate], check=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    at_cut: dict[int, str] = {}  # each cut's digest, as captured
    created: dict[int, float] = {}  # each cut's creation time, from its manifest
    deleted: set[str] = set()

    def cycle(number: int) -> None:
        subprocess.run(["mount", gate, str(mnt)], check=True)
        try:
            for i in range(3):
                (mnt / f"c{number}-{i}").write_bytes(os.urandom(300_000 + i))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
        before = set(store.listing(remote.base))
        out = bed.cli("sync", bed.group)
        assert "site cloud: in sync" in out.stdout, out.stdout + out.stderr
        newest = remote.cuts()[-1]
        at_cut[newest] = captured[-1]
        created[newest] = remote.manifest(newest).created
        # The bucket before and after: what the prune deleted, no kept manifest needs, and
        # what the kept manifests need is all there.
        after = set(store.listing(remote.base))
        needed = _needed(remote)
        assert needed <= after, f"cycle {number}: {needed - after}"
        assert not (before - after) & needed, f"cycle {number}"
        deleted.update(before - after)

    cycle(0)  # the full image
    started = time.monotonic()
    cycle(1)
    # A grid interval three cycles long (cycles are slow in the emulated guest): two cycles
    # in one interval and two in the next keep the newest of each and drop the others.
    interval = max(10, math.ceil(3 * (time.monotonic() - started)))
    grid = f"{interval}s:2"
    bed.sites["cloud"]["keep"] = grid
    bed.write()
    for number in (2, 4):
        # From the interval after the last cut's: a pair that straddled a boundary still
        # leaves the newest cut's interval and the one before it with a cut each.
        next_interval(interval, after=created[max(created)])
        cycle(number)
        cycle(number + 1)
    cuts = remote.cuts()
    assert len(cuts) == 2 and cuts[-1] == max(at_cut), (cuts, at_cut, created, grid)
    assert set(cuts) == retention.kept_cuts(created, retention.parse_grid(grid))
    dropped = {s3layout.cut_key(remote.base, seq) for seq in set(at_cut) - set(cuts)}
    assert dropped <= deleted, "every dropped cut's manifest was deleted"
    manifests = {seq: remote.manifest(seq) for seq in cuts}
    target = bed.make_loop("sa-restored", 48 * MiB)
    for cut in (cuts[-1], cuts[0]):
        code, said = _apply(store, endpoint, bed.group, target, "--cut", str(cut))
        assert code == 0, said
        assert digest(target) == at_cut[cut], f"cut {cut}"
        _fsck(target)
    # A corrupt object: refused with its key and offset, and nothing written to the target.
    newest = manifests[cuts[-1]]
    victim = newest.deltas[-1].key if newest.deltas else None
    if victim is None:
        image = s3layout.decode_image(store.get(newest.image_key), newest.image_key)
        victim = image.chunks[0].key
    body = bytearray(store.get(victim))
    body[len(body) // 2] ^= 0x55
    store.put(victim, bytes(body))
    untouched = digest(target)
    code, said = _apply(store, endpoint, bed.group, target)
    assert code == ExitCode.CORRUPT, said
    assert f"s3://{store.bucket}/{victim}" in said and "at byte" in said, said
    assert digest(target) == untouched
    result = bed.cli("verify", bed.group, "--site", "cloud", check=False)
    assert result.returncode != 0 and victim in result.stdout + result.stderr


@pytest.mark.timeout(900)
def test_uploads_killed_mid_multipart_and_mid_manifest_resume(
    bed: Bed, workdir: Path, swift: tuple[Store, str], captured: list[str]
) -> None:
    store, endpoint = swift
    bed.add_device("sa", origin_mib=48)
    remote = _site(bed, store, endpoint, part_size="5MiB")
    bed.cli("up")
    gate = "/dev/mapper/sa"
    target = bed.make_loop("sa-restored", 48 * MiB)
    bed.cli("sync", bed.group)
    at_cut = {remote.cuts()[-1]: captured[-1]}
    for phase in ("s3-part", "s3-manifest"):
        held = remote.cuts()[-1]
        with open(gate, "r+b", buffering=0) as device:  # 16 MiB: a multipart delta
            for step in range(16):
                device.seek((step * 3 * MiB) % (46 * MiB))
                device.write(os.urandom(MiB))
            os.fsync(device.fileno())
        bed.killed_at(phase, "sync", bed.group)
        assert remote.cuts()[-1] == held, f"{phase}: a manifest for a partial cut"
        code, said = _apply(store, endpoint, bed.group, target)
        assert code == 0, said
        assert digest(target) == at_cut[held], f"{phase}: a restore saw a half cut"
        if phase == "s3-part":
            listing = store.call("listing uploads", "list_multipart_uploads", Prefix=remote.base)
            assert listing.get("Uploads"), "the cut-off upload is left to resume"
        out = bed.cli("sync", bed.group)
        assert "site cloud: in sync" in out.stdout, out.stdout + out.stderr
        at_cut[remote.cuts()[-1]] = captured[-1]
    newest = remote.cuts()[-1]
    code, said = _apply(store, endpoint, bed.group, target)
    assert code == 0, said
    assert digest(target) == at_cut[newest]
    listing = store.call("listing uploads", "list_multipart_uploads", Prefix=remote.base)
    assert not listing.get("Uploads"), "every upload was resumed and completed"
    status = bed.cli("status").stdout
    assert f"site {bed.group}/cloud (s3, asynchronous): in sync; holds cut {newest}" in status
