"""Failback's pure parts and records: the demotion record, the role guard, the ranges a
site is owed, and the checks `reverse` makes before it touches anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dmrepl import roles
from dmrepl.config import Config, parse_config
from dmrepl.errors import ExitCode, InvalidInput
from dmrepl.executor import Runner
from dmrepl.failback import _check_record, reverse
from dmrepl.ranges import Extent, union
from dmrepl.replication.cycle import checked_request
from dmrepl.roles import Demotion, NotPrimary
from dmrepl.state import CutRecord, StateStore
from dmrepl.statedir import StateDir

DEMOTED = Demotion(
    group="db", site="dr", cut=7, reason="failover", devices={"data": 2048},
    discarded={"data": [Extent(0, 128), Extent(512, 640)]}, saved="/s/x", time=1.5,
)  # fmt: skip


def primary(tmp_path: Path) -> Config:
    path = tmp_path / "dmrepl.toml"
    path.write_text(
        "\n".join([
            "[dmrepl]", f'state_dir = "{tmp_path / "state"}"',
            "[group.db.device.data]", 'origin = "/dev/vdy"', 'metadata = "/dev/vdz"',
            "[group.db.site.dr]", 'transport = "dir"', f'path = "{tmp_path / "dr"}"',
        ]) + "\n"
    )  # fmt: skip
    return parse_config(path.read_text(), path)


def test_a_demotion_record_survives_json_and_counts_its_bytes() -> None:
    doc = json.loads(json.dumps(DEMOTED.to_json()))
    assert Demotion.from_json(doc, "x") == DEMOTED
    assert doc["discarded_bytes"] == DEMOTED.discarded_bytes == 256 * 512


@pytest.mark.parametrize(
    "doc",
    [[], {"group": "db"}, DEMOTED.to_json() | {"cut": "seven"},
     DEMOTED.to_json() | {"discarded": {"data": [[5, 1]]}}],
    ids=["not an object", "fields missing", "cut not a number", "an empty range"],
)  # fmt: skip
def test_a_record_that_does_not_fit_is_refused_by_name(doc: object) -> None:
    with pytest.raises(InvalidInput, match=r"record\.json is not a demotion record"):
        Demotion.from_json(doc, "record.json")


def test_a_demoted_group_is_not_replicated_or_brought_up_here(tmp_path: Path) -> None:
    config = primary(tmp_path)
    roles.record_demotion(config, DEMOTED)
    with pytest.raises(NotPrimary, match="demoted on this host at cut 7") as refused:
        checked_request(config, "db", ())
    assert refused.value.exit_code == ExitCode.NOT_PRIMARY == 20
    assert roles.demotion(config, "db") == DEMOTED  # (checked before the devices)


def test_demotion_takes_back_a_promotion_record(tmp_path: Path) -> None:
    config = primary(tmp_path)
    state = StateDir(config.state_dir)
    roles.write_record(state, state.promoted("db"), {"cut": 3})
    assert roles.promoted_cut(config, "db") == 3
    roles.record_demotion(config, DEMOTED)
    assert roles.promoted_cut(config, "db") is None


def test_owed_ranges_are_kept_until_paid_and_a_new_history_forgets_the_old(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path)
    try:
        store.record_cut("db", {"data": 4}, 0.1, seq=9)
        store.set_cursor("db", "back", 9)
        store.owe("db", "back", DEMOTED.discarded)
        store.owe("db", "other", {"data": [Extent(1, 2)]})
        assert store.owed("db", "back") == DEMOTED.discarded
        store.paid("db", "back")
        assert store.owed("db", "back") == {}
        assert store.owed("db", "other") == {"data": [Extent(1, 2)]}
        store.new_epoch("db", CutRecord("db", 12, 5.0, 0.0, {"data": 1}))
        assert [c.seq for c in store.cuts("db")] == [12]
        assert store.cut("db", 12) == CutRecord("db", 12, 5.0, 0.0, {"data": 1})
        assert store.site("db", "back") is None and store.owed("db", "other") == {}
        assert store.next_cut_seq("db") == 13
    finally:
        store.close()


def test_union_merges_overlapping_and_touching_ranges() -> None:
    assert union([Extent(0, 4), Extent(10, 12)], [Extent(3, 6), Extent(12, 13)]) == [
        Extent(0, 6), Extent(10, 13),
    ]  # fmt: skip
    assert union() == []


@pytest.mark.parametrize(
    ("record", "devices", "message"),
    [
        (DEMOTED.to_json() | {"group": "web"}, {"data": 2048}, "of group web, not db"),
        (DEMOTED.to_json() | {"cut": 9}, {"data": 2048}, "after cut 8 at which db was promoted"),
        (DEMOTED.to_json(), {"data": 4096}, "has 2048 sectors; here 4096"),
        (DEMOTED.to_json(), {"logs": 2048}, "here no such device"),
        (DEMOTED.to_json() | {"devices": {}}, {"data": 512}, "ranges of data lie outside"),
    ],
    ids=["another group", "a cut after the promotion", "another size", "another device",
         "ranges past the end"],
)  # fmt: skip
def test_reverse_checks_the_record_before_touching_anything(
    record: dict[str, object], devices: dict[str, int], message: str
) -> None:
    with pytest.raises(InvalidInput, match=message):
        _check_record(Demotion.from_json(record, "r"), "db", 8, devices)
    _check_record(DEMOTED, "db", 8, {"data": 2048})  # the record as written fits


def test_reverse_needs_a_group_promoted_here(tmp_path: Path) -> None:
    config = primary(tmp_path)
    with pytest.raises(InvalidInput, match="was not promoted on this host"):
        reverse(Runner(), config, "db", "dr", tmp_path / "r.json", print)
    with pytest.raises(InvalidInput, match="has no site 'nope'"):
        reverse(Runner(), config, "db", "nope", tmp_path / "r.json", print)
