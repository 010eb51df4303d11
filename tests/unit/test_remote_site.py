"""The ssh transport end to end on one host: a stand-in `ssh` runs `dmrepl serve --stdio` as a
forced command would (it ignores the host and command it is given), and the receiver writes
replica files through its own journal."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import sys
import time
from pathlib import Path

import pytest

from dmrepl import delta, serve, wire
from dmrepl.config import ConfigError, SshAddress, load_config, parse_config
from dmrepl.replication.status import replication_status
from dmrepl.sites import ReplicaMismatch, SiteContext, SiteDown
from dmrepl.sites.remote import RemoteSite, SshSiteSpec
from dmrepl.state import StateStore, TransferRecord
from dmrepl.statedir import StateDir
from tests.unit.factories import one_device_delta

ROOT = Path(__file__).resolve().parents[2]
SECTORS = 64 * 2048  # 64 MiB


def make_delta(seq: int, base: int | None, writes: list[tuple[int, bytes]]) -> bytes:
    return one_device_delta("g", "d", SECTORS, seq, base, writes)


class Host:
    """The "DR host": a receiver config, a replica file, and a stand-in ssh reaching it."""

    def __init__(self, root: Path, granted_group: str = "g", *, body: str | None = None):
        self.root = root
        root.mkdir(mode=0o700)
        self.replica = root / "replica.img"
        self.replica.write_bytes(b"")
        os.truncate(self.replica, SECTORS * 512)
        self.config = root / "receiver.toml"
        self.config.write_text(
            f'[dmrepl]\nstate_dir = "{root / "state"}"\n[receive.g.replica]\nd = "{self.replica}"\n'
        )
        self.ssh = root / "ssh"
        forced = (
            f"PYTHONPATH={ROOT} exec {sys.executable} -m dmrepl serve --stdio "
            f"--group {granted_group} --config {self.config}"
        )
        self.ssh.write_text(f"#!/bin/sh\n{body or forced}\n")
        self.ssh.chmod(0o755)

    def site(
        self, tmp_path: Path, address: dict[str, object] | None = None, **changes: object
    ) -> RemoteSite:
        """A site reaching this host; `address`: SshAddress fields besides host and ssh."""
        fields: dict[str, object] = dict(
            group="g", name="dr", transport="ssh", policy="asynchronous",
            address=SshAddress("drhost", program=str(self.ssh), **(address or {})),  # type: ignore[arg-type]
            replicas={"d": str(self.replica)}, codec=wire.Codec.ZSTD, level=3,
            rate_bytes=None, stall_s=30.0,
        )  # fmt: skip
        fields.update(changes)
        spec = SshSiteSpec(**fields)  # type: ignore[arg-type]
        return RemoteSite(spec, SiteContext({"d": SECTORS}, StateDir(tmp_path / "primary")))

    def image(self, offset_sectors: int, length: int) -> bytes:
        with self.replica.open("rb") as f:
            f.seek(offset_sectors * 512)
            return f.read(length)


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "dr")


def test_deltas_cross_to_the_receiver_and_land_through_its_journal(
    host: Host, tmp_path: Path
) -> None:
    site = host.site(tmp_path)
    try:
        assert site.held() is None and site.recorded() is None and site.recover() is None
        site.receive(io.BytesIO(make_delta(1, None, [(0, b"a" * 4096)])))
        delivered = site.receive(io.BytesIO(make_delta(2, 1, [(8, b"b" * 512)])))
        assert (delivered.seq, delivered.base_seq, delivered.data_bytes) == (2, 1, 512)
        assert site.held() == 2 and site.recorded() == 2
    finally:
        site.close()
    assert host.image(0, 8192) == b"a" * 4096 + b"b" * 512 + bytes(3584)
    assert (host.root / "state" / "journal" / "g.dr.journal").is_file()
    assert not (tmp_path / "primary").exists()  # the primary keeps nothing for it


def test_a_key_for_another_group_is_refused(tmp_path: Path) -> None:
    host = Host(tmp_path / "dr", granted_group="other")
    site = host.site(tmp_path)
    with pytest.raises(ReplicaMismatch, match=r"may write group\(s\) other, not g"):
        site.check()
    assert host.image(0, 4096) == bytes(4096)


def test_a_replica_path_not_granted_is_refused(host: Host, tmp_path: Path) -> None:
    site = host.site(tmp_path, replicas={"d": "/dev/sda"})
    with pytest.raises(ReplicaMismatch, match=r"asks to write .*/dev/sda.*grants"):
        site.held()


def test_a_protocol_version_mismatch_is_refused(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "PROTOCOL", 99)
    with pytest.raises(ReplicaMismatch, match="speaks protocol 99; this receiver speaks 1"):
        host.site(tmp_path).held()


def test_a_damaged_stream_is_refused_and_nothing_is_written(host: Host, tmp_path: Path) -> None:
    data = bytearray(make_delta(1, None, [(0, b"c" * 8192)]))
    data[-200] ^= 1
    site = host.site(tmp_path)
    try:
        with pytest.raises(delta.CorruptDelta, match="corrupt delta"):
            site.receive(io.BytesIO(bytes(data)))
        assert site.held() is None
    finally:
        site.close()
    assert host.image(0, 8192) == bytes(8192)


class BreaksAfter(io.RawIOBase):
    """A stream that fails after `limit` bytes, as a link dropping mid-transfer would."""

    def __init__(self, data: bytes, limit: int):
        self.data, self.limit, self.pos = data, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.pos >= self.limit:
            raise ConnectionResetError("link dropped")
        size = min(len(buffer), self.limit - self.pos, len(self.data) - self.pos)
        memoryview(buffer)[:size] = self.data[self.pos : self.pos + size]
        self.pos += size
        return size


def test_a_transfer_cut_off_resumes_from_what_the_receiver_journaled(
    host: Host, tmp_path: Path
) -> None:
    payload = os.urandom(20 << 20)  # incompressible: 20 MiB on the wire
    data = make_delta(1, None, [(0, payload)])
    site = host.site(tmp_path)
    with pytest.raises(ConnectionResetError):
        site.receive(BreaksAfter(data, 18 << 20))  # type: ignore[arg-type]
    delivered = site.receive(io.BytesIO(data))
    transfer = site.last_transfer
    site.close()
    assert delivered.seq == 1 and transfer is not None
    # the receiver's last checkpoint (every 8 MiB), past the delta's header
    assert 16 << 20 < transfer.resumed_from < (16 << 20) + 4096
    assert transfer.stream_bytes == len(data) - transfer.resumed_from
    assert host.image(0, len(payload)) == payload


def test_compression_shrinks_what_crosses_the_wire(host: Host, tmp_path: Path) -> None:
    data = make_delta(1, None, [(0, b"compressible " * 81_920)])
    sent = {}
    for codec in (wire.Codec.RAW, wire.Codec.ZSTD, wire.Codec.LZ4):
        site = host.site(tmp_path, codec=codec, level=1)
        site.receive(io.BytesIO(data))
        site.close()
        assert site.last_transfer is not None
        sent[codec] = site.last_transfer.wire_bytes
    assert sent[wire.Codec.RAW] > len(data)  # one codec byte a frame
    assert sent[wire.Codec.ZSTD] < len(data) / 20 and sent[wire.Codec.LZ4] < len(data) / 10


def test_a_link_that_moves_nothing_is_down_within_the_stall_timeout(tmp_path: Path) -> None:
    host = Host(tmp_path / "dr", body="exec sleep 60")
    site = host.site(tmp_path, stall_s=1.0)
    started = time.monotonic()
    with pytest.raises(SiteDown, match=r"no progress for 1 s \(stall_timeout\)"):
        site.check()
    assert time.monotonic() - started < 15  # not the 60 s the far end sleeps


def test_ssh_failing_is_down_with_what_ssh_said(tmp_path: Path) -> None:
    said = "ssh: connect to host drhost port 22: Connection refused"
    host = Host(tmp_path / "dr", body=f"echo '{said}' >&2; exit 255")
    with pytest.raises(SiteDown, match=f"ssh to drhost failed: {said}"):
        host.site(tmp_path).check()


def test_the_ssh_command_line(host: Host, tmp_path: Path) -> None:
    spec = host.site(
        tmp_path,
        address={"user": "repl", "port": 2222, "identity": "/root/.ssh/dr", "options": ("-4",)},
    ).spec
    assert spec.argv() == [
        str(host.ssh), "-T", "-o", "BatchMode=yes", "-p", "2222", "-i", "/root/.ssh/dr",
        "-l", "repl", "-4", "drhost", "dmrepl", "serve", "--stdio", "--group", "g",
    ]  # fmt: skip


def test_token_bucket_holds_the_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    bucket = wire.TokenBucket(1_000_000, clock=lambda: now[0], sleep=sleep)
    for _ in range(40):
        bucket.take(100_000)  # 4 MB at 1 MB/s
    assert 3.7 <= now[0] <= 4.0  # less the initial burst of 0.25 s
    assert max(slept) <= 1.0


def test_seeding_sends_only_the_chunks_whose_digests_differ(host: Host, tmp_path: Path) -> None:
    image = tmp_path / "pit.img"
    content = bytearray(os.urandom(SECTORS * 512))
    image.write_bytes(content)
    with host.replica.open("r+b") as replica:  # the replica already holds most of it
        replica.write(content)
        for chunk in (3, 40):
            replica.seek(chunk << 20)
            replica.write(b"\0" * 4096)
    site = host.site(tmp_path, codec=wire.Codec.RAW)
    try:
        site.receive(io.BytesIO(make_delta(1, None, [(0, b"x" * 512)])))  # it held cut 1
        content[:512] = b"x" * 512
        image.write_bytes(content)
        seeder = site.compare_seeder()
        assert seeder is not None
        done: list[int] = []
        stats = seeder.seed({"d": str(image)}, target_zeroed=False, progress=done.append)
        assert site.held() is None  # between the seed and its mark, the site holds no cut
        seeder.mark_seeded(7)
        assert site.held() == 7
    finally:
        site.close()
    assert (stats.written, stats.compared, sum(done)) == (2 << 20, SECTORS * 512, SECTORS * 512)
    assert stats.equal == SECTORS * 512 - (2 << 20)
    assert host.replica.read_bytes() == bytes(content)


def test_seeding_a_zeroed_target_hashes_nothing_and_skips_zero_chunks(
    host: Host, tmp_path: Path
) -> None:
    image = tmp_path / "pit.img"
    image.write_bytes(b"")
    os.truncate(image, SECTORS * 512)
    with image.open("r+b") as f:
        f.seek(5 << 20)
        f.write(b"data" * 1024)
    site = host.site(tmp_path)
    seeder = site.compare_seeder()
    assert seeder is not None
    stats = seeder.seed({"d": str(image)}, target_zeroed=True, progress=lambda _n: None)
    site.close()
    assert (stats.written, stats.zero_skipped) == (1 << 20, SECTORS * 512 - (1 << 20))
    assert host.image(5 * 2048, 4096) == b"data" * 1024


def test_status_shows_the_last_transfer_and_ack_of_an_ssh_site(tmp_path: Path) -> None:
    config = tmp_path / "dmrepl.toml"
    config.write_text(
        f'[dmrepl]\nstate_dir = "{tmp_path / "state"}"\n'
        '[group.g.device.d]\norigin = "/dev/vdb"\nmetadata = "/dev/vdc"\n'
        '[group.g.site.dr]\ntransport = "ssh"\nhost = "dr.example"\ncompress = "zstd:9"\n'
        'rate = "50MiB"\nstall_timeout = "2m"\n[group.g.site.dr.replica]\nd = "/dev/vdd"\n'
    )
    loaded = load_config(config)
    (spec,) = loaded.groups["g"].sites
    assert isinstance(spec, SshSiteSpec)
    assert (spec.codec, spec.level, spec.rate_bytes, spec.stall_s) == (
        wire.Codec.ZSTD, 9, 50 << 20, 120.0,
    )  # fmt: skip
    store = StateStore(tmp_path / "state")
    store.record_cut("g", {"d": 4}, 0.0)
    store.set_cursor("g", "dr", 1)
    store.record_transfer("g", "dr", TransferRecord(time.time(), 1, 0, 8 << 20, 2 << 20, 2.0))
    store.close()
    (shown,) = replication_status(loaded).sites
    assert shown.last_transfer is not None and shown.last_transfer.wire_bytes == 2 << 20
    assert shown.last_ack is not None and shown.state == "in sync"
    shown_json = json.loads(json.dumps(dataclasses.asdict(shown)))  # as `status --json` does
    assert shown_json["last_transfer"]["stream_bytes"] == 8 << 20


@pytest.mark.parametrize(
    ("field", "problem"),
    [
        ('compress = "gzip"', 'compress: \'gzip\' is not "zstd", "zstd:LEVEL", "lz4" or "none"'),
        ('compress = "zstd:22"', "compress: zstd level 22 is not 1 to 19"),
        ("port = 0", "port: 0 is not a TCP port"),
        ('stall_timeout = "0s"', "stall_timeout: '0s' is not a duration of 1s to 24h"),
        ('ssh_options = "-4"', 'ssh_options: must be a list of strings, like ["-4"]'),
    ],
)
def test_ssh_site_settings_are_checked(tmp_path: Path, field: str, problem: str) -> None:
    text = (
        '[group.g.device.d]\norigin = "/dev/vdb"\nmetadata = "/dev/vdc"\n'
        f'[group.g.site.dr]\ntransport = "ssh"\nhost = "h"\n{field}\n'
        '[group.g.site.dr.replica]\nd = "/dev/vdd"\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, tmp_path / "x.toml")
    assert caught.value.problems == [f"group.g.site.dr.{problem}"]


@pytest.mark.parametrize(
    ("setting", "codec", "level"),
    [("zstd", wire.Codec.ZSTD, 3), ("zstd:1", wire.Codec.ZSTD, 1), ("lz4", wire.Codec.LZ4, 0)],
)
def test_compress_names_a_codec_and_level(
    tmp_path: Path, setting: str, codec: wire.Codec, level: int
) -> None:
    text = (
        '[group.g.device.d]\norigin = "/dev/vdb"\nmetadata = "/dev/vdc"\n'
        f'[group.g.site.dr]\ntransport = "ssh"\nhost = "h"\ncompress = "{setting}"\n'
        '[group.g.site.dr.replica]\nd = "/dev/vdd"\n'
    )
    (spec,) = parse_config(text, tmp_path / "x.toml").select("g")
    site = spec.site("dr")
    assert isinstance(site, SshSiteSpec)
    assert (site.codec, site.level) == (codec, level)


def test_a_new_receiver_session_stops_an_older_one_on_the_same_site(
    host: Host, tmp_path: Path
) -> None:
    """Review finding: a receiver whose primary gave up (a cut link) could still journal a
    late delta while a newer session applies another: the newer session stops it."""
    older, newer = host.site(tmp_path), host.site(tmp_path)
    try:
        assert older.held() is None
        stale = older._session
        assert stale is not None
        assert newer.held() is None
        assert stale.process.wait(timeout=5) == -9  # the older receiver was stopped
        newer.receive(io.BytesIO(make_delta(1, None, [(0, b"n" * 512)])))
        assert newer.held() == 1
    finally:
        older.close()
        newer.close()


def test_the_receiver_logs_its_progress_with_rate_and_eta(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [100.0]
    monkeypatch.setattr(serve.time, "monotonic", lambda: now[0])
    meter = serve.Meter("site dr: seed, hashing the replicas", total=100 << 20, every=5.0)
    with caplog.at_level(logging.INFO, logger="dmrepl.progress"):
        now[0] += 1
        meter.add(10 << 20)  # within `every`: nothing logged
        now[0] += 9
        meter.add(30 << 20)
    assert [r.getMessage() for r in caplog.records] == [
        "site dr: seed, hashing the replicas: 40 MiB at 4 MiB/s, 40 % of 100 MiB, about 15 s left"
    ]
