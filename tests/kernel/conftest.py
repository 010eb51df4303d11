"""Fixtures for real-kernel tests: loop devices and dm devices that are always torn down.

Outside a kernel with device-mapper (and as non-root) every test here is
skipped with the reason; `python -m tests.run` fails if that happens to the
whole tier.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path

import pytest

from dmrepl import dm, loop
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import probe
from tests.kernel.netlab import NetLab
from tests.kernel.stacks import Bed

REQUIRED_TARGETS = ("linear", "era", "snapshot", "mirror", "zero")


def _capability_problem() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    if not loop.kernel_has_device_mapper():
        return "this kernel has no device-mapper (run them in the VM: python -m tests.run)"
    for tool in ("dmsetup", "losetup", "era_invalidate"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    targets = Runner().run(probe("dmsetup", "targets")).stdout.split()
    missing = [t for t in REQUIRED_TARGETS if t not in targets]
    if missing:
        return f"device-mapper targets missing: {', '.join(missing)} (modprobe dm-era ...)"
    return None


@pytest.fixture(scope="session")
def kernel_ready() -> None:
    problem = _capability_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture
def runner(kernel_ready: None) -> Runner:
    return Runner(timeout_s=60)


@pytest.fixture
def workdir(kernel_ready: None) -> Iterator[Path]:
    """A scratch directory in /tmp (the guest's RAM-backed overlay)."""
    path = Path(tempfile.mkdtemp(prefix="dmrepl-kt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cleanup() -> Iterator[ExitStack]:
    """Undo stack: everything registered is undone in reverse, also when the test fails."""
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def make_loop(runner: Runner, workdir: Path, cleanup: ExitStack) -> Callable[[str, int], str]:
    """Create a sparse file of `size_bytes` and attach it; detached at teardown."""

    def make(name: str, size_bytes: int) -> str:
        path = workdir / f"{name}.img"
        loop.create_sparse_file(path, size_bytes)
        device = loop.attach(runner, path)
        cleanup.callback(runner.run_best_effort, loop.detach(device))
        return device

    return make


@pytest.fixture
def make_dm(runner: Runner, cleanup: ExitStack) -> Callable[[str, str], str]:
    """Create a dm device from a table; removed at teardown. Returns /dev/mapper/NAME."""
    prefix = f"kt{os.getpid()}-"

    def make(name: str, table: str) -> str:
        full = prefix + name
        runner.run(dm.create(full, table, uuid=f"{dm.UUID_PREFIX}test-{full}"))
        cleanup.callback(_remove_dm, runner, full)
        return dm.mapper_path(full)

    return make


def _remove_dm(runner: Runner, name: str) -> None:
    # A test may leave a device suspended; removal of a suspended device would hang on I/O.
    with suppress(CommandFailed):
        if dm.is_suspended(runner, name):
            runner.run(dm.resume(name))
    runner.run_best_effort(dm.remove(name))


@pytest.fixture
def bed(
    runner: Runner, workdir: Path, make_loop: Callable[[str, int], str], cleanup: ExitStack
) -> Bed:
    """A config over loop devices; every device of its group is removed at teardown."""
    test_bed = Bed(workdir, runner, make_loop)
    cleanup.callback(test_bed.teardown)
    return test_bed


@pytest.fixture
def netlab(kernel_ready: None) -> Iterator[NetLab]:
    """This namespace as the primary, a DR namespace over a veth pair (tests/kernel/netlab.py);
    its sshd, nbd-server and NBD devices are undone at teardown, also when the test fails."""
    with NetLab() as lab:
        yield lab
