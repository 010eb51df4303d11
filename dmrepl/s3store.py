"""The object store behind `s3` sites and `dmrepl apply s3://`: boto3, configured for
S3-compatible servers as well as AWS, and an upload that resumes part by part.

Credentials and region come only from the standard AWS configuration (environment, shared
files, a named profile): boto3 finds them. Requests use path-style addressing (most
non-AWS servers have no per-bucket host names) and send or check checksums only where the
operation requires them (many servers reject the newer flexible checksums).

`ObjectUpload` is a file-like sink: bytes written to it go to one object, in parts of
`part_bytes` (compressed per part with zstd if asked, a frame each, so the parts of a
resumed upload are the same bytes). Above one part it is a multipart upload, left in
place if the upload is cut off; the next upload of the same key finds it, keeps every part
whose ETag (MD5) matches what it would send again, and sends the rest.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.exceptions
import zstandard
from botocore.config import Config

from dmrepl import phases, wire
from dmrepl.errors import DmreplError, ExitCode

MIN_PART_BYTES = 5 << 20  # S3's smallest part (but the last)
MAX_PARTS = 10000
_MISCONFIGURED = frozenset(
    {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
     "InvalidBucketName", "AllAccessDisabled", "AuthorizationHeaderMalformed"}
)  # fmt: skip


class StoreError(DmreplError):
    """A request to the object store failed; `transient`: the next try may succeed."""

    exit_code = ExitCode.FAILURE

    def __init__(self, message: str, *, transient: bool, code: str = "", hint: str | None = None):
        super().__init__(message, hint=hint)
        self.transient = transient
        self.code = code


class PreconditionFailed(StoreError):
    """A conditional create found the key already there."""


@dataclass(frozen=True)
class Location:
    """Where a store is: `s3://bucket/prefix` and how to reach it."""

    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    profile: str | None = None

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix.strip('/')}".rstrip("/")


def parse_url(text: str) -> tuple[str, str]:
    """(bucket, prefix) of `s3://bucket[/prefix]`; ValueError if it is not one."""
    if not text.startswith("s3://"):
        raise ValueError(f"{text!r} is not an s3://BUCKET/PREFIX address")
    bucket, _, prefix = text[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"{text!r} names no bucket")
    return bucket, prefix.strip("/")


def _reason(exc: Exception) -> tuple[str, str, bool]:
    """(code, text, transient) of a boto3 failure."""
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        text = f"{code or status}: {error.get('Message') or 'no message'}"
        transient = code not in _MISCONFIGURED and (status >= 500 or status in (0, 408, 429))
        return code or str(status), text, transient
    if isinstance(
        exc, botocore.exceptions.NoCredentialsError | botocore.exceptions.ProfileNotFound
    ):
        return "NoCredentials", str(exc), False
    return type(exc).__name__, str(exc), True


def _content_md5(request: Any, **_: Any) -> None:
    body = request.body if isinstance(request.body, bytes) else bytes(request.body or b"")
    digest = hashlib.md5(body, usedforsecurity=False).digest()
    request.headers["Content-MD5"] = base64.b64encode(digest).decode()


class Store:
    """One bucket through boto3; every failure becomes a StoreError naming the request."""

    def __init__(self, location: Location, *, retries: int = 5):
        self.location = location
        self.bucket = location.bucket
        config = Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": retries, "mode": "standard"},  # after the first try
            connect_timeout=10,
            read_timeout=120,
        )
        try:
            session = boto3.session.Session(
                profile_name=location.profile, region_name=location.region
            )
            self.client: Any = session.client("s3", endpoint_url=location.endpoint, config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise StoreError(
                f"{location.url}: cannot set up the S3 client: {exc}", transient=False,
                hint="check endpoint, region and profile (credentials come from the AWS "
                "environment, ~/.aws or the profile)",
            ) from None  # fmt: skip
        # Servers older than S3's flexible checksums (Swift, older RGW and MinIO) want the
        # Content-MD5 that boto3 no longer sends where S3 requires a checksum.
        self.client.meta.events.register("before-sign.s3.DeleteObjects", _content_md5)
        self.conditional: bool | None = None  # learned: does a conditional create work here?

    def call(self, what: str, operation: str, **arguments: Any) -> Any:
        """`client.<operation>(Bucket=..., **arguments)`, failures as StoreError."""
        try:
            return getattr(self.client, operation)(Bucket=self.bucket, **arguments)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            code, text, transient = _reason(exc)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise PreconditionFailed(f"{what}: {text}", transient=False, code=code) from None
            raise StoreError(
                f"{self.location.url}: {what} failed: {text}", transient=transient, code=code
            ) from None

    def check(self) -> None:
        """The bucket exists and these credentials reach it."""
        self.call(f"checking bucket {self.bucket}", "head_bucket")

    def listing(self, prefix: str) -> dict[str, int]:
        """Every key under `prefix` with its size."""
        found: dict[str, int] = {}
        token: str | None = None
        while True:
            extra = {"ContinuationToken": token} if token else {}
            page = self.call(f"listing {prefix}", "list_objects_v2", Prefix=prefix, **extra)
            for item in page.get("Contents", ()):
                found[item["Key"]] = int(item["Size"])
            if not page.get("IsTruncated"):
                return found
            token = page["NextContinuationToken"]

    def exists(self, key: str) -> bool:
        try:
            self.call(f"looking for {key}", "head_object", Key=key)
        except StoreError as exc:
            if exc.code in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def get(self, key: str) -> bytes:
        body = self.call(f"reading {key}", "get_object", Key=key)["Body"]
        try:
            return bytes(body.read())
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreError(f"reading {key} failed: {exc}", transient=True) from None

    def stream(self, key: str, piece: int = 1 << 20) -> Iterator[bytes]:
        """The object's bytes, in pieces, as they arrive."""
        body = self.call(f"reading {key}", "get_object", Key=key)["Body"]
        try:
            yield from body.iter_chunks(piece)
        except (botocore.exceptions.BotoCoreError, OSError) as exc:
            raise StoreError(f"reading {key} failed: {exc}", transient=True) from None
        finally:
            body.close()

    def put(self, key: str, data: bytes) -> None:
        self.call(f"writing {key}", "put_object", Key=key, Body=data)

    def create(self, key: str, data: bytes) -> bool:
        """Write `key` only if it is not there: True if written, False if it holds exactly
        `data` already; PreconditionFailed if it holds something else.

        With If-None-Match where the store supports it; where it answers NotImplemented
        (Swift's s3api), a look first, and one writer per group is the caller's lock."""
        if self.conditional is not False:
            try:
                self.call(f"creating {key}", "put_object", Key=key, Body=data, IfNoneMatch="*")
                self.conditional = True
                return True
            except PreconditionFailed:
                return self._same(key, data)
            except StoreError as exc:
                if exc.code not in ("NotImplemented", "501"):
                    raise
                self.conditional = False
        if self.exists(key):
            return self._same(key, data)
        self.put(key, data)
        return True

    def _same(self, key: str, data: bytes) -> bool:
        if self.get(key) == data:
            return False
        raise PreconditionFailed(
            f"{key} exists with other contents: another writer shares this prefix",
            transient=False,
            hint="give each primary of a group its own prefix; nothing was overwritten",
        )

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            done = self.call(
                f"deleting {len(batch)} objects", "delete_objects", Delete={"Objects": batch}
            )
            errors = done.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(
                    f"deleting {first.get('Key')} failed: {first.get('Code')} "
                    f"{first.get('Message', '')}",
                    transient=True,
                )

    def abort_uploads(self, key: str, keep: str | None = None) -> None:
        """Abort every unfinished multipart upload of `key` (but `keep`)."""
        for upload in self._uploads(key):
            if upload != keep:
                self.call(
                    f"aborting an upload of {key}", "abort_multipart_upload",
                    Key=key, UploadId=upload,
                )  # fmt: skip

    def _uploads(self, key: str) -> list[str]:
        page = self.call(f"listing uploads of {key}", "list_multipart_uploads", Prefix=key)
        uploads = [u for u in page.get("Uploads", ()) if u["Key"] == key]
        uploads.sort(key=lambda u: u.get("Initiated") or 0)
        return [str(u["UploadId"]) for u in uploads]

    def resumable(self, key: str) -> tuple[str, dict[int, tuple[str, int]]] | None:
        """The newest unfinished upload of `key` and its parts (number -> ETag, size)."""
        uploads = self._uploads(key)
        if not uploads:
            return None
        upload = uploads[-1]
        parts: dict[int, tuple[str, int]] = {}
        marker = 0
        while True:
            page = self.call(
                f"listing parts of {key}", "list_parts",
                Key=key, UploadId=upload, PartNumberMarker=marker,
            )  # fmt: skip
            for part in page.get("Parts", ()):
                parts[int(part["PartNumber"])] = (str(part["ETag"]).strip('"'), int(part["Size"]))
            if not page.get("IsTruncated"):
                return upload, parts
            marker = int(page["NextPartNumberMarker"])


class Parallel:
    """Requests run on up to `width` threads (boto3's clients are thread-safe), the caller
    waiting for the oldest when that many are in flight; the first failure is raised in the
    caller by the `submit` or `wait` after it. Width 1 runs each request in the caller."""

    def __init__(self, width: int):
        self.width = width
        self._pool = ThreadPoolExecutor(width, thread_name_prefix="s3") if width > 1 else None
        self._flying: deque[Future[None]] = deque()

    def submit(self, request: Callable[[], None]) -> None:
        if self._pool is None:
            request()
            return
        while len(self._flying) >= self.width:
            self._flying.popleft().result()
        self._flying.append(self._pool.submit(request))

    def wait(self) -> None:
        """Until every request finished; raises the first failure."""
        try:
            while self._flying:
                self._flying.popleft().result()
        finally:
            self.close()

    def close(self) -> None:
        """Drop what has not started; wait for what has."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None  # from here on, requests run in the caller
        self._flying.clear()


@dataclass
class UploadResult:
    key: str
    size: int  # stored bytes
    sha256: str  # of the stored bytes
    raw_bytes: int  # bytes written to the upload
    sent_bytes: int  # stored bytes sent this time (parts resumed are not sent)
    resumed_bytes: int  # raw bytes whose parts were already at the store
    seconds: float


class ObjectUpload:
    """A write-only sink that uploads everything written to it as object `key`.

    `finish()` completes it; if anything fails before, a multipart upload is left for the
    next `ObjectUpload` of the same key to resume (nothing half-written is ever visible
    under `key`: a multipart object appears only when completed)."""

    def __init__(
        self,
        store: Store,
        key: str,
        *,
        part_bytes: int,
        codec: str = "none",
        level: int = 3,
        bucket: wire.TokenBucket | None = None,
        progress: Any = None,
        concurrency: int = 4,
    ):
        if part_bytes < MIN_PART_BYTES:
            raise ValueError(f"part size {part_bytes} is below S3's minimum of {MIN_PART_BYTES}")
        self.store, self.key, self.part_bytes = store, key, part_bytes
        self._zstd = zstandard.ZstdCompressor(level=level) if codec == "zstd" else None
        self._bucket = bucket
        self._progress = progress
        self._buffer = bytearray()  # raw bytes not yet a frame
        self._frame = part_bytes if codec == "none" else 1 << 20
        self._pending = bytearray()  # stored bytes of the part being filled
        self._pending_raw = 0
        self._upload: str | None = None
        self._existing: dict[int, tuple[str, int]] = {}
        self._etags: dict[int, str] = {}  # part number -> ETag, as the parts are sent
        self._parts = 0
        self._flight = Parallel(concurrency)
        self._sha = hashlib.sha256()
        self._size = self._raw = self._sent = self._resumed = 0
        self._started = time.monotonic()
        found = store.resumable(key)
        if found is not None:
            self._upload, self._existing = found
            store.abort_uploads(key, keep=self._upload)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        self._raw += len(data)
        while len(self._buffer) >= self._frame:
            self._encode_frame(bytes(self._buffer[: self._frame]))
            del self._buffer[: self._frame]
        return len(data)

    def _encode_frame(self, raw: bytes) -> None:
        """Add one frame (a part's worth raw, or a MiB for zstd) to the part being filled;
        send the part once it holds `part_bytes` (stored bytes: S3's minimum is for them)."""
        self._pending += raw if self._zstd is None else self._zstd.compress(raw)
        self._pending_raw += len(raw)
        if len(self._pending) >= self.part_bytes:
            self._send_part(bytes(self._pending), self._pending_raw)
            self._pending.clear()
            self._pending_raw = 0

    def flush(self) -> None:
        pass  # parts go out as they fill

    def abandon(self) -> None:
        """Stop sending (after a failure elsewhere); what was sent stays for a resume."""
        self._flight.close()

    def _send_part(self, body: bytes, raw_bytes: int) -> None:
        if self._upload is None:
            created = self.store.call(
                f"starting an upload of {self.key}", "create_multipart_upload", Key=self.key
            )
            self._upload = str(created["UploadId"])
        self._parts += 1
        number = self._parts
        if number > MAX_PARTS:
            raise StoreError(
                f"{self.key}: more than {MAX_PARTS} parts", transient=False,
                hint="raise part_size for this site",
            )  # fmt: skip
        self._sha.update(body)
        self._size += len(body)
        etag = hashlib.md5(body, usedforsecurity=False).hexdigest()
        if self._existing.get(number) == (etag, len(body)):
            self._resumed += raw_bytes
            self._etags[number] = etag
        else:
            if self._bucket is not None:
                self._bucket.take(len(body))
            self._sent += len(body)
            self._flight.submit(lambda: self._upload_part(number, body))
        if self._progress is not None:
            self._progress(raw_bytes)

    def _upload_part(self, number: int, body: bytes) -> None:
        reply = self.store.call(
            f"uploading part {number} of {self.key}", "upload_part",
            Key=self.key, UploadId=self._upload, PartNumber=number, Body=body,
        )  # fmt: skip
        self._etags[number] = str(reply["ETag"]).strip('"')
        phases.reached("s3-part")

    def finish(self) -> UploadResult:
        """Send what is left and make the object appear whole."""
        if self._buffer:
            self._encode_frame(bytes(self._buffer))
        if not self._parts:
            self._flight.close()
            body = bytes(self._pending)
            self._sha.update(body)
            self._size += len(body)
            if self._bucket is not None:
                self._bucket.take(len(body))
            self.store.put(self.key, body)
            self._sent += len(body)
            if self._upload is not None:
                self.store.abort_uploads(self.key)
        else:
            if self._pending:
                self._send_part(bytes(self._pending), self._pending_raw)
            self._flight.wait()
            parts = [{"PartNumber": n, "ETag": f'"{self._etags[n]}"'} for n in sorted(self._etags)]
            self.store.call(
                f"completing the upload of {self.key}", "complete_multipart_upload",
                Key=self.key, UploadId=self._upload, MultipartUpload={"Parts": parts},
            )  # fmt: skip
        self._pending.clear()
        self._buffer.clear()
        return UploadResult(
            self.key, self._size, self._sha.hexdigest(), self._raw, self._sent, self._resumed,
            time.monotonic() - self._started,
        )  # fmt: skip
