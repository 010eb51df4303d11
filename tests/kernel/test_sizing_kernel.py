"""dmrepl's dm-era metadata size survives the worst case on the real kernel, and smaller does not.

The stress (tests/kernel/erastress.py) holds a metadata snapshot while the era
array is rewritten twice, checkpoints and takes/drops snapshots; with too
little metadata dm-era fails writes with EIO. bench/metadata_sizing.py runs
the same stress on a bigger grid and bisects the smallest surviving size
(docs/sizing.md).
"""

from __future__ import annotations

import pytest

from dmrepl.executor import Runner
from dmrepl.sizing import SECTORS_PER_METADATA_BLOCK, era_array_blocks, metadata_size
from tests.kernel.erastress import MakeDm, MakeLoop, StressResult, stress_era

MiB = 2048  # sectors

# A few small grid points (era block sectors, origin sectors): about 25 s each in the VM.
CI_GRID = ((8192, 64 * MiB), (8, 64 * MiB))

# The smallest metadata (4 KiB blocks) that survived the stress, bisected by
# bench/metadata_sizing.py on Debian's 6.1 kernel (docs/sizing.md).
MEASURED_MINIMUM_BLOCKS = {(8, 64 * MiB): 70}


def _explain(result: StressResult) -> str:
    return f"{result.error}; used blocks by step: {result.samples}; kernel: {result.kernel_errors}"


@pytest.mark.parametrize(
    ("block_sectors", "origin_sectors"),
    CI_GRID,
    ids=[f"block{b}-origin{o // MiB}MiB" for b, o in CI_GRID],
)
def test_dmrepl_size_survives_the_worst_case(
    runner: Runner,
    make_loop: MakeLoop,
    make_dm: MakeDm,
    block_sectors: int,
    origin_sectors: int,
) -> None:
    size = metadata_size(origin_sectors, block_sectors)

    result = stress_era(
        runner, make_loop, make_dm, origin_sectors, block_sectors, size.required_sectors, say=print
    )

    assert result.ok, _explain(result)
    assert result.metadata_total_blocks == size.worst_blocks
    # The stress really reached the worst case: beside the steady state it held
    # two more copies of the era array (the snapshot's and the uncommitted rewrite).
    assert result.peak_used_blocks >= size.steady_blocks + 2 * era_array_blocks(size.era_blocks)


def test_metadata_below_the_measured_minimum_fails_with_eio(
    runner: Runner, make_loop: MakeLoop, make_dm: MakeDm
) -> None:
    block_sectors, origin_sectors = 8, 64 * MiB
    minimum = MEASURED_MINIMUM_BLOCKS[(block_sectors, origin_sectors)]
    # Well below the minimum, but above the use before the worst case (so the
    # era device is created and survives the first passes).
    blocks = minimum - max(2, minimum // 10)

    result = stress_era(
        runner,
        make_loop,
        make_dm,
        origin_sectors,
        block_sectors,
        blocks * SECTORS_PER_METADATA_BLOCK,
        say=print,
    )

    assert not result.ok
    assert result.io_error, _explain(result)
    assert result.kernel_errors, "dm-era logged no error"
    assert result.failed_step not in (None, "create", "first pass"), _explain(result)
