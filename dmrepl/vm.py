"""Run a command as root inside a guest kernel that has device-mapper.

The machines this project is developed and tested on run kernels without
device-mapper. Two guests can stand in, chosen with DMREPL_VM:

- `uml` (default): Debian's `user-mode-linux`, the 6.1 kernel built to run as
  an ordinary process at native instruction speed. The host's filesystem is the
  guest's root, read-write; the guest mounts fresh tmpfs on /tmp and /run and
  makes visible again, through hostfs, the host paths under them that the run
  needs (the checkout, result directories). Several guests can run at once.
- `qemu`: Debian's `linux-image-amd64` under qemu software emulation, through
  virtme-ng. Slow (a process start costs 0.2-0.8 s), but it has several CPUs
  and a real block driver. The host's filesystem is read-only there except for
  `rwdirs`; /tmp is a guest overlay. One guest at a time per host.

Either way `run_in_vm` boots the guest, loads the dm modules, runs one shell
command in the current directory, and returns its exit code.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from dmrepl import safefile
from dmrepl.errors import VmFailed
from dmrepl.executor import Runner
from dmrepl.ops import Op

GUEST_MODULES = ("loop", "dm-era", "dm-snapshot", "dm-mirror", "dm-flakey", "dm-delay", "dm-zero")
DEFAULT_MEMORY = "3G"  # loop files live in the guest's RAM-backed /tmp
BACKENDS = ("uml", "qemu")
# Two emulated qemu guests on a two-core host starve each other into timeouts: they queue on
# this lock, in a root-only directory (a lock in /tmp could be a link planted by another user).
QEMU_LOCK = Path("/run/dmrepl/qemu-guest.lock")
UML_KERNEL = Path("/usr/bin/linux.uml")
UML_MODULES = Path("/usr/lib/uml/modules")
MODPROBE_FAILED = 97  # the guest's exit code when the dm modules would not load
# Paths the guest mounts fresh tmpfs on; host paths below them are mounted back through hostfs.
UML_SCRATCH = ("/tmp", "/run")


def backend() -> str:
    """The guest kind DMREPL_VM asks for (default `uml`)."""
    name = os.environ.get("DMREPL_VM", "uml") or "uml"
    if name not in BACKENDS:
        raise VmFailed(f"DMREPL_VM={name} is not a guest kind", hint="use uml or qemu")
    return name


def describe() -> str:
    """The chosen guest in a few words, for messages."""
    if backend() == "qemu":
        return "Debian's kernel under qemu, through virtme-ng"
    return "Debian's user-mode Linux"


def tool_dir() -> Path:
    """The directory of the running Python: a venv's `bin`, where virtme-ng and tools live."""
    return Path(sys.executable).parent


def guest_path() -> str:
    """PATH for the guest and the VM tools: the venv's `bin` first, then the system's.

    Never the caller's PATH: `.venv/bin/dmrepl` runs with a PATH that lacks `.venv/bin`,
    and virtme-ng starts `virtme-run` by name.
    """
    return ":".join([str(tool_dir()), "/usr/local/sbin", "/usr/local/bin", *_SYSTEM_PATH])


_SYSTEM_PATH = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


def run_in_vm(
    command: str,
    *,
    rwdirs: Sequence[Path] = (),
    runner: Runner | None = None,
    sink: Callable[[str], object] | None = None,
    timeout_s: float | None = None,
) -> int:
    """Boot the guest kernel, run `command` (shell text) as root in the current directory.

    Returns the command's exit code; raises VmFailed when the guest could not run it.
    `rwdirs` are host directories the command writes results to.
    """
    memory = os.environ.get("DMREPL_VM_MEMORY", DEFAULT_MEMORY)
    if backend() == "qemu":
        return _run_in_qemu(command, rwdirs, runner or Runner(), sink, timeout_s, memory)
    return _run_in_uml(command, rwdirs, runner or Runner(), sink, timeout_s, memory)


# --- user-mode Linux -------------------------------------------------------------------------


def find_uml_kernel(default: Path = UML_KERNEL) -> Path:
    """The user-mode Linux kernel binary (DMREPL_UML_KERNEL overrides)."""
    override = os.environ.get("DMREPL_UML_KERNEL")
    chosen = Path(override) if override else default
    if not chosen.is_file():
        raise VmFailed(
            f"no user-mode Linux kernel at {chosen}",
            hint="install it: apt-get install user-mode-linux (bash bin/setup does)",
        )
    return chosen


def find_uml_modules(root: Path = UML_MODULES) -> Path:
    """The newest module tree of the user-mode Linux kernel (holds modules.dep)."""
    trees = sorted(
        (tree for tree in root.glob("*") if (tree / "modules.dep").exists()),
        key=lambda tree: _version_key(tree.name),
    )
    if not trees:
        raise VmFailed(
            f"no user-mode Linux modules under {root}",
            hint="install them: apt-get install user-mode-linux (bash bin/setup does)",
        )
    return trees[-1]


def host_paths_to_keep(paths: Iterable[Path], scratch: Sequence[str] = UML_SCRATCH) -> list[str]:
    """The host paths the guest must mount back over its fresh tmpfs, outermost only.

    /tmp or /run itself cannot be kept: the guest's own would hide it.
    """
    paths = list(paths)
    for given in paths:
        if os.path.normpath(str(given)) in scratch:
            raise VmFailed(
                f"{given} cannot be shared with the guest: it mounts its own {given} there",
                hint="use a directory below it (tempfile.mkdtemp(dir='/tmp')) instead",
            )
    inside = sorted(
        {
            os.path.normpath(str(path))
            for path in paths
            if any(str(path).startswith(top + "/") for top in scratch)
        }
    )
    kept: list[str] = []
    for path in inside:
        if not any(path.startswith(outer + "/") for outer in kept):
            kept.append(path)
    return kept


def uml_init_script(
    command: str,
    *,
    cwd: Path,
    keep: Sequence[str],
    modules: Path,
    status_file: Path,
    colour: bool = False,
) -> str:
    """The guest's init (PID 1): mounts, modules, the command, its exit code, power off.

    The exit code of a user-mode Linux process says nothing about the guest, so
    the script writes the command's to `status_file` on the host.
    """
    q = shlex.quote
    module_root = "/run/dmrepl-uml"
    wrapper = f"{module_root}/bin/modprobe"
    lines = [
        "#!/bin/sh",
        "# Generated by dmrepl.vm: init of a user-mode Linux guest.",
        f"PATH={q(guest_path())}; export PATH",
        # No udev in the guest: without this dmsetup creates no /dev/mapper nodes, and a
        # write to such a path silently creates a regular file.
        "HOME=/root DM_DISABLE_UDEV=1 LANG=C.UTF-8; export HOME DM_DISABLE_UDEV LANG",
        # The guest's console is a terminal even when our stdout is a pipe or a file.
        "" if colour else "NO_COLOR=1 TERM=dumb; export NO_COLOR TERM",
        'fail() { echo "dmrepl-uml: $1" >&2; echo "${2:-125}" > '
        f"{q(str(status_file))}; poweroff -f >/dev/null 2>&1; exit 1; }}",
        "mount -t proc proc /proc && mount -t sysfs sysfs /sys || fail 'cannot mount /proc, /sys'",
        *(
            f"mount -t tmpfs -o mode=1777 tmpfs {top} || fail 'cannot mount {top}'"
            for top in UML_SCRATCH
        ),
        "mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm",
        *(
            f"mkdir -p {q(path)} && mount -t hostfs none {q(path)} -o {q(path)} "
            f"|| fail {q('cannot mount ' + path)}"
            for path in keep
        ),
        # The UML modules live outside /lib/modules. A modprobe that looks where they are comes
        # first on PATH and serves the kernel's module loader, so targets and qdiscs also load
        # on demand.
        f"mkdir -p {module_root}/lib/modules/{modules.name} {module_root}/bin",
        f"mount --bind {q(str(modules))} {module_root}/lib/modules/{modules.name}",
        f"printf '#!/bin/sh\\nexec /sbin/modprobe -d {module_root} \"$@\"\\n' > {wrapper}",
        f"chmod +x {wrapper} && echo {wrapper} > /proc/sys/kernel/modprobe",
        f"PATH={module_root}/bin:$PATH",
        f"modprobe -a {' '.join(GUEST_MODULES)} || fail 'modprobe failed' {MODPROBE_FAILED}",
        "ip link set lo up 2>/dev/null",
        "stty -onlcr 2>/dev/null",  # the console would turn every \\n into \\r\\n
        f"cd {q(str(cwd))} || fail {q('cannot enter ' + str(cwd))}",
        "(",  # the command on lines of its own: a trailing comment cannot swallow the ")"
        command,
        ")",
        f"echo $? > {q(str(status_file))}",
        "poweroff -f >/dev/null 2>&1",
    ]
    return "\n".join(lines) + "\n"


def plan_uml_run(kernel: Path, init: Path, memory: str) -> Op:
    """The user-mode Linux command line: hostfs root, our init, console on stdout.

    UML keeps its control socket under `uml_dir`: the init's directory, not ~/.uml.
    """
    argv = (
        str(kernel),
        f"uml_dir={init.parent}",
        f"mem={memory}",
        "rootfstype=hostfs",
        "rootflags=/",
        "rw",
        f"init={init}",
        "con=null",
        "con0=null,fd:1",  # no console input; output to our stdout
        "quiet",
        "loglevel=0",  # kernel chatter would interleave with the command's output
        "log_buf_len=4M",  # tests read dmesg: keep a whole tier's messages
    )
    # The guest's RAM is a file UML creates in TMPDIR: keep it in memory, not on disk.
    tmpdir = "/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()
    return Op(argv, timeout_s=None, env=(("TMPDIR", tmpdir), ("PATH", guest_path())))


def _run_in_uml(
    command: str,
    rwdirs: Sequence[Path],
    runner: Runner,
    sink: Callable[[str], object] | None,
    timeout_s: float | None,
    memory: str,
) -> int:
    kernel, modules = find_uml_kernel(), find_uml_modules()
    control = Path(tempfile.mkdtemp(prefix="dmrepl-uml-", dir="/tmp"))
    try:
        status_file, init = control / "status", control / "init"
        cwd = Path.cwd()
        keep = host_paths_to_keep([cwd, control, tool_dir().parent, *rwdirs])
        init.write_text(
            uml_init_script(
                command,
                cwd=cwd,
                keep=keep,
                modules=modules,
                status_file=status_file,
                colour=sys.stdout.isatty(),
            )
        )
        init.chmod(0o755)
        op = plan_uml_run(kernel, init, memory)
        if timeout_s is not None:
            op = Op(op.argv, timeout_s=timeout_s, env=op.env)
        uml_messages: list[str] = []
        exit_code = runner.stream(op, sink, stderr=uml_messages.append)
        if not status_file.exists():
            raise VmFailed(
                f"user-mode Linux exited with code {exit_code} before the guest command finished",
                context="".join(uml_messages[-40:]).strip() or None,
                hint="run the kernel by hand to see why: " + " ".join(op.argv),
            )
        return int(status_file.read_text().strip() or 125)
    finally:
        shutil.rmtree(control, ignore_errors=True)


# --- qemu through virtme-ng ------------------------------------------------------------------


def find_guest_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Path:
    """The newest installed kernel image whose modules include dm-era (for qemu).

    DMREPL_VM_KERNEL overrides the choice.
    """
    override = os.environ.get("DMREPL_VM_KERNEL")
    if override:
        if not Path(override).is_file():
            raise VmFailed(f"DMREPL_VM_KERNEL={override} is not a file")
        return Path(override)
    candidates = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        if any((modules / version / "kernel/drivers/md").glob("dm-era.ko*")):
            candidates.append((_version_key(version), image))
    if not candidates:
        raise VmFailed(
            "no kernel with the dm-era module found under /boot",
            hint="install Debian's kernel and qemu: DMREPL_VM=qemu bash bin/setup",
        )
    return max(candidates)[1]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def vng_program() -> str:
    """virtme-ng's `vng`: beside the running Python (a venv) if installed there, else on PATH."""
    beside = tool_dir() / "vng"
    return str(beside) if beside.exists() else "vng"


def guest_script(command: str, cwd: Path) -> str:
    """The shell script the qemu guest runs: load modules, enter the tree, run `command`."""
    modules = " ".join(GUEST_MODULES)
    return (
        f"modprobe -a {modules} || {{ echo 'dmrepl-vm: modprobe failed' >&2; "
        f"exit {MODPROBE_FAILED}; }}; cd {shlex.quote(str(cwd))} && {command}"
    )


def plan_vm_run(
    command: str,
    *,
    kernel: Path,
    cwd: Path,
    rwdirs: Sequence[Path] = (),
    memory: str = DEFAULT_MEMORY,
    cpus: int = 2,
    kvm: bool = False,
    timeout_s: float | None = None,
) -> Op:
    """The `vng` command that runs `command` as root in a qemu guest.

    Its PATH is set here: vng starts `virtme-run` (and qemu) by name.
    """
    argv = [vng_program(), "--run", str(kernel), "--user", "root"]
    argv += ["--memory", memory, "--cpus", str(cpus)]
    if not kvm:
        argv.append("--disable-kvm")
    argv += [f"--rwdir={directory}" for directory in rwdirs]
    argv += ["--exec", guest_script(command, cwd)]
    return Op(tuple(argv), mutating=True, timeout_s=timeout_s, env=(("PATH", guest_path()),))


def _run_in_qemu(
    command: str,
    rwdirs: Sequence[Path],
    runner: Runner,
    sink: Callable[[str], object] | None,
    timeout_s: float | None,
    memory: str,
) -> int:
    op = plan_vm_run(
        command,
        kernel=find_guest_kernel(),
        cwd=Path.cwd(),
        rwdirs=rwdirs,
        memory=memory,
        cpus=min(os.cpu_count() or 1, 2),
        kvm=os.environ.get("DMREPL_VM_KVM") == "1",
        timeout_s=timeout_s,
    )
    safefile.private_dir(QEMU_LOCK.parent, what="the qemu guest lock's directory")
    lock = safefile.open_own(QEMU_LOCK)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return runner.stream(op, sink)
    finally:
        os.close(lock)
