"""dm-replicator tables: every table from the seeds imports; malformed ones are refused with
the token and its position; export and import again give the same config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dmrepl.config import parse_config
from dmrepl.errors import ExitCode
from dmrepl.policy import FallBehind
from dmrepl.replicator_table import TableError, export_tables, import_table, parse_tables
from tests.clirun import run_cli_here

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
    assert site["fall_behind"] == {"ios": 100}
    assert "ios=100" in text and "core dirty log region 2048 sectors nosync" in text
    assert "replication log on /dev/vg00/replog" in text


def test_slides_quirks_are_noted() -> None:
    text = import_table((DATA / "slides-2nd-ld.table").read_text(), "g", "slides")
    assert "the log counts 4 parameters but gives 3" in text
    assert "site link 1 counts 2 parameters but gives 3" in text
    raw = tomllib.loads(text)["group"]["g"]
    assert raw["site"]["slink1"]["replica"] == {"lvol1": "/dev/remote_vg/lvol1"}
    assert raw["site"]["slink1"]["fall_behind"] == {"ios": 100}
    assert "site link 0 (`local`, asynchronous, ios=0) is this host" in text
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
    text = import_table((DATA / "patches-fallbehind.table").read_text(), "g", "t")
    sites = parse_config(text, PATH).groups["g"].sites
    assert [(site.policy, site.fall_behind) for site in sites] == [
        ("asynchronous", FallBehind(bytes=100 * 512)),  # data 100: sectors
        ("asynchronous", FallBehind(bytes=64 * 2**20)),
        ("asynchronous", FallBehind(seconds=30.0)),
        ("stall", FallBehind()),
    ]
    assert "dmrepl holds them for at most stall_limit" in _prose(text)


# (threshold as the table gives it, `fall_behind` of the imported site; None: no limit)
THRESHOLDS = [
    ("ios 100", {"ios": 100}),
    ("ios 0", None),
    ("size 100", {"size": "50KiB"}),  # a bare size counts 512-byte sectors
    ("size 1s", {"size": "1s"}),
    ("size 3k", {"size": "3KiB"}),
    ("size 64M", {"size": "64MiB"}),
    ("data 2g", {"size": "2GiB"}),
    ("size 3t", {"size": "3TiB"}),
    ("size 1p", {"size": "1PiB"}),
    ("size 8e", {"size": "8EiB"}),
    ("size 2049", {"size": "2049s"}),
    ("size 0", None),
    ("timeout 30s", {"timeout": "30s"}),
    ("timeout 1500t", {"timeout": "1.5s"}),
    ("timeout 1000", {"timeout": "1s"}),  # a bare timeout counts milliseconds
    ("timeout 90S", {"timeout": "90s"}),
    ("timeout 120s", {"timeout": "2m"}),
    ("timeout 5m", {"timeout": "5m"}),
    ("timeout 1h", {"timeout": "1h"}),
    ("timeout 1d", {"timeout": "24h"}),
    ("timeout 0", None),
]


def _prose(text: str) -> str:
    """The imported file with its wrapped comments joined, and spaces collapsed."""
    return " ".join(text.replace("\n#   ", " ").split())


def _one_link(threshold: str, policy: str = "async") -> str:
    count = 3 if "=" in threshold else 4
    return (
        f"0 8 replicator ringbuffer 2 /dev/r 0 blockdev 1 0 blockdev {count} 1 {policy} "
        f"{threshold}\n0 8 replicator-dev /dev/mapper/r 0 0 1 /dev/a nolog 0 1 1 /dev/b nolog 0\n"
    )


@pytest.mark.parametrize(("threshold", "fall_behind"), THRESHOLDS)
def test_thresholds_become_fall_behind(threshold: str, fall_behind: dict[str, object]) -> None:
    text = import_table(_one_link(threshold), "g", "t")
    site = tomllib.loads(text)["group"]["g"]["site"]["slink1"]
    assert site.get("fall_behind") == fall_behind
    parse_config(text, PATH)  # dmrepl takes it
    if fall_behind is None:
        assert "0 is no threshold in dm-replicator" in _prose(text)


def test_ios_0_on_a_remote_link_is_no_limit() -> None:
    """dm-replicator skips a threshold of 0: `ios=0` leaves the link fully asynchronous, while
    dmrepl's `ios = 0` would hold writers whenever a write is behind, so it is not written."""
    text = import_table(_one_link("ios=0"), "g", "t")
    assert parse_config(text, PATH).groups["g"].site("slink1").fall_behind == FallBehind()
    assert "dmrepl's `ios = 0` would hold writers whenever a write is behind" in _prose(text)


@pytest.mark.parametrize(
    ("threshold", "nearest", "why"),
    [
        ("timeout 500", '{ timeout = "1s" }', "shorter than dmrepl's timeouts (1s to 24h)"),
        ("timeout 999t", '{ timeout = "1s" }', "shorter than dmrepl's timeouts (1s to 24h)"),
        ("timeout 2d", '{ timeout = "24h" }', "longer than dmrepl's timeouts (1s to 24h)"),
        ("timeout 86400001", '{ timeout = "24h" }', "longer than dmrepl's timeouts (1s to 24h)"),
        ("size 9e", '{ size = "8EiB" }', "more than dmrepl's largest size (8 EiB)"),
    ],
)
def test_thresholds_out_of_range_become_the_nearest_and_say_so(
    threshold: str, nearest: str, why: str, tmp_path: Path
) -> None:
    table = tmp_path / "t.table"
    table.write_text(_one_link(threshold, "stall"))
    code, out, err = run_cli_here("import-table", str(table))
    assert code == 0
    assert f"fall_behind = {nearest}" in out
    assert f"is {why}: fall_behind.{nearest.split()[1]} is the nearest it takes" in _prose(out)
    assert err.startswith(f"note: site link 1: {threshold} (") and why in err
    parse_config(out, PATH)


def test_a_threshold_beyond_the_kernel_s_64_bits_is_refused() -> None:
    with pytest.raises(TableError, match="more than a threshold can be"):
        import_table(_one_link("ios 9223372036854775808"), "g", "t")


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


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.name)
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


EXPORTED = """
[group.g.device.a]
origin = "/dev/a"
metadata = "/dev/m"
[group.g.site.slink1]
transport = "blockdev"
policy = "synchronous"
[group.g.site.slink1.replica]
a = "/dev/b1"
[group.g.site.slink2]
transport = "blockdev"
policy = "stall"
fall_behind = { size = "64MiB", timeout = "90s" }
stall_limit = "2m"
[group.g.site.slink2.replica]
a = "/dev/b2"
[group.g.site.slink3]
transport = "blockdev"
fall_behind = { ios = 0, timeout = "24h" }
[group.g.site.slink3.replica]
a = "/dev/b3"
[group.g.site.slink4]
transport = "blockdev"
fall_behind = { ios = 100, size = "3s", timeout = "1.5s" }
[group.g.site.slink4.replica]
a = "/dev/b4"
[group.g.site.vault]
transport = "dir"
policy = "stall"
path = "/srv/vault"
"""


def test_export_gives_each_link_its_policy_and_first_threshold() -> None:
    group = parse_config(EXPORTED, PATH).groups["g"]
    exported = export_tables(group, "/var/lib/dmrepl", {"a": 2048})
    control = next(line for line in exported.splitlines() if " replicator ringbuffer " in line)
    assert control.endswith(
        "blockdev 2 0 asynchronous blockdev 2 1 synchronous blockdev 4 2 stall size 64m "
        "blockdev 4 3 asynchronous timeout 1d blockdev 4 4 asynchronous ios 100"
    )
    assert [line for line in exported.splitlines() if "left out" in line] == [
        '# site link 2: left out: fall_behind.timeout = "90s": a link carries one threshold',
        '# site link 2: left out: stall_limit = "2m" (dm-replicator stalls without a limit)',
        "# site link 3: left out: fall_behind.ios = 0: dm-replicator reads a threshold of 0 as "
        "none",
        '# site link 4: left out: fall_behind.size = "3s": a link carries one threshold',
        '# site link 4: left out: fall_behind.timeout = "1.5s": a link carries one threshold',
        "# site vault (transport dir) has no dm-replicator form: left out",
    ]
    again = parse_config(import_table(exported, "g", "t"), PATH).groups["g"]
    assert [(s.policy, s.fall_behind) for s in again.sites] == [
        ("synchronous", FallBehind()),
        ("stall", FallBehind(bytes=64 * 2**20)),
        ("asynchronous", FallBehind(seconds=86400.0)),
        ("asynchronous", FallBehind(ios=100)),
    ]


@pytest.mark.parametrize(
    ("timeout", "threshold", "left_out"),
    [
        ('"2066.939s"', "timeout 2066939t", []),  # whole ms, though not in binary floating point
        ('"1.0005s"', "timeout 1s", ["fall_behind.timeout's part below a millisecond (1.0005s)"]),
        ("86400", "timeout 1d", []),
        ('"90s"', "timeout 90s", []),
    ],
)
def test_export_timeouts_count_milliseconds(
    timeout: str, threshold: str, left_out: list[str]
) -> None:
    text = (
        '[group.g.device.a]\norigin = "/dev/a"\nmetadata = "/dev/m"\n'
        f'[group.g.site.slink1]\ntransport = "blockdev"\nfall_behind = {{ timeout = {timeout} }}\n'
        '[group.g.site.slink1.replica]\na = "/dev/b"\n'
    )
    exported = export_tables(parse_config(text, PATH).groups["g"], "/var/lib/dmrepl", {})
    assert f"blockdev 4 1 asynchronous {threshold}\n" in exported
    assert [
        line.removeprefix("# site link 1: left out: ")
        for line in exported.splitlines()
        if line.startswith("# site link 1:")
    ] == left_out
