"""Run a command as root inside a VM that boots Debian's kernel (virtme-ng + qemu).

This machine's own kernel may lack device-mapper; Debian's `linux-image-amd64`
has every target dmrepl uses as modules. virtme-ng boots that kernel with the
host's filesystem shared read-only (writes to /tmp land in a guest overlay,
directories passed as `rwdirs` are writable), runs one command and returns its
exit code. Software emulation is the default: on the machines this project is
developed on, the guest hangs at boot under KVM. Set DMREPL_VM_KVM=1 to use KVM.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from dmrepl.errors import VmFailed
from dmrepl.executor import Op, Runner

GUEST_MODULES = ("loop", "dm-era", "dm-snapshot", "dm-mirror", "dm-flakey", "dm-delay", "dm-zero")
DEFAULT_MEMORY = "4G"  # loop files live in the guest's RAM-backed /tmp
# Two emulated guests on a two-core host starve each other into timeouts: runs queue here.
VM_LOCK = Path("/tmp/dmrepl-vm.lock")


def find_guest_kernel(boot: Path = Path("/boot"), modules: Path = Path("/lib/modules")) -> Path:
    """The newest installed kernel image whose modules include dm-era.

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
        if (modules / version / "kernel/drivers/md/dm-era.ko").exists() or any(
            (modules / version / "kernel/drivers/md").glob("dm-era.ko*")
        ):
            candidates.append((_version_key(version), image))
    if not candidates:
        raise VmFailed(
            "no kernel with the dm-era module found under /boot",
            hint="install Debian's kernel: apt-get install linux-image-amd64",
        )
    return max(candidates)[1]


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


def vng_program() -> str:
    """virtme-ng's `vng`: beside the running Python (a venv) if installed there, else on PATH."""
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else "vng"


def guest_script(command: str, cwd: Path) -> str:
    """The shell script the guest runs: load modules, enter the tree, run `command`."""
    modules = " ".join(GUEST_MODULES)
    return (
        f"modprobe -a {modules} || {{ echo 'dmrepl-vm: modprobe failed' >&2; exit 97; }}; "
        f"cd {shlex.quote(str(cwd))} && {command}"
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
    """The `vng` command that runs `command` as root in the guest."""
    argv = [
        vng_program(),
        "--run",
        str(kernel),
        "--user",
        "root",
        "--memory",
        memory,
        "--cpus",
        str(cpus),
    ]
    if not kvm:
        argv.append("--disable-kvm")
    for directory in rwdirs:
        argv.append(f"--rwdir={directory}")
    argv += ["--exec", guest_script(command, cwd)]
    return Op(tuple(argv), mutating=True, timeout_s=timeout_s)


def run_in_vm(
    command: str,
    *,
    rwdirs: Sequence[Path] = (),
    runner: Runner | None = None,
    sink: Callable[[str], object] | None = None,
    timeout_s: float | None = None,
) -> int:
    """Boot the guest kernel, run `command` (shell text) as root, return its exit code.

    One guest at a time per host: a second caller waits for the first to finish.
    """
    op = plan_vm_run(
        command,
        kernel=find_guest_kernel(),
        cwd=Path.cwd(),
        rwdirs=rwdirs,
        memory=os.environ.get("DMREPL_VM_MEMORY", DEFAULT_MEMORY),
        cpus=min(os.cpu_count() or 1, 2),
        kvm=os.environ.get("DMREPL_VM_KVM") == "1",
        timeout_s=timeout_s,
    )
    with VM_LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return (runner or Runner()).stream(op, sink)
