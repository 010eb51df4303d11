"""Our dm-era metadata reader against era_invalidate and a model, over random histories.

Each run drives one era device (a `zero` origin: writes are discarded, dm-era
still tracks them) through a seeded random sequence of writes, `checkpoint`
messages, suspend/resume (both roll the era over), idle waits (the worker
digests archived writesets into the era array; a status read commits what it
did), and metadata snapshots taken, listed and dropped, sometimes with more
writes and rollovers while one is held. At every listing, for every era from 1
to the current one + 1:

- the reader (`dmrepl.erareader`) must list exactly what the model predicts for
  the snapshot: blocks whose last write before the take was in that era or later;
- era_invalidate 0.9.0 must list the same while nothing rolled over since the
  take. It reads the live superblock, not the snapshot (thin-provisioning-tools
  0.9.0's era/metadata.cc ignores the snapshot's location), so after a rollover
  while held it also lists what the live archived writesets add: then it must
  equal the model of everything written in the eras archived so far.

The seed is printed; DMREPL_ERAREADER_SEED replays one (when pytest runs in a guest
shell: tests.run does not pass the host's environment). While the file
tests/data/erameta/CAPTURE exists, the small run saves each snapshot's metadata image
(gzip) and its lists there, for the unit tests (tests/unit/test_erameta.py).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmrepl import dm, era, erareader
from dmrepl.eraxml import parse_era_invalidate
from dmrepl.executor import Runner
from dmrepl.ranges import Extent
from dmrepl.tables import Era, Linear, Zero, single

MiB = 2**20
BLOCK_SECTORS = 8  # 4 KiB era blocks, the smallest dm-era takes
CAPTURE_DIR = Path(__file__).parent.parent / "data" / "erameta"


@dataclass
class Model:
    """What dm-era should record: the eras each block was written in, and the current era."""

    current: int
    writes: dict[int, list[int]] = field(default_factory=dict)

    def record(self, blocks: list[int]) -> None:
        for block in blocks:
            self.writes.setdefault(block, []).append(self.current)

    def since(self, era_: int, *, before: int) -> set[int]:
        """Blocks written in an era from `era_` up to (not including) `before`."""
        return {b for b, eras in self.writes.items() if any(era_ <= e < before for e in eras)}


def _blocks(extents: list[Extent]) -> set[int]:
    return {b for x in extents for b in range(x.begin, x.end)}


class EraRig:
    """One era device over a zero origin, its metadata's read path, and a model of it."""

    def __init__(self, runner: Runner, name: str, era_dev: str, access: str, nr_blocks: int):
        self.runner, self.name, self.path, self.access = runner, name, era_dev, access
        self.nr_blocks = nr_blocks
        self.model = Model(current=self.status().current_era)
        self.compared_eras = 0
        self.snapshots = 0

    def status(self) -> era.EraStatus:
        return era.read_status(self.runner, self.name, checked=False)

    def check_era(self) -> None:
        assert self.status().current_era == self.model.current

    def write(self, blocks: list[int]) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for block in blocks:
                os.pwrite(fd, b"\x5a" * 512, block * BLOCK_SECTORS * 512)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.model.record(blocks)

    def message(self, text: str) -> None:
        self.runner.run(dm.message(self.name, text))

    def rollover(self, how: str) -> None:
        if how == "checkpoint":
            self.message("checkpoint")
        else:
            self.runner.run(dm.suspend(self.name))
            self.runner.run(dm.resume(self.name))
        self.model.current += 1
        self.check_era()


def _era_invalidate(access: str, since: int) -> list[Extent]:
    """era_invalidate's list, by a bare subprocess (through the Runner, sh costs more here)."""
    argv = ["era_invalidate", "--metadata-snapshot", "--written-since", str(since), access]
    done = subprocess.run(argv, capture_output=True, text=True, check=True)
    return list(parse_era_invalidate([done.stdout]))


def _random_blocks(rng: random.Random, nr_blocks: int) -> list[int]:
    """A few blocks: scattered, a run, or the edges (block 0, the last block)."""
    shape = rng.random()
    if shape < 0.5:
        return [rng.randrange(nr_blocks) for _ in range(rng.randint(1, 12))]
    if shape < 0.85:
        start = rng.randrange(nr_blocks)
        return list(range(start, min(nr_blocks, start + rng.randint(2, 300))))
    return [0, nr_blocks - 1, rng.randrange(nr_blocks)]


def _compare(rig: EraRig, snap_before: int, rolled_since_take: int, capture: Path | None) -> None:
    """List the held snapshot for every era 1 .. current + 1 by both means; check the model."""
    current = rig.status().current_era
    started = time.monotonic()
    expected_lists: dict[int, list[list[int]]] = {}
    for since in range(1, current + 2):
        mine = _blocks(erareader.written_since(rig.access, since))
        tool = _blocks(_era_invalidate(rig.access, since))
        expected = rig.model.since(since, before=snap_before)
        assert mine == expected, f"reader, era {since}: {sorted(mine ^ expected)[:20]}"
        if rolled_since_take:
            live = rig.model.since(since, before=current)
            assert tool == live, f"era_invalidate (live), era {since}: {sorted(tool ^ live)[:20]}"
            assert mine <= tool
        else:
            assert tool == mine, f"era_invalidate, era {since}: {sorted(tool ^ mine)[:20]}"
        expected_lists[since] = [
            [x.begin, x.end] for x in erareader.written_since(rig.access, since)
        ]
        rig.compared_eras += 1
    print(
        f"snapshot {rig.snapshots}, {rolled_since_take} rollovers since the take: "
        f"eras 1..{current + 1} compared in {time.monotonic() - started:.1f} s"
    )
    if capture is not None:
        stem = capture / f"{rig.name}-snap{rig.snapshots}"
        with open(rig.access, "rb") as src, gzip.open(f"{stem}.img.gz", "wb", 9) as dst:
            dst.write(src.read())
        Path(f"{stem}.json").write_text(json.dumps({"written_since": expected_lists}))


HISTORY_BUDGET_S = 120.0  # a loaded guest lists slowly: stop early, within pytest's 300 s


def _history(rig: EraRig, rng: random.Random, steps: int, capture: Path | None) -> None:
    deadline = time.monotonic() + HISTORY_BUDGET_S
    for _ in range(steps):
        if time.monotonic() > deadline:
            print("history cut short by its time budget")
            break
        action = rng.choices(
            ["write", "checkpoint", "suspend", "idle", "snapshot"], [5, 2, 1, 1, 2]
        )[0]
        if action == "write":
            rig.write(_random_blocks(rng, rig.nr_blocks))
        elif action in ("checkpoint", "suspend"):
            rig.rollover(action)
        elif action == "idle":
            time.sleep(rng.choice((0.2, 1.0, 3.0)))  # let the worker digest
            rig.status()  # an rpc: commits what the digest did
        else:
            _snapshot(rig, rng, capture)


def _snapshot(rig: EraRig, rng: random.Random, capture: Path | None) -> None:
    rig.message("take_metadata_snap")
    rig.model.current += 1  # the take rolls the era over
    rig.check_era()
    rig.snapshots += 1
    taken_at = rig.model.current  # the snapshot holds every era before this one
    rolled = 0
    try:
        _compare(rig, taken_at, rolled, capture)
        for _ in range(rng.randint(0, 2)):  # life goes on while the snapshot is held
            if rng.random() < 0.6:
                rig.write(_random_blocks(rng, rig.nr_blocks))
            else:
                rig.rollover(rng.choice(("checkpoint", "suspend")))
                rolled += 1
            if rng.random() < 0.3:
                time.sleep(1.0)
            _compare(rig, taken_at, rolled, None)
    finally:
        rig.message("drop_metadata_snap")


@pytest.mark.parametrize(
    ("nr_blocks", "steps"),
    [(5_000, 30), (300_003, 40)],  # 5 era-array blocks; 295 (a btree with an internal node)
    ids=["small", "large"],
)
def test_reader_matches_era_invalidate(
    runner: Runner,
    make_loop: Callable[[str, int], str],
    make_dm: Callable[[str, str], str],
    nr_blocks: int,
    steps: int,
) -> None:
    seed = int(os.environ.get("DMREPL_ERAREADER_SEED", "0")) or random.randrange(1, 2**31)
    print(f"seed {seed} (DMREPL_ERAREADER_SEED={seed} replays it)")
    rng = random.Random(seed)
    capture = CAPTURE_DIR if (CAPTURE_DIR / "CAPTURE").exists() and nr_blocks < 10_000 else None

    origin_sectors = nr_blocks * BLOCK_SECTORS - rng.choice((0, 3))  # a partial last block
    meta_loop = make_loop("meta", 32 * MiB)
    meta_sectors = 32 * MiB // 512
    origin = make_dm("origin", single(origin_sectors, Zero()))
    meta = make_dm("meta", single(meta_sectors, Linear(meta_loop, 0)))
    era_dev = make_dm("era", single(origin_sectors, Era(meta, origin, BLOCK_SECTORS)))
    access = make_dm("access", single(meta_sectors, Linear(meta, 0)))
    rig = EraRig(runner, os.path.basename(era_dev), era_dev, access, nr_blocks)

    _history(rig, rng, steps, capture)
    _snapshot(rig, rng, capture)  # at least one, at the end
    print(f"seed {seed}: {rig.snapshots} snapshots, {rig.compared_eras} eras compared")
    assert rig.compared_eras > 0
