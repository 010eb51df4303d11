"""The `nbd` transport without root or devices: its config (URLs, exports per device), the
handshake probe against a stand-in NBD server on localhost, and a site that cannot attach."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from dmrepl.config import ConfigError, parse_config
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Op, Result
from dmrepl.sites import ReplicaMismatch, SiteContext, SiteDown, open_site
from dmrepl.sites.nbd import (
    CMD_DISC,
    DEFAULT_TIMEOUT_S,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    NBD_MAGIC,
    OLDSTYLE_MAGIC,
    OPT_ABORT,
    OPT_GO,
    OPTS_MAGIC,
    REP_ACK,
    REP_FLAG_ERROR,
    REP_INFO,
    REPLY_MAGIC,
    REQUEST_MAGIC,
    TRANSMISSION_READ_ONLY,
    NbdExport,
    NbdSite,
    NbdSiteSpec,
    ProbeFailed,
    probe,
)
from dmrepl.statedir import StateDir

GROUP = """
[dmrepl]
state_dir = "/var/lib/dmrepl"
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
[group.db.device.logs]
origin = "/dev/vdd"
metadata = "/dev/vde"
"""
SITE = """
[group.db.site.dr]
transport = "nbd"
"""
EXPORTS = """
[group.db.site.dr.export]
data = "nbd://dr.example:10810/db-data"
logs = "nbd://[fd00::2]/db%20logs"
"""


def parse(text: str) -> NbdSiteSpec:
    (spec,) = parse_config(GROUP + text, Path("x.toml")).groups["db"].sites
    assert isinstance(spec, NbdSiteSpec)
    return spec


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(GROUP + text, Path("x.toml"))
    return caught.value.problems


def test_an_nbd_site_names_one_export_per_device() -> None:
    spec = parse(SITE + EXPORTS)
    assert spec.exports == {
        "data": NbdExport("dr.example", 10810, "db-data"),
        "logs": NbdExport("fd00::2", 10809, "db logs"),
    }
    assert spec.journal is None and spec.timeout_s == DEFAULT_TIMEOUT_S
    assert spec.exports["logs"].url == "nbd://[fd00::2]:10809/db%20logs"
    assert spec.claims() == [
        ("group.db.site.dr.export", "data", "nbd://dr.example:10810/db-data"),
        ("group.db.site.dr.export", "logs", "nbd://[fd00::2]:10809/db%20logs"),
    ]
    tuned = parse(SITE + 'journal = "/dev/vdj"\ntimeout = "1.5"\n' + EXPORTS)
    assert (tuned.journal, tuned.timeout_s) == ("/dev/vdj", 2)  # whole seconds for nbd-client
    assert parse(SITE + 'timeout = "2m"\n' + EXPORTS).timeout_s == 120


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://dr/x", "is not an nbd://HOST[:PORT]/EXPORT URL"),
        ("dr.example/x", "is not an nbd://HOST[:PORT]/EXPORT URL"),
        ("nbd:dr/x", "is not an nbd://HOST[:PORT]/EXPORT URL"),
        ("nbds://dr/x", "uses nbds://, which is not supported: only nbd://HOST[:PORT]/EXPORT"),
        ("nbd+unix:///x?socket=/s", "uses nbd+unix://, which is not supported"),
        ("nbd://dr", "names no export (nbd://HOST[:PORT]/EXPORT)"),
        ("nbd://dr:10809/", "names no export"),
        ("nbd://:10809/x", "names no host"),
        ("nbd://dr:0/x", "has a port that is not a number from 1 to 65535"),
        ("nbd://dr:65536/x", "has a port that is not a number from 1 to 65535"),
        ("nbd://dr:port/x", "has a port that is not a number from 1 to 65535"),
        ("nbd://dr:/x", "has a port that is not a number from 1 to 65535"),
        ("nbd://root@dr/x", "has a user name; NBD has none"),
        ("nbd://dr/x?tls=1", "has a query or a fragment"),
        ("nbd://dr/x%0A", "has an export name with control characters"),
    ],
)
def test_a_bad_url_is_a_problem_naming_the_device(url: str, problem: str) -> None:
    text = SITE + f'[group.db.site.dr.export]\ndata = "{url}"\nlogs = "nbd://dr/l"\n'
    (found,) = problems(text)
    assert found.startswith(f"group.db.site.dr.export.data: {url!r} "), found
    assert problem in found, found


def test_missing_unknown_and_misused_keys_are_problems() -> None:
    assert problems(SITE) == [
        "group.db.site.dr.export: missing: a table naming the nbd://HOST[:PORT]/EXPORT of "
        "every group device"
    ]
    text = SITE + '[group.db.site.dr.export]\ndata = 5\nextra = "nbd://dr/e"\n'
    assert problems(text) == [
        "group.db.site.dr.export.data: must be a string like nbd://HOST[:PORT]/EXPORT, not 5",
        "group.db.site.dr.export.logs: missing (the nbd://HOST[:PORT]/EXPORT of this group device)",
        "group.db.site.dr.export.extra: not a device of this group",
    ]
    text = SITE + 'journal = "journal.img"\ntimeout = "0s"\npath = "/srv"\n' + EXPORTS
    assert problems(text) == [
        'group.db.site.dr.path: only used with transport = "dir"',
        "group.db.site.dr.journal: 'journal.img' is not an absolute path",
        "group.db.site.dr.timeout: '0s' is not a duration of 1s to 24h",
    ]
    text = SITE + EXPORTS + '[group.db.site.dr.replica]\ndata = "/dev/nbd0"\n'
    assert problems(text) == [
        'group.db.site.dr.replica: only used with transport = "blockdev" or transport = "ssh"'
    ]


def test_one_export_written_by_two_sites_is_a_problem() -> None:
    other = SITE.replace(".dr]", ".dr2]") + EXPORTS.replace(".dr.", ".dr2.").replace(
        "nbd://dr.example:10810/db-data", "nbd://DR.example:10810/db-data"
    )
    assert problems(SITE + EXPORTS + other) == [
        "group.db.site.dr2.export.data: nbd://dr.example:10810/db-data is also "
        "group.db.site.dr.export.data",
        "group.db.site.dr2.export.logs: nbd://[fd00::2]:10809/db%20logs is also "
        "group.db.site.dr.export.logs",
    ]


# -- the handshake probe, against a stand-in server


class StandIn:
    """A one-thread NBD server on localhost speaking just the handshake: the greeting, one
    NBD_OPT_GO answered from `exports` (name -> (size, transmission flags)), the client's
    disconnect (or abort, after an error)."""

    def __init__(
        self,
        exports: dict[str, tuple[int, int]],
        *,
        greeting: bytes | None = None,
        go_unsupported: bool = False,
        silent: bool = False,
    ):
        self.exports = exports
        self.greeting = greeting
        self.go_unsupported = go_unsupported
        self.silent = silent
        self.left = b""
        self.asked: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def export(self, name: str) -> NbdExport:
        return NbdExport("127.0.0.1", self.port, name)

    def close(self) -> None:
        with suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (close alone does not)
        self.listener.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            with connection, suppress(OSError, struct.error):
                self._handle(connection)

    def _handle(self, connection: socket.socket) -> None:
        if self.silent:
            connection.recv(1)  # until the client gives up
            return
        if self.greeting is not None:
            connection.sendall(self.greeting)
            return
        flags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        connection.sendall(struct.pack(">QQH", NBD_MAGIC, OPTS_MAGIC, flags))
        assert struct.unpack(">I", receive(connection, 4))[0] == flags
        magic, option, length = struct.unpack(">QII", receive(connection, 16))
        assert (magic, option) == (OPTS_MAGIC, OPT_GO)
        data = receive(connection, length)
        (size,) = struct.unpack(">I", data[:4])
        name = data[4 : 4 + size].decode()
        self.asked.append(name)
        if self.go_unsupported:
            self._reply(connection, REP_FLAG_ERROR | 1, b"")
        elif name in self.exports:
            export_size, transmission = self.exports[name]
            self._reply(connection, REP_INFO, struct.pack(">HQH", 0, export_size, transmission))
            self._reply(connection, REP_INFO, struct.pack(">HIII", 3, 1, 4096, 2**25))  # ignored
            self._reply(connection, REP_ACK, b"")
        else:
            self._reply(connection, REP_FLAG_ERROR | 6, b"Export unknown")
        while chunk := connection.recv(64):  # what the client sent before it closed
            self.left += chunk

    @staticmethod
    def _reply(connection: socket.socket, reply: int, data: bytes) -> None:
        connection.sendall(struct.pack(">QIII", REPLY_MAGIC, OPT_GO, reply, len(data)) + data)


def receive(connection: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = connection.recv(count - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


@pytest.fixture
def server() -> Iterator[StandIn]:
    stand_in = StandIn({"dr-data": (64 * 512, 0), "ro": (4096, TRANSMISSION_READ_ONLY)})
    yield stand_in
    stand_in.close()


def test_the_probe_reads_size_and_flags_then_disconnects(server: StandIn) -> None:
    info = probe(server.export("dr-data"), 5)
    assert (info.size_bytes, info.read_only) == (64 * 512, False)
    server.close()
    assert server.asked == ["dr-data"]
    assert server.left == struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0)
    read_only = StandIn({"ro": (4096, TRANSMISSION_READ_ONLY)})
    assert probe(read_only.export("ro"), 5).read_only
    read_only.close()


def test_the_probe_says_why_it_failed(server: StandIn) -> None:
    with pytest.raises(ProbeFailed) as caught:
        probe(server.export("nope"), 5)
    expected = f"127.0.0.1:{server.port} has no such export (export 'nope'): Export unknown"
    assert str(caught.value) == expected
    assert not caught.value.transient
    server.close()
    assert server.left == struct.pack(">QII", OPTS_MAGIC, OPT_ABORT, 0)  # after an error
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(
        ProbeFailed, match=r"cannot reach 127\.0\.0\.1:\d+: Connection refused"
    ) as down:
        probe(NbdExport("127.0.0.1", port, "x"), 5)
    assert down.value.transient
    old = StandIn({}, greeting=struct.pack(">QQ", NBD_MAGIC, OLDSTYLE_MAGIC))
    with pytest.raises(ProbeFailed, match="speaks the old NBD handshake, which names no exports"):
        probe(old.export("x"), 5)
    web = StandIn({}, greeting=b"HTTP/1.1 400 Bad Request\r\n\r\n")
    with pytest.raises(ProbeFailed, match="is not an NBD server"):
        probe(web.export("x"), 5)
    for stand_in in (old, web):
        stand_in.close()


def test_a_server_that_never_answers_is_given_up_on_after_the_timeout() -> None:
    silent = StandIn({}, silent=True)
    with pytest.raises(ProbeFailed, match=r"no answer from 127.0.0.1:\d+ within 0.3 s") as caught:
        probe(silent.export("x"), 0.3)
    assert caught.value.transient
    silent.close()


def test_an_old_server_without_go_is_reachable_with_its_size_unknown() -> None:
    old = StandIn({}, go_unsupported=True)
    info = probe(old.export("x"), 5)
    assert info.size_bytes is None
    old.close()


# -- the site, as far as it goes without root


class FailingRunner(Runner):
    """nbd-client cannot reach the server; every other command succeeds."""

    def __init__(self) -> None:
        super().__init__()
        self.ran: list[tuple[str, ...]] = []

    def run(self, op: Op, *, ok_codes: object = (0,)) -> Result:
        self.ran.append(op.argv)
        if op.argv[0] == "nbd-client":
            raise CommandFailed(op.argv, 1, "", "Error: Socket failed: Connection refused\n")
        return Result(op.argv, 0, "", "", 0.0)


def site_on(server: StandIn, tmp_path: Path, name: str = "dr-data", sectors: int = 64) -> NbdSite:
    text = '[group.db.site.dr]\ntransport = "nbd"\ntimeout = "2s"\n[group.db.site.dr.export]\n'
    text += f'data = "nbd://127.0.0.1:{server.port}/{name}"\n'
    group = GROUP.split("[group.db.device.logs]")[0]
    (spec,) = parse_config(group + text, Path("x.toml")).groups["db"].sites
    site = open_site(spec, SiteContext({"data": sectors}, StateDir(tmp_path / "state")))
    assert isinstance(site, NbdSite)
    return site


def test_check_probes_every_export_and_attaches_nothing(server: StandIn, tmp_path: Path) -> None:
    site = site_on(server, tmp_path)
    site.check()
    assert site.held() is None and site.recorded() is None and site.recover() is None
    assert site.attached == {}
    site.close()
    assert not (tmp_path / "state").exists()  # reading the site created nothing

    with pytest.raises(ReplicaMismatch, match=r"dr-data of data is 32 KiB \(64 sectors\), the"):
        site_on(server, tmp_path, sectors=128).check()
    with pytest.raises(
        ReplicaMismatch, match=r"export nbd://127\.0\.0\.1:\d+/ro of data is read-only"
    ):
        site_on(server, tmp_path, name="ro", sectors=8).check()
    with pytest.raises(ReplicaMismatch, match="has no such export"):
        site_on(server, tmp_path, name="gone").check()
    server.close()
    with pytest.raises(SiteDown, match="cannot reach"):
        site_on(server, tmp_path).check()


def test_a_failed_attach_is_the_site_down_with_nbd_clients_words(
    server: StandIn, tmp_path: Path
) -> None:
    site = site_on(server, tmp_path)
    runner = FailingRunner()
    site.runner = runner
    with pytest.raises(SiteDown) as caught:
        site.seed({"data": "/dev/null"}, target_zeroed=False, progress=lambda _: None)
    assert caught.value.message == (
        f"site dr: attaching nbd://127.0.0.1:{server.port}/dr-data failed: "
        "Error: Socket failed: Connection refused"
    )
    attach = ("nbd-client", "127.0.0.1", str(server.port), "-N", "dr-data", "-t", "2")
    assert runner.ran[-1] == attach
    assert site.attached == {}
    assert not site.record.exists()
