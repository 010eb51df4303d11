"""A real S3 server for tests: OpenStack Swift with its s3api middleware, all in one.

`SwiftS3()` lays out a scratch directory (configs, rings, storage as plain directories with
`mount_check = false`), starts memcached and Swift's account, container, object and proxy
servers on free loopback ports, one replica each, and waits until the S3 endpoint answers.
Authentication is tempauth: the S3 access key is `account:user`, the secret the user's
password. `with SwiftS3() as server:` stops every process it started and removes the
directory. Debian's `swift-proxy swift-object swift-container swift-account memcached`
provide the programs (bin/setup installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

ACCESS_KEY = "dmrepl:tester"
SECRET_KEY = "testing"
REGION = "us-east-1"
PROGRAMS = {
    "memcached": "memcached",
    "swift-ring-builder": "swift-proxy",
    "swift-proxy-server": "swift-proxy",
    "swift-object-server": "swift-object",
    "swift-container-server": "swift-container",
    "swift-account-server": "swift-account",
}
START_TIMEOUT_S = float(os.environ.get("DMREPL_SWIFT_START_S", "180"))


def missing_programs() -> list[str]:
    """The programs the server needs that are not installed, each with its Debian package."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [f"{p} ({pkg})" for p, pkg in PROGRAMS.items() if not shutil.which(p, path=path)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_PROXY = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {proxy}
workers = 0
user = {user}
swift_dir = {etc}
log_level = WARNING

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats bulk \
s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:tempauth]
use = egg:swift#tempauth
user_dmrepl_tester = testing .admin

[filter:s3api]
use = egg:swift#s3api
location = {region}
s3_acl = false
check_bucket_owner = false
min_segment_size = 5242880

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached}

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:bulk]
use = egg:swift#bulk
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
"""

_STORAGE = """\
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {etc}
devices = {devices}
mount_check = false
log_level = WARNING

[pipeline:main]
pipeline = {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}

[{kind}-replicator]
[{kind}-updater]
[{kind}-auditor]
"""


class SwiftS3:
    """A single-replica Swift with s3api on loopback; `endpoint` once started."""

    def __init__(self, root: Path | None = None, storage: Path | None = None):
        """`storage`: a directory on a filesystem with user xattrs, which Swift's object
        server needs (default: in `root`)."""
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="dmrepl-swift.")) if root is None else root
        self.root.mkdir(parents=True, exist_ok=True)
        self.storage = self.root / "srv" if storage is None else storage
        self.proxy_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.proxy_port}"
        self._processes: list[subprocess.Popen[bytes]] = []
        self.log = self.root / "swift.log"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that give a client this server's credentials."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
        }

    def start(self) -> SwiftS3:
        missing = missing_programs()
        if missing:
            raise RuntimeError(f"Swift is not installed: {', '.join(missing)}")
        etc, devices = self.root / "etc", self.storage
        (devices / "d1").mkdir(parents=True, exist_ok=True)
        etc.mkdir()
        user = "root" if os.geteuid() == 0 else os.environ.get("USER", "root")
        (etc / "swift.conf").write_text(
            "[swift-hash]\nswift_hash_path_suffix = dmrepl-test\nswift_hash_path_prefix = t\n"
            "[storage-policy:0]\nname = Policy-0\ndefault = yes\n"
        )
        memcached = _free_port()
        ports = {kind: _free_port() for kind in ("account", "container", "object")}
        for kind, port in ports.items():
            builder = str(etc / f"{kind}.builder")
            for args in (
                ["create", "6", "1", "1"],
                ["add", f"r1z1-127.0.0.1:{port}/d1", "1"],
                ["rebalance"],
            ):
                subprocess.run(
                    ["swift-ring-builder", builder, *args], check=False, capture_output=True
                )
            if not (etc / f"{kind}.ring.gz").exists():
                raise RuntimeError(f"swift-ring-builder made no {kind} ring")
            conf = etc / f"{kind}-server.conf"
            conf.write_text(
                _STORAGE.format(port=port, user=user, etc=etc, devices=devices, kind=kind)
            )
            self._spawn([f"swift-{kind}-server", str(conf)])
        proxy = etc / "proxy-server.conf"
        proxy.write_text(
            _PROXY.format(
                proxy=self.proxy_port, user=user, etc=etc, region=REGION, memcached=memcached
            )
        )
        self._spawn(["memcached", "-l", "127.0.0.1", "-p", str(memcached), "-U", "0", "-u", user])
        self._spawn(["swift-proxy-server", str(proxy)])
        self._wait()
        return self

    def _spawn(self, argv: list[str]) -> None:
        with self.log.open("ab") as log:
            self._processes.append(
                subprocess.Popen(
                    argv,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def _wait(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{process.args} exited: see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.endpoint}/healthcheck", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Swift did not answer within {START_TIMEOUT_S} s: see {self.log}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the servers' log (what to look at when a request failed)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop every process this server started (their own process groups)."""
        for process in reversed(self._processes):
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self._processes.clear()

    def __enter__(self) -> SwiftS3:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
