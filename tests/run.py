"""The project's test command: unit tests on the host, kernel tests on a real kernel.

    python -m tests.run [--unit-only | --kernel-only] [-- extra pytest args]

Kernel tests run here when this kernel has device-mapper and we are root,
otherwise in guest kernels (dmrepl.vm: user-mode Linux unless DMREPL_VM=qemu),
spread over one guest per core with the recorded test times
(tests/kernel/durations.json). The run fails if any test fails, if a guest
cannot start, or if the kernel tier executed no test at all: a silently skipped
kernel tier must never look green.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dmrepl import loop, vm
from dmrepl.errors import DmreplError

ROOT = Path(__file__).resolve().parent.parent
DURATIONS = ROOT / "tests/kernel/durations.json"


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


def collect(tier: str, extra: list[str]) -> list[str]:
    """Node IDs of the tier's tests that `extra` selects (collected here, run anywhere)."""
    done = subprocess.run(
        [*pytest_command(tier, Path(os.devnull), extra), "--collect-only", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    return [line.strip() for line in done.stdout.splitlines() if "::" in line]


def load_durations(path: Path = DURATIONS) -> dict[str, float]:
    """Seconds each kernel test took when last recorded (tests/kernel/durations.json)."""
    try:
        return {str(k): float(v) for k, v in json.loads(path.read_text()).items()}
    except (OSError, ValueError):
        return {}


def plan_shards(tests: list[str], durations: dict[str, float], count: int) -> list[list[str]]:
    """Split tests over `count` guests so each gets about the same time (longest first).

    A test without a recorded duration counts as the median of those with one.
    """
    known = sorted(durations.values())
    default = known[len(known) // 2] if known else 1.0
    shards: list[list[str]] = [[] for _ in range(max(1, count))]
    loads = [0.0] * len(shards)
    for test in sorted(tests, key=lambda t: (-durations.get(t, default), t)):
        lightest = loads.index(min(loads))
        shards[lightest].append(test)
        loads[lightest] += durations.get(test, default)
    return [shard for shard in shards if shard]


def junit_durations(path: Path) -> dict[str, float]:
    """Node ID -> seconds, from a pytest JUnit XML report."""
    found: dict[str, float] = {}
    if not path.exists():
        return found
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        for cut in range(len(parts), 0, -1):  # the longest prefix that is a file is the module
            if (ROOT / Path(*parts[:cut])).with_suffix(".py").exists():
                nodeid = "::".join(["/".join(parts[:cut]) + ".py", *parts[cut:]])
                found[f"{nodeid}::{case.get('name')}"] = float(case.get("time", 0))
                break
    return found


def record_durations(results: Path, path: Path = DURATIONS) -> None:
    """Merge the kernel tests' times from this run's reports into the durations file."""
    durations = load_durations(path)
    for report in sorted(results.glob("kernel*.xml")):
        durations.update(junit_durations(report))
    rounded = {test: round(seconds, 1) for test, seconds in sorted(durations.items())}
    path.write_text(json.dumps(rounded, indent=1) + "\n")


def shard_count() -> int:
    """Guests to spread the kernel tier over: DMREPL_KERNEL_SHARDS, else one per core (max 2)."""
    configured = os.environ.get("DMREPL_KERNEL_SHARDS", "")
    if configured.isdigit() and int(configured) > 0:
        return int(configured)
    return min(os.cpu_count() or 1, 2)


def run_kernel(results: Path, extra: list[str]) -> tuple[Tally, list[str]]:
    # -v: one line per test, so progress shows through the guest console as it happens.
    # --timeout: a test stuck in the kernel fails with a stack dump instead of hanging CI.
    options = ["-m", "kernel", "-v", "--timeout=300", *extra]
    if loop.kernel_has_device_mapper():
        print("kernel tier: this kernel has device-mapper; running here", flush=True)
        junit = results / "kernel.xml"
        code = subprocess.run(pytest_command("kernel", junit, options), cwd=ROOT).returncode
        return check_tier("kernel", code, read_junit(junit))
    tests = collect("kernel", ["-m", "kernel", *extra])
    if not tests:
        return check_tier("kernel", 5, Tally())
    shards = plan_shards(tests, load_durations(), shard_count())
    print(
        f"kernel tier: no device-mapper here; {len(tests)} tests in {len(shards)} "
        f"{vm.backend()} guest(s)",
        flush=True,
    )
    with ThreadPoolExecutor(max_workers=len(shards)) as pool:
        jobs = [(results, options, number, shard) for number, shard in enumerate(shards, 1)]
        runs = list(pool.map(lambda job: _run_shard(*job), jobs))
    tally, problems, codes = Tally(), [], []
    for junit, code, problem in runs:
        tally = tally + read_junit(junit)
        codes.append(code)
        problems += [problem] if problem else []
    if problems:
        return tally, problems
    return check_tier("kernel", max(codes, key=abs), tally)


def _run_shard(
    results: Path, options: list[str], number: int, tests: list[str]
) -> tuple[Path, int, str | None]:
    """Run some kernel tests in one guest; (JUnit report, exit code, why it could not run)."""
    junit = results / f"kernel-{number}.xml"
    argv = pytest_command("kernel", junit, options)
    argv = [arg for arg in argv if arg != "tests/kernel"] + tests

    def show(line: str) -> None:
        sys.stdout.write(f"[guest {number}] {line}")
        sys.stdout.flush()

    try:
        code = vm.run_in_vm(
            "PYTHONDONTWRITEBYTECODE=1 " + shlex.join(argv), rwdirs=[results], sink=show
        )
    except DmreplError as exc:
        hint = f" ({exc.hint})" if exc.hint else ""
        context = f"\n{exc.context}" if exc.context else ""
        return junit, -1, f"the kernel tier could not start the VM: {exc.message}{hint}{context}"
    return junit, code, None


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
    parser.add_argument(
        "--record-durations",
        action="store_true",
        help="write each kernel test's time to tests/kernel/durations.json (shard planning)",
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    results = Path(tempfile.mkdtemp(prefix="dmrepl-results-", dir="/tmp"))
    tiers: dict[str, Tally] = {}
    problems: list[str] = []
    seconds: dict[str, float] = {}
    for tier, skip, run_tier in (
        ("unit", args.kernel_only, run_unit),
        ("kernel", args.unit_only, run_kernel),
    ):
        if skip:
            continue
        started = time.monotonic()
        tiers[tier], found = run_tier(results, args.pytest_args)
        seconds[tier] = time.monotonic() - started
        problems += found
    if args.record_durations:
        record_durations(results)
    total = Tally()
    for tier, tally in tiers.items():
        print(
            f"{tier} tier: {tally.passed} passed, {tally.failed} failed, "
            f"{tally.skipped} skipped in {seconds[tier]:.0f} s"
        )
        total = total + tally
    for problem in problems:
        print(f"FAIL: {problem}")
    print(f"total: {total.passed} passed, {total.failed} failed, {total.skipped} skipped")
    return 1 if problems or total.failed else 0


if __name__ == "__main__":
    sys.exit(main())
