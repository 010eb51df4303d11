"""A two-host network lab for remote-site kernel tests: a DR host in a network namespace.

The primary is the test's own (root) network namespace: the test process, dmrepl run in it,
the `ssh` it spawns, `nbd-client` and every dm and loop device stay where they are, with no
`ip netns exec` in front of anything under test. Block devices are not namespaced anyway,
and Python 3.11 has no `os.setns` to move the test into a second namespace. The DR host is
one namespace (`NetLab.dr_ns`) joined to the primary by a veth pair:

    primary (root namespace)  10.77.0.1/24  <- veth ->  10.77.0.2/24  dr namespace

On that link: `netem` (delay, loss, rate, both directions), `cut()` and `restore()`. In the
DR namespace: an OpenSSH server with keys the lab makes (`start_sshd`, then `authorize` a
forced command and get the client's exact ssh options) and an `nbd-server`
(`start_nbd_server`), with `nbd_connect` attaching its exports to `/dev/nbdN` here.

`with NetLab() as lab:` (or the `netlab` fixture in conftest.py) undoes everything in reverse
at exit, also when the test fails: NBD devices disconnected, every process in the DR
namespace killed, the namespace and the veth pair deleted, the scratch directory in /tmp
(the guest's RAM) removed. Only one lab is up at a time in a kernel (fixed addresses).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path

from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Result, command

PRIMARY_IP = "10.77.0.1"
DR_IP = "10.77.0.2"
PREFIX = 24
SSH_PORT = 2222
NBD_PORT = 10809
SSHD = "/usr/sbin/sshd"  # sshd re-executes itself and insists on an absolute path
# Debian package of each program the lab runs (bin/setup installs them all).
TOOLS = {
    "ip": "iproute2",
    "tc": "iproute2",
    "unshare": "util-linux",
    "modprobe": "kmod",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sshd": "openssh-server",
    "nbd-server": "nbd-server",
    "nbd-client": "nbd-client",
}
START_TIMEOUT_S = 60.0  # a daemon starting on a loaded host


def missing_tools() -> list[str]:
    """The lab's programs that are not installed, each with its Debian package."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [f"{tool} ({pkg})" for tool, pkg in TOOLS.items() if not shutil.which(tool, path=path)]


@dataclass(frozen=True)
class Netem:
    """What `tc netem` does to each direction of the link (all zero: nothing)."""

    delay_ms: float = 0
    loss_pct: float = 0
    jitter_ms: float = 0
    rate: str | None = None  # e.g. "100mbit"
    limit: int = 10000  # packets queued; netem's default of 1000 throttles a delayed bulk stream

    @property
    def idle(self) -> bool:
        return not (self.delay_ms or self.loss_pct or self.rate)

    def args(self) -> list[str]:
        argv = ["netem", "limit", str(self.limit)]
        if self.delay_ms or self.jitter_ms:
            argv += ["delay", f"{self.delay_ms:g}ms"]
            argv += [f"{self.jitter_ms:g}ms"] if self.jitter_ms else []
        argv += ["loss", f"{self.loss_pct:g}%"] if self.loss_pct else []
        argv += ["rate", self.rate] if self.rate else []
        return argv


@dataclass(frozen=True)
class SshClient:
    """How the primary reaches the DR host's sshd with one key: `argv()` is the whole command.

    `-F none` reads no ssh_config (neither /etc/ssh's nor ~/.ssh's); `IdentitiesOnly` offers
    this key alone, never an agent's or ~/.ssh's.
    """

    key: Path
    known_hosts: Path
    port: int
    host: str = DR_IP
    user: str = "root"

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}"

    @property
    def options(self) -> list[str]:
        """The ssh options before the destination (what a site's `ssh_options` would carry)."""
        return [
            "-F",
            "none",
            "-i",
            str(self.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-p",
            str(self.port),
        ]

    def argv(self, *remote: str, extra: Sequence[str] = ()) -> list[str]:
        """`ssh -T OPTIONS [extra] user@host [remote...]` (a forced command ignores `remote`)."""
        return ["ssh", "-T", *self.options, *extra, self.destination, *remote]


@dataclass
class Sshd:
    """An OpenSSH server in the DR namespace, with its own config, host key and pid file.

    It runs in a private mount namespace where /root is an empty directory of the lab: no
    dotfile of this machine's root runs in a session (Debian's bash sources ~/.bashrc for
    ssh commands, which cost 7.5 s a session in user-mode Linux here). Root may log in with
    forced commands only (`PermitRootLogin forced-commands-only`).
    """

    lab: NetLab
    port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    clients: int = 0

    @property
    def authorized_keys(self) -> Path:
        return self.directory / "authorized_keys"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    @property
    def log(self) -> Path:
        return self.directory / "sshd.log"

    def start(self) -> None:
        home = self.directory / "home"
        home.mkdir(mode=0o700)
        host_key = self.lab.keygen(self.directory / "host_key")
        self.authorized_keys.touch(mode=0o600)
        self.known_hosts.write_text(
            f"[{DR_IP}]:{self.port} {host_key.with_suffix('.pub').read_text()}"
        )
        config = self.directory / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {DR_IP}",
                    f"HostKey {host_key}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.authorized_keys}",
                    # The lab's files live under /tmp (mode 1777), which StrictModes refuses.
                    "StrictModes no",
                    "PermitRootLogin forced-commands-only",
                    "AuthenticationMethods publickey",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitUserRC no",
                    "PermitUserEnvironment no",
                    "UseDNS no",
                    "PrintMotd no",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        script = 'mount --bind "$1" /root && mkdir -p /run/sshd && exec "$2" -D -e -f "$3"'
        argv = [*self.lab.dr_prefix(), "unshare", "--mount", "sh", "-c", script, "sshd"]
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [*argv, str(home), SSHD, str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_listening(self.process.pid, self.port, what="sshd", log=self.log, owner=self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def authorize(self, forced_command: str, *, options: str = "restrict") -> SshClient:
        """A new client key that may log in as root and then runs only `forced_command`.

        Its authorized_keys line is `command="FORCED",OPTIONS <key>`; the command runs under
        root's shell in the DR namespace with sshd's root PATH
        (/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin): name a venv's
        programs by their full path.
        """
        self.clients += 1
        key = self.lab.keygen(self.directory / f"client{self.clients}")
        quoted = forced_command.replace("\\", "\\\\").replace('"', '\\"')
        prefix = f'command="{quoted}"' + (f",{options}" if options else "")
        with self.authorized_keys.open("a") as keys:
            keys.write(f"{prefix} {key.with_suffix('.pub').read_text()}")
        return SshClient(key, self.known_hosts, self.port)

    def stranger(self) -> SshClient:
        """A client whose key sshd does not know (the host key is the right one)."""
        self.clients += 1
        key = self.lab.keygen(self.directory / f"stranger{self.clients}")
        return SshClient(key, self.known_hosts, self.port)

    def impostor_known_hosts(self, client: SshClient) -> SshClient:
        """`client`, but expecting another host key for this server: ssh must refuse it."""
        other = self.lab.keygen(self.directory / f"impostor{self.clients}")
        path = self.directory / f"known_hosts.impostor{self.clients}"
        path.write_text(f"[{DR_IP}]:{self.port} {other.with_suffix('.pub').read_text()}")
        return replace(client, known_hosts=path)


@dataclass
class NbdServer:
    """`nbd-server` in the DR namespace serving files (or devices) by export name.

    It runs as nbd-server normally does, as a daemon forking one child per client (its pid
    file names the daemon, whose process group holds the children). Not `-d` (no fork): that
    serves one client and exits, and a SIGTERM to it while a client was attached froze the
    whole user-mode Linux guest (6 runs of 6; SIGKILL did not, nor SIGTERM to the daemon).
    """

    lab: NetLab
    exports: Mapping[str, Path]
    port: int
    directory: Path
    pid: int | None = None

    @property
    def pid_file(self) -> Path:
        return self.directory / "nbd-server.pid"

    @property
    def log(self) -> Path:
        return self.directory / "nbd-server.log"

    def start(self) -> None:
        config = self.directory / "nbd-server.conf"
        lines = ["[generic]", f"listenaddr = {DR_IP}", f"port = {self.port}", "allowlist = true"]
        for name, path in self.exports.items():
            lines += [f"[{name}]", f"exportname = {Path(path).resolve()}", "flush = true"]
        config.write_text("\n".join(lines) + "\n")
        self.pid_file.unlink(missing_ok=True)
        argv = [*self.lab.dr_prefix(), "nbd-server", "-C", str(config), "-p", str(self.pid_file)]
        with self.log.open("ab") as log:
            # The daemon keeps no pipe of ours open: its output goes to the log file.
            code = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=30, check=False
            ).returncode
        if code != 0:
            raise LabError(f"nbd-server exited with code {code}", self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.pid_file.exists() or not self.pid_file.read_text().strip():
            if time.monotonic() > deadline:
                raise LabError("nbd-server wrote no pid file", self.log)
            time.sleep(0.02)
        self.pid = int(self.pid_file.read_text())
        wait_listening(self.pid, self.port, what="nbd-server", log=self.log)

    def stop(self, *, crash: bool = True) -> None:
        """Stop the daemon and its children: SIGKILL (a crash) or SIGTERM (a clean stop)."""
        if self.pid is None:
            return
        pid, self.pid = self.pid, None
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL if crash else signal.SIGTERM)
        wait_gone(pid)

    def restart(self, *, crash: bool = True) -> None:
        self.stop(crash=crash)
        self.start()


@dataclass
class NbdDevice:
    """An export of the lab's nbd-server attached to `/dev/nbdN` on the primary."""

    lab: NetLab
    export: str
    port: int
    path: str
    connect_args: tuple[str, ...] = ()
    connected: bool = False

    @property
    def sys_dir(self) -> Path:
        return Path("/sys/block") / Path(self.path).name

    def connect(self) -> None:
        argv = ["nbd-client", DR_IP, self.port, self.path, "-N", self.export, *self.connect_args]
        self.lab.run(*argv)
        self.connected = True

    def disconnect(self) -> None:
        if self.connected:
            self.lab.runner.run_best_effort(command("nbd-client", "-d", self.path))
            self.connected = False

    def reconnect(self) -> None:
        """Disconnect (a dead connection too) and connect again: after a server restart."""
        self.disconnect()
        self.connect()


class LabError(RuntimeError):
    """A lab piece did not come up; carries the end of its log."""

    def __init__(self, message: str, log: Path | None = None):
        tail = ""
        if log is not None and log.exists():
            tail = "\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        super().__init__(message + tail)


@dataclass
class NetLab:
    """The primary (this namespace) and a DR namespace joined by a veth pair; see the module."""

    runner: Runner = field(default_factory=lambda: Runner(timeout_s=60))
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    workdir: Path = field(init=False)
    stack: ExitStack = field(default_factory=ExitStack, init=False)
    _netem: Netem = field(default_factory=Netem, init=False)
    _cut: str | None = field(default=None, init=False)
    _nbd_claimed: set[str] = field(default_factory=set, init=False)

    @property
    def dr_ns(self) -> str:
        return f"dr-{self.tag}"

    @property
    def near(self) -> str:
        """The primary's end of the veth pair."""
        return f"nl{self.tag}p"

    @property
    def far(self) -> str:
        """The DR end of the veth pair (inside the DR namespace)."""
        return f"nl{self.tag}d"

    def __enter__(self) -> NetLab:
        try:
            self._build()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _build(self) -> None:
        missing = missing_tools()
        if missing:
            raise LabError(f"not installed: {', '.join(missing)} (bash bin/setup installs them)")
        taken = self.run("ip", "-o", "addr", "show", "to", f"{PRIMARY_IP}/{PREFIX}").stdout
        if taken.strip():
            raise LabError(f"{PRIMARY_IP}/{PREFIX} is already in use (another lab?): {taken}")
        self.workdir = Path(tempfile.mkdtemp(prefix="dmrepl-netlab-", dir="/tmp"))
        self.stack.callback(shutil.rmtree, self.workdir, ignore_errors=True)
        self.run("ip", "netns", "add", self.dr_ns)
        self.stack.callback(self._remove_namespace)
        self.run("ip", "link", "add", self.near, "type", "veth", "peer", "name", self.far)
        self.stack.callback(self._remove_link)
        self.run("ip", "link", "set", "dev", self.far, "netns", self.dr_ns)
        self.run("ip", "addr", "add", f"{PRIMARY_IP}/{PREFIX}", "dev", self.near)
        self.run("ip", "link", "set", "dev", self.near, "up")
        inside = ("ip", "-n", self.dr_ns)
        self.run(*inside, "addr", "add", f"{DR_IP}/{PREFIX}", "dev", self.far)
        self.run(*inside, "link", "set", "dev", self.far, "up")
        self.run(*inside, "link", "set", "dev", "lo", "up")
        self._wait_link_up()

    # --- commands ---------------------------------------------------------------------------

    def run(self, *argv: str | int, timeout_s: float | None = None) -> Result:
        """Run a short command here (on the primary); raises CommandFailed with its output."""
        op = command(*argv)
        if timeout_s is not None:
            op = replace(op, timeout_s=timeout_s)
        return self.runner.run(op)

    def dr_prefix(self) -> list[str]:
        """What to put before a command to run it in the DR namespace."""
        return ["ip", "netns", "exec", self.dr_ns]

    def run_in_dr(self, *argv: str | int, timeout_s: float | None = None) -> Result:
        return self.run(*self.dr_prefix(), *argv, timeout_s=timeout_s)

    def dr_pids(self) -> list[int]:
        """Every process in the DR namespace."""
        out = self.runner.run_best_effort(command("ip", "netns", "pids", self.dr_ns))
        return [int(pid) for pid in out.stdout.split()] if out else []

    def keygen(self, path: Path) -> Path:
        """A new ed25519 key pair without passphrase at `path` and `path`.pub."""
        self.run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", path)
        return path

    # --- the link ---------------------------------------------------------------------------

    def netem(
        self,
        delay_ms: float = 0,
        loss_pct: float = 0,
        *,
        jitter_ms: float = 0,
        rate: str | None = None,
        limit: int = 10000,
    ) -> None:
        """Delay, drop or throttle packets in each direction: a round trip pays 2 x delay_ms.

        Replaces what was set before; all zero removes netem. While the link is cut this
        only records the setting, which `restore()` applies.
        """
        self._netem = Netem(delay_ms, loss_pct, jitter_ms, rate, limit)
        if self._cut is None:
            self._apply(self._netem)

    def clear_netem(self) -> None:
        self.netem()

    def cut(self, how: str = "drop") -> None:
        """Cut the link until `restore()`.

        `drop`: netem drops every packet both ways; connections stall silently and resume
        (by TCP retransmission) after the restore, new ones time out, like a WAN outage.
        `down`: the primary's end goes down; its route goes too, so sends fail at once with
        ENETUNREACH (EHOSTUNREACH for established connections' retransmits).
        """
        if self._cut is not None:
            raise LabError(f"the link is already cut ({self._cut})")
        if how == "drop":
            self._apply(Netem(loss_pct=100))
        elif how == "down":
            self.run("ip", "link", "set", "dev", self.near, "down")
        else:
            raise ValueError(f"cut how={how!r}: use 'drop' or 'down'")
        self._cut = how

    def restore(self) -> None:
        """Undo `cut()`: the link carries packets again, with the netem set before."""
        how, self._cut = self._cut, None
        if how == "down":
            self.run("ip", "link", "set", "dev", self.near, "up")
            self._wait_link_up()
        if how is not None:
            self._apply(self._netem)

    @property
    def is_cut(self) -> bool:
        return self._cut is not None

    def _apply(self, netem: Netem) -> None:
        for tc in (("tc",), ("tc", "-n", self.dr_ns)):
            device = self.near if len(tc) == 1 else self.far
            if netem.idle:
                with suppress(CommandFailed):  # no qdisc to delete
                    self.run(*tc, "qdisc", "del", "dev", device, "root")
            else:
                self.run(*tc, "qdisc", "replace", "dev", device, "root", *netem.args())

    def _wait_link_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            near = self.run("ip", "-o", "link", "show", "dev", self.near).stdout
            far = self.run("ip", "-n", self.dr_ns, "-o", "link", "show", "dev", self.far).stdout
            if "state UP" in near and "state UP" in far:
                return
            if time.monotonic() > deadline:
                raise LabError(f"the veth pair did not come up:\n{near}{far}")
            time.sleep(0.05)

    # --- services in the DR namespace -------------------------------------------------------

    def start_sshd(self, port: int = SSH_PORT) -> Sshd:
        """Start an sshd listening on DR_IP:port; stopped at the lab's exit."""
        directory = Path(tempfile.mkdtemp(prefix="sshd-", dir=self.workdir))
        sshd = Sshd(self, port, directory)
        self.stack.callback(sshd.stop)
        sshd.start()
        return sshd

    def start_nbd_server(self, exports: Mapping[str, Path], port: int = NBD_PORT) -> NbdServer:
        """Start nbd-server on DR_IP:port serving `exports` (name -> file or device)."""
        directory = Path(tempfile.mkdtemp(prefix="nbd-", dir=self.workdir))
        server = NbdServer(self, dict(exports), port, directory)
        self.stack.callback(server.stop)
        server.start()
        return server

    def nbd_connect(
        self,
        export: str,
        port: int = NBD_PORT,
        *,
        block_size: int | None = None,
        timeout_s: int | None = None,
    ) -> NbdDevice:
        """Attach `export` to a free /dev/nbdN here (nbd-client, netlink); detached at exit.

        `timeout_s` is nbd-client's `-t`: without it, I/O to an unreachable server waits
        forever; with it, a request unanswered that long fails with EIO.
        """
        if not Path("/sys/module/nbd").exists():
            self.run("modprobe", "nbd")
        args: list[str] = []
        args += ["-b", str(block_size)] if block_size else []
        args += ["-t", str(timeout_s)] if timeout_s else []
        device = NbdDevice(self, export, port, self._free_nbd(), tuple(args))
        self.stack.callback(device.disconnect)
        device.connect()
        return device

    def _free_nbd(self) -> str:
        def number(path: Path) -> int:
            return int(path.name.removeprefix("nbd"))

        for sys_dir in sorted(Path("/sys/block").glob("nbd*"), key=number):
            busy = (sys_dir / "pid").exists() or (sys_dir / "size").read_text().strip() != "0"
            path = f"/dev/{sys_dir.name}"
            if not busy and path not in self._nbd_claimed:
                self._nbd_claimed.add(path)
                return path
        raise LabError("no free /dev/nbdN (all connected)")

    # --- teardown ---------------------------------------------------------------------------

    def _remove_namespace(self) -> None:
        # Everything started in the DR namespace dies with it, whatever a test left running.
        for _ in range(50):
            pids = self.dr_pids()
            if not pids:
                break
            for pid in pids:
                with suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        self.runner.run_best_effort(command("ip", "netns", "del", self.dr_ns))

    def _remove_link(self) -> None:
        if Path("/sys/class/net", self.near).exists():
            self.runner.run_best_effort(command("ip", "link", "del", "dev", self.near))


def wait_listening(
    pid: int,
    port: int,
    *,
    what: str,
    log: Path,
    owner: subprocess.Popen[bytes] | None = None,
) -> None:
    """Wait until a TCP socket listens on `port` in the network namespace of process `pid`.

    Reads /proc/PID/net/tcp, which shows that namespace's sockets: no connection is made,
    so this works while the link is cut.
    """
    deadline = time.monotonic() + START_TIMEOUT_S
    wanted = re.compile(rf"^\s*\d+: [0-9A-F]+:{port:04X} [0-9A-F]+:0000 0A ", re.MULTILINE)
    while True:
        if owner is not None and owner.poll() is not None:
            raise LabError(f"{what} exited with code {owner.returncode}", log)
        with contextlib.suppress(OSError):
            if wanted.search(Path(f"/proc/{pid}/net/tcp").read_text()):
                return
        if time.monotonic() > deadline:
            raise LabError(f"{what} is not listening on port {port}", log)
        time.sleep(0.02)


def wait_gone(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until process `pid` has exited (it is not our child: it may be a daemon's)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return
        if state == "Z":  # a zombie holds no socket; init reaps it
            return
        time.sleep(0.02)
    raise LabError(f"process {pid} did not exit within {timeout_s:g} s")
