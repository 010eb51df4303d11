"""contrib/systemd: every unit passes `systemd-analyze verify`, keeps device-mapper reachable,
and its command line is one the CLI takes (the kernel tier runs one: tests/kernel/test_units.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl.config import DEFAULT_STATE_DIR
from tests.clirun import run_cli_here
from tests.systemd_units import read_unit, unit_files

SERVICES = ("dmrepl-sync@.service", "dmrepl-run@.service")
# Each of these would cut dmrepl off from something it needs (docs/operations.md).
FORBIDDEN = {
    "PrivateDevices": "hides /dev/mapper and the block devices",
    "DevicePolicy": "restricts the device nodes dmrepl opens",
    "DeviceAllow": "restricts the device nodes dmrepl opens",
    "ProtectClock": "implies DeviceAllow=, which closes the other device nodes",
    "ProtectKernelModules": "nbd sites load the nbd module",
    "PrivateNetwork": "ssh and nbd sites reach other hosts",
    "PrivateIPC": "dmsetup waits for udev on System V semaphores",
    "CapabilityBoundingSet": "device-mapper needs CAP_SYS_ADMIN and more",
}


def systemd_analyze() -> str:
    """The systemd-analyze binary; bin/setup installs it (Debian's systemd package)."""
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(
            "systemd-analyze is missing: bin/setup installs the systemd package that has it; "
            "run bin/setup (or apt-get install systemd) and try again"
        )
    return found


def installed_copies(directory: Path) -> None:
    """The units, as installed: ExecStart= names a program that exists (verify insists)."""
    program = Path(sys.executable).with_name("dmrepl")
    stand_in = str(program) if program.exists() else shutil.which("true") or "/bin/true"
    for path in unit_files():
        text = path.read_text().replace("/opt/dmrepl/.venv/bin/dmrepl", stand_in)
        (directory / path.name).write_text(text)


@pytest.mark.parametrize("name", [p.name for p in unit_files()])
def test_unit_verifies(name: str, tmp_path: Path) -> None:
    analyze = systemd_analyze()
    installed_copies(tmp_path)
    instance = name.replace("@.", "@db.")  # a template is verified through an instance
    done = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / instance)],
        capture_output=True,
        text=True,
        check=False,
    )
    # Unknown keys and bad values are only warnings to systemd: any output is a failure.
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), (
        f"systemd-analyze verify {name} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )


def test_units_are_shipped() -> None:
    names = {p.name for p in unit_files()}
    assert {"dmrepl-sync@.service", "dmrepl-sync@.timer", "dmrepl-run@.service"} <= names


@pytest.mark.parametrize("name", SERVICES)
def test_hardening_leaves_device_mapper_reachable(name: str) -> None:
    unit = read_unit(unit_files()[0].with_name(name))
    for key, why in FORBIDDEN.items():
        assert not unit.values("Service", key), f"{name}: {key}= is set, but {why}"
    assert unit.values("Service", "ProtectSystem") == ["strict"]
    writable = " ".join(unit.values("Service", "ReadWritePaths")).split()
    assert str(DEFAULT_STATE_DIR) in writable
    families = set(" ".join(unit.values("Service", "RestrictAddressFamilies")).split())
    assert families == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}


@pytest.mark.parametrize(
    ("name", "command"),
    [("dmrepl-sync@.service", ["sync", "db"]), ("dmrepl-run@.service", ["run", "db"])],
)
def test_command_line_reads_the_configured_file(
    name: str, command: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    unit = read_unit(unit_files()[0].with_name(name))
    environment = {**unit.environment(), "DMREPL_CONFIG": str(tmp_path / "missing.toml")}
    argv = unit.exec_start("db", environment)
    assert argv[0] == "/opt/dmrepl/.venv/bin/dmrepl"
    assert argv[1:3] == command
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("DMREPL_CONFIG", environment["DMREPL_CONFIG"])
    code, _, stderr = run_cli_here(*argv[1:])
    assert code == 3, stderr  # the configuration named by DMREPL_CONFIG, which is missing
    assert "missing.toml" in stderr


def test_exec_start_expands_like_systemd(tmp_path: Path) -> None:
    unit_file = tmp_path / "x@.service"
    unit_file.write_text(
        "[Service]\n"
        'Environment=A=1 "B=two words"\n'
        "Environment=A=3\n"
        "ExecStart=/bin/echo %i 100%% ${A} $B \\\n"
        "    --x=${B}\n"
    )
    unit = read_unit(unit_file)
    assert unit.environment() == {"A": "3", "B": "two words"}
    argv = unit.exec_start("g", unit.environment())
    assert argv == ["/bin/echo", "g", "100%", "3", "two", "words", "--x=two words"]
