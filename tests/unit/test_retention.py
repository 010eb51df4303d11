"""The `keep` grid of a `dir` site and the compaction planner (dmrepl.retention), pure."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl import deltafiles, retention
from dmrepl.deltafiles import DeltaFile
from dmrepl.retention import Delete, GridError, KeepRule, Merge, kept_cuts, next_step, parse_grid

H = 3600
DAY = 86400


def test_a_grid_is_read_shortest_interval_first() -> None:
    assert parse_grid(" 1d:7,1h:24 ,2w:1") == (
        KeepRule(H, 24),
        KeepRule(DAY, 7),
        KeepRule(14 * DAY, 1),
    )
    assert retention.describe(parse_grid("90m:2, 30s:10")) == "30s:10, 90m:2"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must be a string of INTERVAL:COUNT entries"),
        (24, 'must be a string of INTERVAL:COUNT entries like "1h:24, 1d:7", not 24'),
        ("1h", "entry '1h' is not INTERVAL:COUNT"),
        ("1h:24,", "entry '' is not INTERVAL:COUNT"),
        ("1y:3", "interval '1y' in '1y:3': unit y is not one of s, m, h, d, w"),
        ("5:3", "unit (none) is not one of"),
        ("h:3", "interval 'h' in 'h:3' is not a number and a unit"),
        ("0h:3", "interval '0h' in '0h:3' is zero"),
        ("1h:0", "count 0 in '1h:0' keeps nothing"),
        ("1h:-2", "count '-2' in '1h:-2' is not a whole number"),
        ("1h:24, 60m:5", "'60m:5' repeats the interval of '1h:24' (3600 s)"),
    ],
)
def test_a_bad_grid_says_what_is_wrong(text: object, problem: str) -> None:
    with pytest.raises(GridError) as caught:
        parse_grid(text)
    assert problem in str(caught.value)


def test_the_newest_cut_of_each_of_the_newest_intervals_is_kept() -> None:
    # Cuts every 20 minutes for 5 hours: 1..16, cut n at (n - 1) * 20 min.
    times = {n: (n - 1) * 1200.0 for n in range(1, 17)}
    # Hours 0..5; the newest (cut 16, 5:00) is in hour 5: 1h:3 keeps hours 3, 4, 5.
    assert kept_cuts(times, parse_grid("1h:3")) == {12, 15, 16}
    assert kept_cuts(times, parse_grid("2h:2")) == {12, 16}
    assert kept_cuts(times, parse_grid("1h:2, 2h:2")) == {12, 15, 16}
    assert kept_cuts(times, ()) == {16}
    assert kept_cuts({}, parse_grid("1h:3")) == frozenset()


def test_a_clock_that_went_back_keeps_the_newest_cut_anyway() -> None:
    assert kept_cuts({1: 7200.0, 2: 3700.0}, parse_grid("1h:1")) == {1, 2}


def file(seq: int, base: int | None, size: int = 100) -> DeltaFile:
    return DeltaFile(seq, base, Path(deltafiles.file_name("g", seq, base)), size)


def run(files: list[DeltaFile], times: dict[int, float], grid: retention.Grid) -> list[str]:
    """Carry out next_step until it says nothing more; the steps, described."""
    done = []
    for _ in range(100):
        step = next_step(files, times, grid)
        if step is None:
            return done
        if isinstance(step, Delete):
            files.remove(step.file)
            done.append(f"delete {step.file.base_seq}->{step.file.seq}")
        else:
            size = step.first.size + step.second.size
            files.append(file(step.seq, step.base_seq, size))
            done.append(f"merge {step.first.seq} into {step.base_seq}->{step.seq}")
    raise AssertionError("did not settle")


def test_a_dropped_cut_is_merged_away_smallest_first_then_its_files_deleted() -> None:
    files = [file(1, None, 1000), file(2, 1, 300), file(3, 2), file(4, 3)]
    times = {1: 0.0, 2: 10.0, 3: 20.0, 4: 30.0}
    assert run(files, times, ()) == [
        "merge 3 into 2->4",
        "delete 3->4",
        "delete 2->3",
        "merge 2 into 1->4",
        "delete 2->4",
        "delete 1->2",
        "merge 1 into None->4",
        "delete 1->4",
        "delete None->1",
    ]
    assert [(f.seq, f.base_seq) for f in files] == [(4, None)]


def test_what_a_crash_between_publish_and_deletes_left_is_deleted_first() -> None:
    files = [file(1, None), file(2, 1), file(3, 2), file(3, 1, 200)]
    times = {1: 0.0, 2: 20.0, 3: 25.0}
    grid = parse_grid("10s:3")  # keeps cut 1 (interval 0) and cut 3 (interval 2)
    assert run(files, times, grid) == ["delete 2->3", "delete 1->2"]


def test_a_delta_beyond_a_gap_is_left_alone() -> None:
    files = [file(1, None), file(2, 1), file(4, 3)]
    assert next_step(files, {1: 0.0, 2: 1.0}, parse_grid("1s:5")) is None


def test_a_newer_full_image_makes_the_older_chain_unneeded() -> None:
    files = [file(1, None), file(2, 1), file(2, None), file(3, 2)]
    step = next_step(files, {1: 0.0, 2: 10.0, 3: 20.0}, parse_grid("10s:2"))
    assert step == Delete(file(2, 1))


# -- properties: random chains, leftovers of crashes, random grids


@st.composite
def directories(draw: st.DrawFn) -> tuple[list[DeltaFile], dict[int, float], retention.Grid]:
    """A chain of cuts 1..n from a full image of cut 1, with some extra full images and
    merged deltas (as a crash leaves them), cut times that mostly go forward, and a grid."""
    n = draw(st.integers(1, 30))
    gaps = draw(st.lists(st.floats(0, 5000), min_size=n, max_size=n))
    times: dict[int, float] = {}
    at = draw(st.floats(0, 1e6))
    for seq, gap in enumerate(gaps, start=1):
        at += gap if draw(st.integers(0, 9)) else -gap / 10  # now and then the clock goes back
        times[seq] = at
    sizes = st.integers(1, 1000)
    files = [file(1, None, draw(sizes))]
    files += [file(seq, seq - 1, draw(sizes)) for seq in range(2, n + 1)]
    for seq in draw(st.sets(st.integers(2, max(2, n)), max_size=3)):
        if seq <= n:
            files.append(file(seq, None, draw(sizes)))
    for _ in range(draw(st.integers(0, 3))):
        base = draw(st.integers(1, n))
        seq = draw(st.integers(base, n))
        if base < seq and all((f.seq, f.base_seq) != (seq, base) for f in files):
            files.append(file(seq, base, draw(sizes)))
    rules = draw(
        st.lists(
            st.tuples(st.sampled_from([1, 10, 60, 600, 3600]), st.integers(1, 6)),
            max_size=3,
            unique_by=lambda rule: rule[0],
        )
    )
    return files, times, tuple(KeepRule(seconds, count) for seconds, count in rules)


def content(files: list[DeltaFile], cut: int, contents: dict[Path, frozenset[int]]) -> object:
    """What restoring `cut` by its route gives: here, which cuts' writes it holds."""
    route = deltafiles.routes(files).to(cut)
    assert route is not None, f"cut {cut} is no longer restorable"
    held: set[int] = set()
    for step in route:
        held = set(contents[step.path]) if step.base_seq is None else held | contents[step.path]
    return frozenset(held)


@settings(max_examples=300, deadline=None)
@given(directories())
def test_compaction_keeps_every_kept_cut_restorable_at_every_step(
    case: tuple[list[DeltaFile], dict[int, float], retention.Grid],
) -> None:
    files, times, grid = case
    # A file from cut b to cut s holds the writes of cuts b+1..s (a full image: 1..s).
    contents = {f.path: frozenset(range((f.base_seq or 0) + 1, f.seq + 1)) for f in files}
    kept = kept_cuts(times, grid)
    newest = max(times)
    assert newest in kept
    expected = {cut: content(files, cut, contents) for cut in kept}
    for _ in range(6 * len(files) + 2):
        step = next_step(files, times, grid)
        if step is None:
            break
        if isinstance(step, Merge):
            assert step.first.seq == step.second.base_seq
            assert step.first.seq not in kept
            made = file(step.seq, step.base_seq, step.first.size + step.second.size)
            assert made.path not in {f.path for f in files}
            contents[made.path] = contents[step.first.path] | contents[step.second.path]
            files.append(made)
        else:
            files.remove(step.file)
        # A crash here leaves these files: every kept cut restores to what it was.
        assert {cut: content(files, cut, contents) for cut in kept} == expected
    else:
        raise AssertionError("compaction did not settle")
    assert set(deltafiles.routes(files).cuts) == kept  # nothing else is left restorable
    assert len(files) == len({f.seq for f in files})  # and no file is redundant
