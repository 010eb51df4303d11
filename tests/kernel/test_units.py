"""The systemd units' command lines on the real kernel: one cycle as dmrepl-sync@GROUP.service
runs it, under the unit's filesystem hardening.

The guest has no systemd as init, so the test does what systemd would: the unit's ExecStart=
with `%i` the test's group, its Environment= with DMREPL_CONFIG set by a drop-in, systemd's
PATH, and (in a mount namespace of its own) ProtectSystem=strict with the state directory in
ReadWritePaths=, ProtectHome=read-only, ProtectKernelTunables= and NoNewPrivileges=. Only the
program is where this checkout's is, as the unit asks an installation to adjust.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from dmrepl.demo import write_random
from tests.kernel.stacks import Bed
from tests.systemd_units import SYSTEMD_PATH, UNITS, read_unit

ROOT = Path(__file__).resolve().parents[2]
MiB = 2**20

# ProtectSystem=strict: every mount read-only but the API filesystems and ReadWritePaths=
# (bound onto themselves first, so they keep their own, writable mounts; so is /dev, which
# systemd always mounts but the guest may not);
# ProtectHome=read-only and ProtectKernelTunables=yes: /home, /root, /sys and /proc/sys too.
CONFINE = r"""
set -eu
writable=$1; shift
mount --make-rprivate /
mount --bind "$writable" "$writable"
mount --rbind /dev /dev
for dir in /home /root /proc/sys; do
    [ -d "$dir" ] && mount --bind "$dir" "$dir"
done
awk '{print $5}' /proc/self/mountinfo | sort -u | while read -r point; do
    case "$point" in
        "$writable") continue ;;
        /dev | /dev/* | /proc | /proc/*) [ "$point" = /proc/sys ] || continue ;;
    esac
    mount -o remount,bind,ro "$point" 2>/dev/null || echo "confine: $point stays writable" >&2
done
exec setpriv --no-new-privs "$@"
"""


def digest(path: str) -> str:
    with open(path, "rb") as device:
        return hashlib.file_digest(device, "sha256").hexdigest()


def service_argv(name: str, group: str, config: Path) -> tuple[list[str], dict[str, str]]:
    """The service's command line and environment for `group`, with DMREPL_CONFIG=`config`."""
    unit = read_unit(UNITS / name)
    environment = {**unit.environment(), "DMREPL_CONFIG": str(config)}
    argv = unit.exec_start(group, environment)
    program = Path(sys.executable).with_name("dmrepl")
    runs = [str(program)] if program.exists() else [sys.executable, "-m", "dmrepl"]
    # This checkout's dmrepl, whatever the interpreter's own installation is.
    environment |= {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}
    environment["PYTHONDONTWRITEBYTECODE"] = "1"  # the bytecode caches are read-only too
    if "DM_DISABLE_UDEV" in os.environ:  # the guest has no udev: dmsetup makes the nodes
        environment["DM_DISABLE_UDEV"] = os.environ["DM_DISABLE_UDEV"]
    return [*runs, *argv[1:]], environment


def test_sync_service_runs_one_cycle(bed: Bed) -> None:
    bed.add_device("ua", origin_mib=16)
    replicas = bed.add_site("dr")
    bed.cli("up")
    write_random("/dev/mapper/ua", 3 * MiB, MiB)
    bed.state_dir.mkdir(parents=True, exist_ok=True)
    argv, environment = service_argv("dmrepl-sync@.service", bed.group, bed.config)
    assert argv[-2:] == ["sync", bed.group]
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", CONFINE, "confine", str(bed.state_dir), *argv],
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    outside = bed.workdir / "outside-the-state-dir"
    tried = subprocess.run(
        ["unshare", "--mount", "sh", "-c", CONFINE, "confine", str(bed.state_dir),
         "touch", str(outside)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert tried.returncode != 0 and "Read-only file system" in tried.stderr, tried.stderr
    assert "site dr: in sync" in done.stdout, done.stdout
    assert "stays writable" not in done.stderr, done.stderr
    assert digest(replicas["ua"]) == digest("/dev/mapper/ua")
    status = bed.cli("status").stdout
    assert f"site {bed.group}/dr (blockdev, asynchronous): in sync; holds cut 1" in status, status
