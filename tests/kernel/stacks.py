"""Helpers for stack-builder kernel tests: loop-backed configs and the CLI as a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dmrepl import dm
from dmrepl.executor import Runner
from tests.clirun import run_cli_here

MiB = 2**20


@dataclass
class Bed:
    """A config file over loop devices in a scratch directory, and a way to run the CLI on it."""

    workdir: Path
    runner: Runner
    make_loop: Callable[[str, int], str]
    group: str = field(default_factory=lambda: f"kt{os.getpid()}")
    devices: dict[str, dict[str, object]] = field(default_factory=dict)
    origin_mib: dict[str, int] = field(default_factory=dict)
    group_fields: dict[str, object] = field(default_factory=dict)
    sites: dict[str, dict[str, object]] = field(default_factory=dict)
    settings: dict[str, object] = field(default_factory=dict)  # more [dmrepl] keys

    @property
    def config(self) -> Path:
        return self.workdir / "dmrepl.toml"

    def add_device(self, name: str, origin_mib: int = 32, **extra: object) -> dict[str, object]:
        device: dict[str, object] = {
            "origin": self.make_loop(f"{name}-origin", origin_mib * MiB),
            "metadata": self.make_loop(f"{name}-meta", 4 * MiB),
            "block_size": "64KiB",
            **extra,
        }
        self.devices[name] = device
        self.origin_mib[name] = origin_mib
        self.write()
        return device

    def add_site(
        self,
        name: str,
        transport: str = "blockdev",
        replicas: dict[str, str] | None = None,
        **fields: object,
    ) -> dict[str, str]:
        """A site; blockdev replicas default to new loop devices the size of each origin."""
        if transport == "blockdev" and replicas is None:
            replicas = {
                device: self.make_loop(f"{name}-{device}-replica", mib * MiB)
                for device, mib in self.origin_mib.items()
            }
        self.sites[name] = {"transport": transport, **fields}
        if replicas is not None:
            self.sites[name]["replica"] = replicas
        self.write()
        return replicas or {}

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def write(self) -> None:
        lines = _table("dmrepl", {"state_dir": str(self.state_dir), **self.settings})
        lines += _table(f"group.{self.group}", self.group_fields)
        for name, fields in self.devices.items():
            lines += _table(f"group.{self.group}.device.{name}", fields)
        for name, fields in self.sites.items():
            plain = {k: v for k, v in fields.items() if not isinstance(v, dict)}
            lines += _table(f"group.{self.group}.site.{name}", plain)
            for key, value in fields.items():
                if isinstance(value, dict):
                    lines += _table(f"group.{self.group}.site.{name}.{key}", value)
        self.config.write_text("\n".join(lines))

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `dmrepl ARGS --config CONFIG` in this process and return the outcome.

        In-process because importing the CLI costs ~10 s a process in the emulated VM.
        """
        code, stdout, stderr = run_cli_here(*args, "--config", str(self.config))
        done = subprocess.CompletedProcess(["dmrepl", *args], code, stdout, stderr)
        if check and done.returncode != 0:
            raise AssertionError(
                f"dmrepl {' '.join(args)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done

    def killed_at(self, phase: str, *args: str) -> None:
        """Run `dmrepl ARGS --config CONFIG` in a process that kills itself with SIGKILL when
        the cycle reaches `phase` (tests/kernel/crashrun.py); assert it died that way."""
        killed = subprocess.run(
            [sys.executable, "-m", "tests.kernel.crashrun", phase, *args,
             "--config", str(self.config)],
            capture_output=True, text=True,
        )  # fmt: skip
        assert killed.returncode == -9, killed.stdout + killed.stderr

    def owned(self) -> list[str]:
        """dm devices of this bed's group."""
        return sorted(n for n, uuid in dm.list_owned(self.runner) if f"-{self.group}." in uuid)

    def teardown(self) -> None:
        """Remove every device of the group, top-down, whatever state it is in."""
        for _ in range(6):
            left = self.owned()
            if not left:
                return
            for name in left:
                if dm.is_suspended(self.runner, name):
                    self.runner.run_best_effort(dm.resume(name))
                self.runner.run_best_effort(dm.remove(name))


def _table(name: str, fields: dict[str, object]) -> list[str]:
    lines = [f"[{name}]"]
    for key, value in fields.items():
        if isinstance(value, list):
            rendered = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        elif isinstance(value, bool):
            rendered = str(value).lower()
        elif isinstance(value, int):
            rendered = str(value)
        else:
            rendered = f'"{value}"'
        lines.append(f"{key} = {rendered}")
    return [*lines, ""]


def dm_names(runner: Runner) -> list[str]:
    """Every dm device name (to show nothing was left behind)."""
    return sorted(dm.observe(runner).names)


def read_bytes(path: str, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)
