"""The network lab of the remote-site tests (tests/kernel/netlab.py) does what it promises.

Timings are printed as `netlab timing: ...` lines (pytest -s shows them).
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.kernel.netlab import DR_IP, NetLab, SshClient

MiB = 2**20
CLOSED_PORT = 9  # nothing listens there in the DR namespace


def ssh(
    client: SshClient, *extra: str, stdin: str = ""
) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        client.argv("ignored", extra=extra),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done, time.monotonic() - started


def round_trip_s(count: int = 7) -> float:
    """Shortest time for a TCP connect to a closed port of the DR host to be refused: one round
    trip (SYN out, RST back), and no server process woken that would compete for the CPU.
    The shortest, because a loaded host only ever adds delay."""
    times = []
    for _ in range(count):
        started = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((DR_IP, CLOSED_PORT), timeout=10).close()
        times.append(time.monotonic() - started)
    return min(times)


def report(name: str, seconds: float) -> None:
    print(f"netlab timing: {name} = {seconds * 1000:.1f} ms")


def read_direct(path: str, offset: int, length: int) -> bytes:
    """Read through O_DIRECT (no page cache in between), aligned to 4 KiB."""
    buffer = mmap.mmap(-1, length)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buffer], offset) == length
        return bytes(buffer)
    finally:
        os.close(fd)
        buffer.close()


def write_direct(path: str, offset: int, data: bytes) -> None:
    buffer = mmap.mmap(-1, len(data))
    buffer.write(data)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        assert os.pwritev(fd, [buffer], offset) == len(data)
        os.fsync(fd)
    finally:
        os.close(fd)
        buffer.close()


def test_ssh_runs_the_forced_command_in_dr_and_refuses_strangers(netlab: NetLab) -> None:
    sshd = netlab.start_sshd()
    client = sshd.authorize("echo forced; readlink /proc/self/ns/net; ls -A ~ | wc -l; cat")
    done, took = ssh(client, stdin="payload\n")
    report("ssh forced command", took)
    assert done.returncode == 0, done.stderr
    dr_netns = f"net:[{os.stat(f'/run/netns/{netlab.dr_ns}').st_ino}]"
    # Run in the DR namespace, in an empty home (none of this machine's dotfiles), with stdin.
    assert done.stdout.splitlines() == ["forced", dr_netns, "0", "payload"]
    assert dr_netns != os.readlink("/proc/self/ns/net")

    refused, _ = ssh(sshd.stranger())
    assert refused.returncode == 255
    assert "Permission denied (publickey)" in refused.stderr
    impostor, _ = ssh(sshd.impostor_known_hosts(client))
    assert impostor.returncode == 255
    assert "Host key verification failed" in impostor.stderr
    assert refused.stdout == impostor.stdout == ""  # the forced command never ran


def test_netem_adds_latency_both_ways(netlab: NetLab) -> None:
    sshd = netlab.start_sshd()
    client = sshd.authorize("true")
    base_rtt = round_trip_s()
    base_ssh = min(ssh(client)[1] for _ in range(3))
    netlab.netem(delay_ms=40)
    slow_rtt = round_trip_s()
    sessions = [ssh(client) for _ in range(3)]
    assert all(done.returncode == 0 for done, _ in sessions), sessions[0][0].stderr
    slow_ssh = min(seconds for _, seconds in sessions)
    for name, seconds in (
        ("round trip", base_rtt),
        ("round trip, netem 40 ms", slow_rtt),
        ("ssh session", base_ssh),
        ("ssh session, netem 40 ms", slow_ssh),
    ):
        report(name, seconds)
    # 40 ms each way.
    assert 0.078 <= slow_rtt - base_rtt <= 0.2
    # An ssh session takes several round trips (TCP, banners, key exchange, auth, channel).
    assert slow_ssh - base_ssh >= 4 * 0.08

    netlab.netem(delay_ms=5, loss_pct=20)
    shown = netlab.run("tc", "qdisc", "show", "dev", netlab.near).stdout
    assert "delay 5ms" in shown and "loss 20%" in shown
    netlab.clear_netem()
    assert "netem" not in netlab.run("tc", "qdisc", "show", "dev", netlab.near).stdout


def test_cut_stalls_the_link_and_restore_resumes_it(netlab: NetLab) -> None:
    sshd = netlab.start_sshd()
    client = sshd.authorize("cat")
    session = subprocess.Popen(
        client.argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1
    )
    assert session.stdin is not None and session.stdout is not None
    try:
        session.stdin.write("one\n")
        assert session.stdout.readline() == "one\n"

        netlab.cut()  # silent: every packet dropped both ways
        session.stdin.write("two\n")
        assert select.select([session.stdout], [], [], 1.0)[0] == []  # stalled, not reset
        failed, took = ssh(client, "-o", "ConnectTimeout=2")
        report("ssh attempt over a cut link (ConnectTimeout=2)", took)
        assert failed.returncode == 255 and "timed out" in failed.stderr
        assert took < 30  # ConnectTimeout=2, plus starting ssh on a loaded host

        restored = time.monotonic()
        netlab.restore()
        assert select.select([session.stdout], [], [], 15)[0], "no data after restore"
        assert session.stdout.readline() == "two\n"
        report("stalled line arrives after restore", time.monotonic() - restored)
        session.stdin.close()
        assert session.wait(timeout=30) == 0
    finally:
        session.kill()
        session.wait()

    netlab.cut("down")  # the primary's end down: no route, failure at once
    failed, took = ssh(client, "-o", "ConnectTimeout=2")
    report("ssh attempt over a link that is down", took)
    assert failed.returncode == 255 and "unreachable" in failed.stderr
    netlab.restore()
    done, took = ssh(client, stdin="back\n")
    assert (done.returncode, done.stdout) == (0, "back\n"), done.stderr


def test_nbd_export_reads_back_and_survives_a_server_restart(netlab: NetLab) -> None:
    image = netlab.workdir / "export.img"
    image.write_bytes(b"")
    os.truncate(image, 8 * MiB)
    written_on_dr = os.urandom(64 * 1024)
    with image.open("r+b") as file:
        file.seek(MiB)
        file.write(written_on_dr)
    server = netlab.start_nbd_server({"replica": image})
    started = time.monotonic()
    device = netlab.nbd_connect("replica")
    report("nbd-client connect", time.monotonic() - started)
    assert int((device.sys_dir / "size").read_text()) * 512 == 8 * MiB
    assert read_direct(device.path, MiB, len(written_on_dr)) == written_on_dr

    written_on_primary = os.urandom(64 * 1024)
    write_direct(device.path, 4 * MiB, written_on_primary)
    with image.open("rb") as file:
        file.seek(4 * MiB)
        assert file.read(len(written_on_primary)) == written_on_primary

    started = time.monotonic()
    server.restart(crash=True)  # SIGKILL: the connection dies under the device
    report("nbd-server restart", time.monotonic() - started)
    dead = subprocess.run(
        ["dd", f"if={device.path}", "of=/dev/null", "bs=4096", "count=1", "iflag=direct"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert dead.returncode != 0 and "Input/output error" in dead.stderr  # EIO, not a hang
    started = time.monotonic()
    device.reconnect()
    report("nbd reconnect", time.monotonic() - started)
    assert read_direct(device.path, MiB, len(written_on_dr)) == written_on_dr
    assert read_direct(device.path, 4 * MiB, len(written_on_primary)) == written_on_primary


def test_the_lab_leaves_nothing_behind_when_a_test_fails(kernel_ready: None) -> None:
    with pytest.raises(RuntimeError, match="the test failed"), NetLab() as lab:
        sshd = lab.start_sshd()
        image = lab.workdir / "export.img"
        image.write_bytes(bytes(MiB))
        server = lab.start_nbd_server({"disk": image})
        device = lab.nbd_connect("disk")
        lab.netem(delay_ms=10)
        lab.cut()
        assert sshd.process is not None and server.pid is not None
        pids = [sshd.process.pid, server.pid]
        raise RuntimeError("the test failed")
    assert not Path(f"/run/netns/{lab.dr_ns}").exists()
    assert not Path(f"/sys/class/net/{lab.near}").exists()
    assert not lab.workdir.exists()
    assert not (device.sys_dir / "pid").exists()
    assert (device.sys_dir / "size").read_text().strip() == "0"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or ") Z " in Path(f"/proc/{pid}/stat").read_text()
