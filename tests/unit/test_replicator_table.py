"""dm-replicator tables: every table from the seeds imports; malformed ones are refused with
the token and its position; export and import again give the same config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dmrepl.config import parse_config
from dmrepl.errors import ExitCode
from dmrepl.replicator_table import TableError, export_tables, import_table, parse_tables

DATA = Path(__file__).resolve().parent.parent / "data" / "replicator"
TABLES = sorted(DATA.glob("*.table"))
PATH = Path("/etc/dmrepl/imported.toml")


def test_fixtures_are_there() -> None:
    assert {p.name for p in TABLES} >= {
        "paper-1ld-1rd.table",
        "paper-2sites.table",
        "paper-2devices.table",
        "slides-1ld-1rd.table",
        "slides-2nd-ld.table",
    }


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
def test_every_table_imports_and_parses(table: Path) -> None:
    text = import_table(table.read_text(), "g", table.name)
    config = parse_config(text, PATH)
    assert config.groups["g"].devices


def test_paper_example_values() -> None:
    text = import_table((DATA / "paper-2devices.table").read_text(), "db", "paper")
    raw = tomllib.loads(text)["group"]["db"]
    assert raw["spool_size"] == "2097152s"
    assert raw["device"]["lvol0"]["origin"] == "/dev/vg00/lvol0"
    assert raw["device"]["lvol1"]["origin"] == "/dev/vg00/lvol1"
    site = raw["site"]["slink1"]
    assert site["transport"] == "blockdev" and site["policy"] == "asynchronous"
    assert site["replica"] == {"lvol0": "/dev/sdc", "lvol1": "/dev/sdd"}
    assert "ios=100" in text and "core dirty log region 2048 sectors nosync" in text
    assert "replication log on /dev/vg00/replog" in text


def test_slides_quirks_are_noted() -> None:
    text = import_table((DATA / "slides-2nd-ld.table").read_text(), "g", "slides")
    assert "the log counts 4 parameters but gives 3" in text
    assert "site link 1 counts 2 parameters but gives 3" in text
    raw = tomllib.loads(text)["group"]["g"]
    assert raw["site"]["slink1"]["replica"] == {"lvol1": "/dev/remote_vg/lvol1"}
    assert "/dev/local_vg/slink1_lvol1_dirty_log region 16384" in text


def test_policies_and_fallbehind_spellings() -> None:
    rep = parse_tables((DATA / "patches-fallbehind.table").read_text())
    assert rep.links[1].fallbehind is not None and rep.links[1].fallbehind.kind == "size"
    assert rep.links[2].fallbehind is not None and rep.links[2].fallbehind.value == "64m"
    assert rep.links[3].fallbehind is not None and rep.links[3].fallbehind.kind == "timeout"
    assert rep.links[4].policy == ("stall",)
    lvm2 = parse_tables((DATA / "patches-lvm2.table").read_text())
    assert lvm2.links[0].policy == ("synchronous",)
    assert lvm2.devices[1][1].dirty_log.device == "/dev/vg/lv1_slog"


def test_synchronous_remote_link_is_a_synchronous_site() -> None:
    table = (
        "0 8 replicator ringbuffer 2 /dev/r 0 blockdev 1 0 blockdev 2 1 sync\n"
        "0 8 replicator-dev /dev/mapper/r 0 0 1 /dev/a nolog 0 1 1 /dev/b core 1 8\n"
    )
    text = import_table(table, "g", "t")
    assert 'policy = "synchronous"' in text
    group = parse_config(text, PATH).groups["g"]
    assert group.site("slink1").policy == "synchronous"
    assert [device.sync_replicas for device in group.devices] == [("/dev/b",)]


GOOD = "0 8 replicator default 4 /dev/r 0 auto 64 local 2 0 async 2 0 /dev/a - 0 "
BAD = [
    # (table, token number, token text, words of the message)
    ("0 8 replicator default 4 /dev/r 0 auto", 8, "auto", "ends"),
    ("0 8 replicator journal 2 /dev/r 0 local 1 0", 4, "journal", "unknown replication log"),
    ("0 8 replicator default 4 /dev/r 0 auto 12q local 1 0", 9, "12q", "whole number"),
    ("0 8 replicator default 9 /dev/r 0 local 1 0", 5, "9", "2 to 4"),
    ("0 8 replicator default 2 /dev/r 0 local 2 1 async", 8, "local", "must be 0"),
    (GOOD + "local 3 1 async ios=x 2 0 /dev/b core 1 8", 23, "ios", "not a number"),
    (GOOD + "local 4 1 async bytes 9 2 0 /dev/b core 1 8", 23, "bytes", "fall-behind"),
    (GOOD + "local 2 1 s 2 0 /dev/b core 1 8", 22, "s", "ambiguous policy"),
    (GOOD + "local 2 1 async 2 0 /dev/b mirror 1 8", 26, "mirror", "unknown dirty log"),
    (GOOD + "local 2 1 async 2 0 /dev/b core 3 8", 27, "3", "1 or 2"),
    (GOOD + "local 2 1 async 2 0 /dev/b core 2 8 maybe", 29, "maybe", "sync or nosync"),
    (GOOD + "local 2 1 async 3 0 /dev/b core 1 8", 23, "3", "2 parameters"),
    (GOOD + "local 3 1 async 2 0 /dev/b core 1 8", 23, "2", "ios=100"),
    ("mirror core 1 1024", 1, "mirror", "expected a table"),
    (
        "0 8 replicator ringbuffer 2 /dev/r 0 blockdev 1 0\n"
        "0 8 replicator-dev /dev/mapper/r 0 0 1 /dev/a nolog 0 7 1 /dev/b core 1 8",
        11,
        "7",
        "no site link 7",
    ),
]


@pytest.mark.parametrize(("table", "index", "token", "words"), BAD)
def test_malformed_tables_name_token_and_position(
    table: str, index: int, token: str, words: str
) -> None:
    with pytest.raises(TableError) as caught:
        import_table(table, "g", "t")
    assert caught.value.exit_code == ExitCode.INVALID_INPUT
    assert f"token {index} {token!r}" in caught.value.message
    assert words in caught.value.message


def test_position_gives_line_and_column() -> None:
    with pytest.raises(TableError) as caught:
        import_table("0 8 replicator \\\n  default 4 /dev/r 0 auto 12q\n", "g", "t")
    assert "(line 2, column 27)" in caught.value.message


ROUND_TRIP = [p for p in TABLES if "stall" not in p.read_text()]


@pytest.mark.parametrize("table", ROUND_TRIP, ids=lambda p: p.name)
def test_export_round_trip(table: Path) -> None:
    first = import_table(table.read_text(), "g", "first")
    config = parse_config(first, PATH)
    exported = export_tables(config.groups["g"], str(config.state_dir), {})
    second = import_table(exported, "g", "second")
    again = parse_config(second, PATH)
    assert again.groups == config.groups
    if "spool_size" in first:  # a log without a size leaves dmrepl's default spool
        assert tomllib.loads(second) == tomllib.loads(first)
    assert export_tables(again.groups["g"], str(again.state_dir), {}) == exported
