"""The test bed works end to end: era tracking on loop devices, read through a metadata snapshot."""

from __future__ import annotations

import os
from collections.abc import Callable

from dmrepl import era, loop
from dmrepl.demo import write_random
from dmrepl.executor import Runner
from dmrepl.ranges import Extent
from dmrepl.tables import Era, Linear, single

MiB = 2**20
BLOCK = 128  # era block: 128 sectors = 64 KiB


def test_written_since_lists_exact_blocks(
    runner: Runner, make_loop: Callable[[str, int], str], make_dm: Callable[[str, str], str]
) -> None:
    origin = make_loop("origin", 64 * MiB + 4096)  # not a multiple of the era block
    meta_loop = make_loop("meta", 8 * MiB)
    origin_sectors = loop.device_sectors(runner, origin)
    meta_sectors = loop.device_sectors(runner, meta_loop)

    meta = make_dm("meta", single(meta_sectors, Linear(meta_loop, 0)))
    era_dev = make_dm("era", single(origin_sectors, Era(meta, origin, BLOCK)))
    gate = make_dm("gate", single(origin_sectors, Linear(era_dev, 0)))
    access = make_dm("access", single(meta_sectors, Linear(meta, 0)))
    era_name = os.path.basename(era_dev)

    start = era.read_status(runner, era_name)
    assert start.held_root is None
    last_block = (origin_sectors - 1) // BLOCK

    write_random(gate, (3 * BLOCK + 5) * 512, 512)  # one sector inside block 3
    write_random(gate, (10 * BLOCK) * 512, 3 * BLOCK * 512)  # blocks 10, 11, 12 exactly
    write_random(gate, (origin_sectors - 1) * 512, 512)  # last sector of the partial last block

    with era.metadata_snapshot(runner, era_name) as held:
        assert held.held_root is not None
        assert held.current_era == start.current_era + 1
        changed = era.written_since(runner, access, start.current_era)
        after_take = era.written_since(runner, access, held.current_era)

    assert changed == [Extent(3, 4), Extent(10, 13), Extent(last_block, last_block + 1)]
    assert after_take == []
    assert era.read_status(runner, era_name).held_root is None
