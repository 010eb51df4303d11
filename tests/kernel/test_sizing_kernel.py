"""dmrepl's dm-era metadata size survives the kernel's worst case, tightly; one block less does not.

The stress (tests/kernel/erastress.py) holds a metadata snapshot that pins two
archived writesets while the era array is rewritten twice, each time in one
transaction beside two more archived writesets, and marks a fresh writeset on
top; with too little metadata dm-era fails writes with EIO.
bench/metadata_sizing.py runs the same stress on a bigger grid and bisects the
smallest surviving size (docs/sizing.md).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.executor import Runner
from dmrepl.sizing import SECTORS_PER_METADATA_BLOCK, era_array_blocks, metadata_size
from tests.kernel.erastress import MakeDm, MakeLoop, StressResult, scratch_devices, stress_era

MiB = 2048  # sectors

# Bisected by bench/metadata_sizing.py on Debian's user-mode Linux 6.1.176
# (docs/sizing.md), per (era block sectors, origin sectors): the highest used
# count a status showed, and the smallest metadata that survived (4 KiB blocks).
MEASURED = {
    (8192, 64 * MiB): (25, 28),  # 16 era blocks
    (8, 64 * MiB): (73, 76),  # 16384 era blocks
    (64, 2048 * MiB): (227, 232),  # 65536 era blocks
}
# dmrepl's size may exceed the kernel's peak by at most this factor (issue 20, goal 7).
MAX_OVER_PEAK = 1.5

Devices = tuple[MakeLoop, MakeDm]


@pytest.fixture
def devices(runner: Runner, workdir: Path) -> Iterator[Devices]:
    """Loop and dm devices under names (and dm UUIDs) used by no other test.

    A run whose metadata failed leaves its era device in the kernel under
    another name (erastress._abandon): removing it can panic the kernel, and
    its UUID stays taken.
    """
    with scratch_devices(runner, workdir, f"sz{uuid.uuid4().hex[:8]}-") as made:
        yield made


def _explain(result: StressResult) -> str:
    return f"{result.error}; used blocks by step: {result.samples}; kernel: {result.kernel_errors}"


@pytest.mark.parametrize(
    ("block_sectors", "origin_sectors"),
    list(MEASURED),
    ids=[f"block{b}-origin{o // MiB}MiB" for b, o in MEASURED],
)
def test_dmrepl_size_survives_the_worst_case_and_is_tight(
    runner: Runner, devices: Devices, block_sectors: int, origin_sectors: int
) -> None:
    size = metadata_size(origin_sectors, block_sectors)
    measured_peak, measured_minimum = MEASURED[(block_sectors, origin_sectors)]

    result = stress_era(
        runner, *devices, origin_sectors, block_sectors, size.required_sectors, say=print
    )

    # Exactly dmrepl's size: were it below what the kernel needs, the run would fail.
    assert result.ok, _explain(result)
    assert result.metadata_total_blocks == size.worst_blocks
    # The stress reached the worst case: the status after the idle digest showed
    # the steady state plus two more era arrays (the snapshot's and the
    # uncommitted rewrite), and the peak the benchmark measured.
    steady_seen = result.samples[0][1]
    array_blocks = era_array_blocks(size.era_blocks)
    assert result.idle_digest_used_blocks >= steady_seen + 2 * array_blocks, _explain(result)
    assert result.peak_used_blocks >= measured_peak, _explain(result)
    # Tight: never below the bisected minimum, at most 1.5 times the peak seen now.
    assert measured_minimum <= size.worst_blocks <= MAX_OVER_PEAK * result.peak_used_blocks


def test_one_block_below_the_measured_minimum_fails_with_eio(
    runner: Runner, devices: Devices
) -> None:
    """The stress drives the kernel to the bisected minimum: passing at a size means something."""
    block_sectors, origin_sectors = 8, 64 * MiB
    _, minimum = MEASURED[(block_sectors, origin_sectors)]

    result = stress_era(
        runner,
        *devices,
        origin_sectors,
        block_sectors,
        (minimum - 1) * SECTORS_PER_METADATA_BLOCK,
        say=print,
    )

    assert not result.ok
    assert result.io_error, _explain(result)
    assert result.kernel_errors, "dm-era logged no error"
    assert result.failed_step not in (None, "create", "first pass"), _explain(result)
