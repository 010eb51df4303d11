"""The kernel the tier runs on: real device nodes, and the network pieces remote sites need."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from dmrepl.executor import Runner
from dmrepl.ops import command

LISTEN = """
import socket
server = socket.create_server(("192.0.2.2", 7070))
print("ready", flush=True)
conn, _ = server.accept()
conn.sendall(b"hello")
"""


def test_mapper_node_is_a_block_device_of_the_dm_device(make_dm: Callable[[str, str], str]) -> None:
    """Without udev, dmsetup must still make /dev/mapper/NAME a block node (DM_DISABLE_UDEV=1);
    otherwise a write to that path silently creates a regular file."""
    node = make_dm("node", "0 2048 zero")
    mode = os.stat(node).st_mode
    assert stat.S_ISBLK(mode), f"{node} is not a block device (mode {mode:o})"
    rdev = os.stat(node).st_rdev
    sys_dev = Path(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/dm/name").read_text()
    assert sys_dev.strip() == Path(node).name
    with open(node, "rb") as zero:
        assert zero.read(4096) == bytes(4096)


def test_network_namespaces_veth_and_netem_work(runner: Runner) -> None:
    """Two hosts joined by a veth pair with 20 ms of netem delay, as remote-site tests use."""
    ns = f"kt-{uuid.uuid4().hex[:8]}"
    runner.run(command("ip", "netns", "add", ns))
    try:
        near, far = f"{ns}-a", f"{ns}-b"
        runner.run(command("ip", "link", "add", near, "type", "veth", "peer", "name", far))
        runner.run(command("ip", "link", "set", "dev", far, "netns", ns))
        runner.run(command("ip", "addr", "add", "192.0.2.1/30", "dev", near))
        runner.run(command("ip", "link", "set", "dev", near, "up"))
        inside = ("ip", "netns", "exec", ns)
        runner.run(command(*inside, "ip", "addr", "add", "192.0.2.2/30", "dev", far))
        runner.run(command(*inside, "ip", "link", "set", "dev", far, "up"))
        runner.run(command("tc", "qdisc", "add", "dev", near, "root", "netem", "delay", "20ms"))
        shown = runner.run(command("tc", "qdisc", "show", "dev", near)).stdout
        assert "netem" in shown and "delay 20" in shown
        # A listener on the far side; the connect pays the 20 ms on the way there.
        listener = subprocess.Popen(
            [*inside, sys.executable, "-c", LISTEN], stdout=subprocess.PIPE, text=True
        )
        try:
            assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
            started = time.monotonic()
            with socket.create_connection(("192.0.2.2", 7070), timeout=10) as conn:
                elapsed = time.monotonic() - started
                assert conn.recv(5) == b"hello"
            assert elapsed >= 0.019
        finally:
            listener.kill()
            listener.wait()
    finally:
        runner.run_best_effort(command("ip", "link", "del", "dev", near))
        runner.run_best_effort(command("ip", "netns", "del", ns))
