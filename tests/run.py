"""The project's test command: unit tests on the host, kernel tests on a real kernel.

    python -m tests.run [--unit-only | --kernel-only] [-- extra pytest args]

Kernel tests run here when this kernel has device-mapper and we are root,
otherwise inside a VM booting Debian's kernel (dmrepl.vm). The run fails if any
test fails, if the VM cannot start, or if the kernel tier executed no test at
all: a silently skipped kernel tier must never look green.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from dmrepl import loop, vm
from dmrepl.errors import DmreplError

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Tally:
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def __add__(self, other: Tally) -> Tally:
        return Tally(
            self.passed + other.passed, self.failed + other.failed, self.skipped + other.skipped
        )

    @property
    def executed(self) -> int:
        return self.passed + self.failed


def read_junit(path: Path) -> Tally:
    """Counts from a pytest JUnit XML report (missing file: nothing ran)."""
    if not path.exists():
        return Tally()
    passed = failed = skipped = 0
    for suite in ET.parse(path).getroot().iter("testsuite"):
        tests = int(suite.get("tests", 0))
        bad = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skip = int(suite.get("skipped", 0))
        passed += tests - bad - skip
        failed += bad
        skipped += skip
    return Tally(passed, failed, skipped)


def pytest_command(tier: str, junit: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        f"tests/{tier}",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        *extra,
    ]


def run_unit(results: Path, extra: list[str]) -> tuple[Tally, list[str]]:
    junit = results / "unit.xml"
    code = subprocess.run(pytest_command("unit", junit, extra), cwd=ROOT, check=False).returncode
    return check_tier("unit", code, read_junit(junit))


def run_kernel(results: Path, extra: list[str]) -> tuple[Tally, list[str]]:
    junit = results / "kernel.xml"
    # -v: one line per test, so progress shows through the VM console as it happens.
    # --timeout: a test stuck in the kernel fails with a stack dump instead of hanging CI.
    argv = pytest_command("kernel", junit, ["-m", "kernel", "-v", "--timeout=300", *extra])
    if loop.kernel_has_device_mapper():
        print("kernel tier: this kernel has device-mapper; running here", flush=True)
        code = subprocess.run(argv, cwd=ROOT, check=False).returncode
    else:
        print("kernel tier: no device-mapper here; booting Debian's kernel in a VM", flush=True)
        try:
            code = vm.run_in_vm("PYTHONDONTWRITEBYTECODE=1 " + shlex.join(argv), rwdirs=[results])
        except DmreplError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            return Tally(), [f"the kernel tier could not start the VM: {exc.message}{hint}"]
    return check_tier("kernel", code, read_junit(junit))


def check_tier(tier: str, exit_code: int, tally: Tally) -> tuple[Tally, list[str]]:
    """Problems that make a tier red even when no test reported a failure."""
    problems = []
    if tally.executed == 0:
        problems.append(
            f"the {tier} tier executed no test (none collected, all skipped, "
            f"or the run never started; exit code {exit_code})"
        )
    elif exit_code != 0 and tally.failed == 0:
        problems.append(f"the {tier} tier exited with code {exit_code} but reported no failure")
    return tally, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.run", description=__doc__.split("\n")[0])
    parser.add_argument("--unit-only", action="store_true")
    parser.add_argument("--kernel-only", action="store_true")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    results = Path(tempfile.mkdtemp(prefix="dmrepl-results-", dir="/tmp"))
    tiers: dict[str, Tally] = {}
    problems: list[str] = []
    if not args.kernel_only:
        tiers["unit"], found = run_unit(results, args.pytest_args)
        problems += found
    if not args.unit_only:
        tiers["kernel"], found = run_kernel(results, args.pytest_args)
        problems += found
    total = Tally()
    for tier, tally in tiers.items():
        print(f"{tier} tier: {tally.passed} passed, {tally.failed} failed, {tally.skipped} skipped")
        total = total + tally
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"total: {total.passed} passed, {total.failed} failed, {total.skipped} skipped")
    return 1 if problems or total.failed else 0


if __name__ == "__main__":
    sys.exit(main())
