"""The replication cycle's decisions, as tables: observed sites and spool in, plan out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmrepl.deltafiles import DeltaFile, chain, walk
from dmrepl.replication.plan import (
    Capture,
    CyclePlan,
    Observed,
    Seed,
    SiteView,
    deliveries,
    finalize,
    plan_cycle,
    prunable,
)


def spooled(*links: tuple[int, int], size: int = 900) -> tuple[DeltaFile, ...]:
    """Chain deltas (seq, base), each `size` bytes."""
    return tuple(DeltaFile(seq, base, Path(f"/spool/{seq}"), size) for seq, base in links)


def up(name: str, cursor: int | None, **extra: bool) -> SiteView:
    return SiteView(name, True, cursor, **extra)


def down(name: str, cursor: int | None, **extra: bool) -> SiteView:
    return SiteView(name, False, cursor, **extra)


CHAIN_3_TO_5 = spooled((4, 3), (5, 4))


@dataclass(frozen=True)
class PlanCase:
    id: str
    sites: tuple[SiteView, ...]
    spool: tuple[DeltaFile, ...]
    head: int | None
    followers: tuple[str, ...] = ()
    resyncs: dict[str, int] = field(default_factory=dict)
    seeds: dict[str, Seed] = field(default_factory=dict)


PLAN_CASES = [
    PlanCase("cursor at the head", (up("dr", 5),), CHAIN_3_TO_5, head=5, followers=("dr",)),
    PlanCase("behind within the chain", (up("dr", 3),), CHAIN_3_TO_5, head=5, followers=("dr",)),
    PlanCase(
        "evicted: the chain starts after its cursor",
        (up("dr", 2), up("far", 4)),
        CHAIN_3_TO_5,
        head=5,
        followers=("far",),
        resyncs={"dr": 2},
    ),
    PlanCase(
        "a gap where a corrupt spool file was set aside",
        (up("dr", 3), up("near", 4)),
        spooled((5, 4)),
        head=5,
        followers=("near",),
        resyncs={"dr": 3},
    ),
    PlanCase(
        "base cut missing from the store: seeded by compare",
        (up("dr", 7, cursor_known=False, compare_seed=True),),
        (),
        head=None,
        seeds={"dr": Seed.COMPARE},
    ),
    PlanCase(
        "forced seed of a site at the head",
        (up("dr", 5, force_seed=True, compare_seed=True), up("vault", 5)),
        CHAIN_3_TO_5,
        head=5,
        followers=("vault",),
        seeds={"dr": Seed.COMPARE},
    ),
    PlanCase(
        "never seeded, blockdev: compare seed",
        (up("dr", None, compare_seed=True),),
        (),
        head=None,
        seeds={"dr": Seed.COMPARE},
    ),
    PlanCase(
        "never seeded, archive: a full image",
        (up("vault", None),),
        (),
        head=None,
        seeds={"vault": Seed.FULL},
    ),
    PlanCase("never seeded and down: nothing", (down("dr", None),), (), head=None),
    PlanCase(
        "a down site on the chain keeps it growing",
        (down("dr", 3), up("vault", 5)),
        CHAIN_3_TO_5,
        head=5,
        followers=("dr", "vault"),
    ),
    PlanCase(
        "a down site the chain lost waits (no resync while down)",
        (down("dr", 1), up("vault", 5)),
        CHAIN_3_TO_5,
        head=5,
        followers=("vault",),
    ),
    PlanCase(
        "spool empty, every site at the newest cut: the chain starts there",
        (up("dr", 6), up("vault", 6)),
        (),
        head=6,
        followers=("dr", "vault"),
    ),
    PlanCase(
        "spool empty, a site behind it: resync",
        (up("dr", 6), up("far", 4)),
        (),
        head=6,
        followers=("dr",),
        resyncs={"far": 4},
    ),
    PlanCase(
        "only a down site is placed: the chain is still captured for it",
        (down("dr", 6), up("vault", None)),
        (),
        head=6,
        followers=("dr",),
        seeds={"vault": Seed.FULL},
    ),
    PlanCase(
        "a site at an unknown cut that is down gets nothing",
        (down("dr", 9, cursor_known=False), up("vault", 5)),
        CHAIN_3_TO_5,
        head=5,
        followers=("vault",),
    ),
    PlanCase(
        "a site owed ranges (`reverse`) resyncs though the chain reaches it",
        (up("back", 4, owed=True), up("near", 4)),
        CHAIN_3_TO_5,
        head=5,
        followers=("near",),
        resyncs={"back": 4},
    ),
    PlanCase(
        "an owed site sets no chain head of its own",
        (up("back", 7, owed=True), up("dr", 6)),
        (),
        head=6,
        followers=("dr",),
        resyncs={"back": 7},
    ),
    PlanCase("an owed site that is down waits", (down("back", 4, owed=True),), (), head=None),
    PlanCase(
        "seed, resync and follower in one cycle",
        (up("new", None, compare_seed=True), up("far", 1), up("near", 4)),
        CHAIN_3_TO_5,
        head=5,
        followers=("near",),
        resyncs={"far": 1},
        seeds={"new": Seed.COMPARE},
    ),
]


@pytest.mark.parametrize("case", PLAN_CASES, ids=[c.id for c in PLAN_CASES])
def test_plan_cycle(case: PlanCase) -> None:
    plan = plan_cycle(Observed(case.sites, case.spool, cap_bytes=1 << 30))
    assert plan == CyclePlan(
        head=case.head,
        followers=case.followers,
        resyncs=case.resyncs,
        seeds=case.seeds,
        unreachable=tuple(s.name for s in case.sites if not s.reachable),
    )


@dataclass(frozen=True)
class FinalizeCase:
    id: str
    sites: tuple[SiteView, ...]
    spool: tuple[DeltaFile, ...]
    cap: int
    delta_bytes: int
    expected: Capture


FINALIZE_CASES = [
    FinalizeCase(
        "fits: nothing evicted",
        (up("dr", 3),),
        CHAIN_3_TO_5,
        cap=3000,
        delta_bytes=1000,
        expected=Capture(True, (), {}, False),
    ),
    FinalizeCase(
        "evicting the oldest delta makes its site resync",
        (up("dr", 3), up("near", 4)),
        CHAIN_3_TO_5,
        cap=2000,
        delta_bytes=1000,
        expected=Capture(True, CHAIN_3_TO_5[:1], {"dr": 3}, False),
    ),
    FinalizeCase(
        "a delta over the cap: no chain delta, every reachable follower resyncs",
        (up("dr", 3), up("near", 5), down("away", 4)),
        CHAIN_3_TO_5,
        cap=3000,
        delta_bytes=5000,
        expected=Capture(False, (), {"dr": 3, "near": 5}, True),
    ),
    FinalizeCase(
        "evicting the whole spool",
        (up("dr", 3), up("near", 5)),
        CHAIN_3_TO_5,
        cap=1000,
        delta_bytes=1000,
        expected=Capture(True, CHAIN_3_TO_5, {"dr": 3}, False),
    ),
]


@pytest.mark.parametrize("case", FINALIZE_CASES, ids=[c.id for c in FINALIZE_CASES])
def test_finalize(case: FinalizeCase) -> None:
    observed = Observed(case.sites, case.spool, case.cap)
    assert finalize(plan_cycle(observed), observed, case.delta_bytes) == case.expected


def test_finalize_without_a_chain_delta_keeps_the_plans_resyncs() -> None:
    observed = Observed((up("far", 1),), CHAIN_3_TO_5, 1000)
    plan = plan_cycle(observed)
    assert plan.head is None
    assert finalize(plan, observed, 10**9) == Capture(False, (), {"far": 1}, False)


OWN = (*spooled((6, 2)), DeltaFile(6, None, Path("/spool/resync/full"), 50))


@pytest.mark.parametrize(
    ("cursor", "own", "expected"),
    [
        (3, (), [4, 5]),
        (5, (), []),
        (2, (), None),
        (None, (), None),
        (2, OWN[:1], [6]),
        (None, OWN, [6]),
    ],
    ids=["chain", "at the target", "chain broken", "never seeded", "resync", "newest own"],
)
def test_deliveries(
    cursor: int | None, own: tuple[DeltaFile, ...], expected: list[int] | None
) -> None:
    steps = deliveries(cursor, 5 if not own else 6, CHAIN_3_TO_5, own)
    assert (None if steps is None else [s.seq for s in steps]) == expected
    if own:
        assert steps == [own[-1]]


@pytest.mark.parametrize(
    ("cursors", "expected"),
    [([5, 4], [4]), ([5, None], [4, 5]), ([None], []), ([], []), ([3], [])],
    ids=["oldest cursor", "unplaced ignored", "none placed", "no sites", "behind all"],
)
def test_prunable(cursors: list[int | None], expected: list[int]) -> None:
    assert [f.seq for f in prunable(CHAIN_3_TO_5, cursors)] == expected


def test_a_chain_only_walks_forward() -> None:
    """A file named as going from cut 5 back to cut 3 must not loop a walk forever."""
    looping = spooled((5, 3), (3, 5))
    assert chain(looping, 3, 7) is None
    assert [f.seq for f in walk(looping, 3)] == [5]
