"""Cut records and the era arithmetic of `changes` (pure: SQLite in a temp dir)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl.changes import _since
from dmrepl.errors import InvalidInput
from dmrepl.state import StateStore


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(tmp_path / "state")


def test_cuts_are_numbered_per_group(store: StateStore) -> None:
    first = store.record_cut("db", {"a": 4, "b": 9}, 0.002)
    second = store.record_cut("db", {"a": 5, "b": 10}, 0.003)
    other = store.record_cut("web", {"w": 2}, 0.001)
    assert (first.seq, second.seq, other.seq) == (1, 2, 1)
    assert [c.seq for c in store.cuts("db")] == [2, 1]
    recorded = store.cut("db", 1)
    assert recorded is not None and recorded.eras == {"a": 4, "b": 9}
    assert recorded.stall_s == pytest.approx(0.002)
    assert store.cut("db", 7) is None


def test_since_a_cut_is_the_era_after_it(store: StateStore) -> None:
    store.record_cut("db", {"a": 4, "b": 9}, 0.0)
    since, label = _since(store, "db", ["a", "b"], since_cut=1, since_era=None)
    assert since == {"a": 5, "b": 10} and label == "cut 1"


def test_default_is_the_previous_cut_or_the_beginning(store: StateStore) -> None:
    assert _since(store, "db", ["a"], None, None) == ({"a": 1}, "tracking began")
    store.record_cut("db", {"a": 4}, 0.0)
    store.record_cut("db", {"a": 6}, 0.0)
    since, label = _since(store, "db", ["a", "new"], None, None)
    assert since == {"a": 7, "new": 1}  # a device added after the cut: since tracking began
    assert label.startswith("cut 2")


def test_since_era_and_bad_requests(store: StateStore) -> None:
    assert _since(store, "db", ["a", "b"], None, 3) == ({"a": 3, "b": 3}, "era 3")
    with pytest.raises(InvalidInput, match="eras start at 1"):
        _since(store, "db", ["a"], None, 0)
    store.record_cut("db", {"a": 4}, 0.0)
    with pytest.raises(InvalidInput, match="has no cut 5") as caught:
        _since(store, "db", ["a"], 5, None)
    assert caught.value.hint == "recorded cuts: 1"
