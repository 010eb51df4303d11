"""Faults a real S3 server does not make on demand, injected into requests to moto's
in-process S3: a 500 in the middle of a multipart upload (retried, the upload completes),
throttling that outlasts the retries (the site is down, no manifest, and the next upload
resumes by part), and a server without conditional creates."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from botocore.awsrequest import AWSResponse

from dmrepl import s3layout
from dmrepl.s3store import Location, Store
from dmrepl.sites.base import SiteDown
from dmrepl.sites.s3 import S3Site, S3SiteSpec
from tests.unit.test_s3_site import MiB, Primary, remote_of, restore, site_of

moto = pytest.importorskip("moto")


@pytest.fixture
def spec(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3SiteSpec]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with moto.mock_aws():
        location = Location("faults", "p")
        Store(location).call("creating the bucket", "create_bucket")
        yield S3SiteSpec(
            "g", "cloud", "s3", "asynchronous", location, part_bytes=5 * MiB, chunk_bytes=8 * MiB
        )


class _Raw:
    def __init__(self, body: bytes):
        self.body = body

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self.body


def inject(
    store: Store, operation: str, status: int, code: str, times: int, match: str = ""
) -> list[str]:
    """Answer the first `times` requests of `operation` whose URL holds `match` with an
    error; returns the URLs of the requests answered so."""
    failed: list[str] = []

    def before_send(request: Any, **_: Any) -> AWSResponse | None:
        if match not in request.url or len(failed) >= times:
            return None
        failed.append(request.url)
        body = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
        return AWSResponse(request.url, status, {}, _Raw(body))

    store.client.meta.events.register(f"before-send.s3.{operation}", before_send)
    return failed


def with_store(site: S3Site, store: Store) -> S3Site:
    site._store = store  # the site's requests go through the store the faults are in
    return site


def test_a_500_mid_multipart_is_retried_and_the_cut_completes(
    spec: S3SiteSpec, tmp_path: Path
) -> None:
    primary = Primary(11)
    site = site_of(spec, tmp_path)
    site.receive(io.BytesIO(primary.full()))
    store = Store(spec.location)
    failed = inject(store, "UploadPart", 500, "InternalError", 1, "partNumber=2")
    big = primary.delta(primary.write(12, MiB), 5.0)
    done = with_store(site_of(spec, tmp_path), store).receive(io.BytesIO(big))
    assert done.seq == 2 and len(failed) == 1  # the second part failed once, then went
    assert restore(spec, tmp_path) == primary.at[2]


def test_throttling_past_the_retries_is_a_down_site_and_the_next_upload_resumes(
    spec: S3SiteSpec, tmp_path: Path
) -> None:
    primary = Primary(12)
    site_of(spec, tmp_path).receive(io.BytesIO(primary.full()))
    store = Store(spec.location, retries=2)
    failed = inject(store, "UploadPart", 503, "SlowDown", 100, "partNumber=2")
    big = primary.delta(primary.write(16, MiB), 6.0)
    with pytest.raises(SiteDown, match="SlowDown"):
        with_store(site_of(spec, tmp_path), store).receive(io.BytesIO(big))
    assert len(failed) == 3  # tried, retried twice, then the site is down
    assert remote_of(spec).cuts() == [1]  # no manifest: the cut does not exist at the site
    done = site_of(spec, tmp_path).receive(io.BytesIO(big))
    # Part 1 is kept, and so is every part the store took: those in flight beside part 2, and
    # part 2 itself (moto handles a request before the injected reply stands in for its own:
    # a reply lost on the way).
    assert done.transfer is not None and done.transfer.resumed_from >= 5 * MiB
    assert done.transfer.wire_bytes == len(big) - done.transfer.resumed_from
    assert restore(spec, tmp_path) == primary.at[2]


def test_a_store_without_conditional_creates_falls_back_and_never_overwrites(
    spec: S3SiteSpec, tmp_path: Path
) -> None:
    store = Store(spec.location)
    inject(store, "PutObject", 501, "NotImplemented", 1)
    key = s3layout.cut_key(spec.base, 1)
    store.create(key, b"one")  # (moto takes the object before the injected reply replaces it)
    assert store.conditional is False and store.get(key) == b"one"
    assert store.create(key, b"one") is False  # the same manifest again: a retry, fine
    with pytest.raises(Exception, match="exists with other contents"):
        store.create(key, b"two")
    assert store.get(key) == b"one"


def test_a_manifest_is_never_replaced_by_another_writer(spec: S3SiteSpec, tmp_path: Path) -> None:
    primary = Primary(13)
    site_of(spec, tmp_path).receive(io.BytesIO(primary.full()))
    other = Primary(14)
    other.write(1, 4096)
    with pytest.raises(Exception, match="another writer"):
        site_of(replace(spec), tmp_path).receive(io.BytesIO(other.full()))
    assert restore(spec, tmp_path) == primary.at[1]
