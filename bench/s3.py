"""Benchmark: `s3` sites against a real S3 server (Swift with s3api, tests/s3server.py, on this
host's loopback), next to boto3's transfer manager and to plain object reads.

    .venv/bin/python -m bench.s3 [--mib N] [--part MIB] [--json PATH]

One group of two devices of N MiB each (default 256). Measured in one run, side by side:

1. Upload, a full image: every chunk of both devices random (incompressible); `S3Site.receive`
   from the delta in memory (verifies the stream, cuts 4 MiB chunks, hashes, uploads each,
   writes the image index and the manifest) against boto3's `upload_fileobj` (its transfer
   manager, multipart at the same part size, 10 threads) of the same delta bytes.
2. Upload, an incremental delta of the same size: `receive` (verifies while it uploads, one
   part at a time) against `upload_fileobj` of the same bytes.
3. Restore: `apply s3://` (s3restore.apply_s3) of the newest cut onto two image files (fetch and
   check every object into a staging directory, then dmrepl.rebuild verifies and writes)
   against reading the same objects alone (GET, bytes discarded).

Each figure is MiB of delta (uploads) or of the route's objects (restore: the full image's
chunks and the incremental delta, both covering every byte) per second of wall time; the server
and the client share this host's CPUs, so the figures are relative, not the store's.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3.s3.transfer

from dmrepl import delta, s3restore
from dmrepl.s3store import Location, Store
from dmrepl.sites.base import SiteContext
from dmrepl.sites.s3 import S3Site, S3SiteSpec
from dmrepl.statedir import StateDir
from tests import s3server

MiB = 1 << 20
DEVICES = ("a", "b")


def _delta(sectors: int, seq: int, base: int | None, seed: int) -> bytes:
    """A delta writing every MiB of both devices with random bytes."""
    rng = random.Random(seed)
    base_era = None if base is None else 10 * base + 1
    header = delta.DeltaHeader(
        "g", seq, base,
        tuple(delta.DeltaDevice(n, sectors, base_era, 10 * seq) for n in DEVICES), time.time(),
    )  # fmt: skip
    out = io.BytesIO()
    writer = delta.DeltaWriter(out, header)
    for device in range(len(DEVICES)):
        for start in range(0, sectors * 512, MiB):
            writer.add(device, start // 512, rng.randbytes(MiB))
    writer.finish()
    return out.getvalue()


def _timed(run: Callable[[], object]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _rate(size: int, seconds: float) -> float:
    return round(size / MiB / seconds, 1)


def measure(mib: int, part_mib: int) -> dict[str, Any]:
    sectors = mib * MiB // 512
    results: dict[str, Any] = {"device_mib": mib, "devices": len(DEVICES), "part_mib": part_mib}
    with s3server.SwiftS3() as server:
        os.environ.update(server.env())
        location = Location(f"bench{uuid.uuid4().hex[:8]}", "p", server.endpoint)
        store = Store(location)
        store.call("creating the bucket", "create_bucket")
        spec = S3SiteSpec("g", "cloud", "s3", "asynchronous", location, part_bytes=part_mib * MiB)
        with tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
            context = SiteContext({n: sectors for n in DEVICES}, StateDir(Path(scratch)))
            transfer = boto3.s3.transfer.TransferConfig(
                multipart_threshold=part_mib * MiB, multipart_chunksize=part_mib * MiB,
                max_concurrency=10,
            )  # fmt: skip
            for kind, body in (
                ("full image", _delta(sectors, 1, None, 1)),
                ("incremental delta", _delta(sectors, 2, 1, 2)),
            ):
                site = S3Site(spec, context)
                ours = _timed(lambda body=body, site=site: site.receive(io.BytesIO(body)))
                theirs = _timed(
                    lambda body=body, kind=kind: store.client.upload_fileobj(
                        io.BytesIO(body), location.bucket, f"reference/{kind}", Config=transfer
                    )
                )
                results[f"upload {kind}"] = {
                    "bytes": len(body),
                    "dmrepl MiB/s": _rate(len(body), ours),
                    "boto3 transfer manager MiB/s": _rate(len(body), theirs),
                }
            remote = s3restore.Remote(store, "g")
            targets = {}
            for name in DEVICES:
                target = Path(scratch) / f"{name}.img"
                target.write_bytes(b"")
                os.truncate(target, sectors * 512)
                targets[name] = str(target)
            restored = _timed(
                lambda: s3restore.apply_s3(
                    remote, targets, staging=Path(scratch), say=lambda _line: None
                )
            )
            keys = [k for k in store.listing(remote.base) if "/cuts/" not in k]
            size = sum(store.listing(remote.base)[k] for k in keys)

            def read_all() -> None:
                for key in keys:
                    for _ in store.stream(key):
                        pass

            reading = _timed(read_all)
            results["restore"] = {
                "objects": len(keys),
                "bytes": size,
                "apply s3:// MiB/s": _rate(size, restored),  # of the same objects
                "GET alone MiB/s": _rate(size, reading),
            }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="size of each of the two devices")
    parser.add_argument("--part", type=int, default=16, help="part size in MiB")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = measure(args.mib, args.part)
    text = json.dumps(results, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
