"""Configuration parsing: valid files, and every problem reported at once with key and file;
site policies, fall-behind limits and stall_limit."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl.config import ConfigError, load_config, parse_config
from dmrepl.errors import ExitCode
from dmrepl.policy import DEFAULT_STALL_LIMIT_S, FallBehind

PATH = Path("/etc/dmrepl/test.toml")

GOOD = """
[dmrepl]
state_dir = "/tmp/state"

[group.db]
block_size = "1MiB"

[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
metadata_offset = "4MiB"
cow_size = "1GiB"

[group.db.device.logs]
origin = "/dev/vdd"
metadata = "/dev/vdc"
metadata_offset = 16384
metadata_size = "8MiB"
block_size = 128
mirror_legs = ["/dev/vde", "/dev/vdf"]
mirror_log = "disk"
mirror_log_device = "/dev/vdg"
"""


def test_good_config() -> None:
    config = parse_config(GOOD, PATH)
    assert config.state_dir == Path("/tmp/state")
    data, logs = config.groups["db"].devices
    assert (data.name, data.origin, data.metadata_offset) == ("data", "/dev/vdb", 8192)
    assert data.block_sectors == 2048  # the group default
    assert data.metadata_size is None and data.cow_sectors == 2 * 2**20
    assert logs.block_sectors == 128 and logs.metadata_size == 16384
    assert logs.mirror is not None
    assert logs.mirror.legs == ("/dev/vde", "/dev/vdf")
    assert (logs.mirror.log, logs.mirror.log_device) == ("disk", "/dev/vdg")
    assert logs.mirror.region_sectors == 1024
    assert data.key == "group.db.device.data"


def test_select() -> None:
    config = parse_config(GOOD, PATH)
    assert [g.name for g in config.select(None)] == ["db"]
    with pytest.raises(Exception, match="no group 'web'"):
        config.select("web")


def test_all_problems_reported_at_once() -> None:
    bad = """
[group.db]
colour = "blue"

[group.db.device.data]
origin = "dev/vdb"
block_size = "12s"
metadata_offset = "3s"
cow = "/dev/x"
cow_size = "1G"
mirror_log = "disk"

[group."bad.name".device.x]
origin = "/dev/a"
metadata = "/dev/b"

[group.web.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, PATH)
    error = caught.value
    assert error.exit_code == ExitCode.CONFIG
    assert str(PATH) in error.message
    text = "\n".join(error.problems)
    for expected in [
        "group.db.colour: unknown key",
        "group.db.device.data.origin: 'dev/vdb' is not an absolute path",
        "group.db.device.data.metadata: missing",
        "group.db.device.data.block_size: era block size 12 sectors is not a multiple of 8",
        "group.db.device.data.metadata_offset: 3 sectors is not 4 KiB aligned",
        "group.db.device.data.cow: give either cow (a device) or cow_size",
        "group.db.device.data.mirror_log: set without mirror_legs",
        "group.bad.name: name 'bad.name' must be",
    ]:
        assert expected in text, f"missing: {expected}\nin:\n{text}"


def test_duplicate_names_and_paths() -> None:
    text = """
[group.a.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
[group.b.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
mirror_legs = ["/dev/vdb"]
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    text_out = "\n".join(caught.value.problems)
    assert "device name 'data' also used by group.a.device.data" in text_out
    assert "group.b.device.data.origin: /dev/vdb is also group.a.device.data.origin" in text_out
    assert "group.b.device.data.mirror_legs: /dev/vdb is also" in text_out


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "no groups configured"),
        ("[group.a]\nblock_size = '1MiB'\n", "group.a.device: no devices"),
        ("not toml [", "not valid TOML"),
        ("[other]\n", "other: unknown section"),
        (
            "[group.a.device.d]\norigin='/dev/a'\nmetadata='/dev/b'\nmirror_legs=['/dev/c']\n"
            "mirror_log='core'\nmirror_log_device='/dev/d'\n",
            'only used with mirror_log = "disk"',
        ),
        (
            "[group.a.device.d]\norigin='/dev/a'\nmetadata='/dev/b'\nmirror_legs=['/dev/c']\n"
            "mirror_region_size='3KiB'\n",
            "not a power of two",
        ),
        (
            "[group.a.device.d]\norigin='/dev/a'\nmetadata='/dev/b'\nblock_size='2XB'\n",
            "cannot read",
        ),
    ],
)
def test_single_problems(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    assert any(problem in p for p in caught.value.problems), caught.value.problems


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="1 problem") as caught:
        load_config(tmp_path / "nope.toml")
    assert "does not exist" in caught.value.problems[0]


# --- site policies and fall-behind limits ---------------------------------------------------

ONE_DEVICE = """
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
"""


def _site(lines: str, name: str = "dr", replica: str = "/dev/nbd0") -> str:
    """A blockdev site with the extra `lines` in its table."""
    return (
        f'[group.db.site.{name}]\ntransport = "blockdev"\n{lines}\n'
        f'[group.db.site.{name}.replica]\ndata = "{replica}"\n'
    )


def _site_problems(lines: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(ONE_DEVICE + _site(lines), PATH)
    return caught.value.problems


def test_policies_and_limits_are_read() -> None:
    text = ONE_DEVICE + _site(
        'policy = "stall"\nfall_behind = { ios = 1000, size = "64MiB", timeout = "3m" }\n'
        'stall_limit = "90s"'
    )
    site = parse_config(text, PATH).groups["db"].site("dr")
    assert site.policy == "stall"
    assert site.fall_behind == FallBehind(ios=1000, bytes=64 * 2**20, seconds=180.0)
    assert site.stall_limit_s == 90.0


def test_limits_default_to_none_and_stall_limit_to_60_s() -> None:
    site = parse_config(ONE_DEVICE + _site(""), PATH).groups["db"].site("dr")
    assert site.policy == "asynchronous"
    assert site.fall_behind == FallBehind() and not site.fall_behind.limited
    assert site.stall_limit_s == DEFAULT_STALL_LIMIT_S == 60.0


@pytest.mark.parametrize(
    ("fall_behind", "seconds"),
    [("{ timeout = 30 }", 30.0), ('{ timeout = "1h" }', 3600.0), ('{ timeout = "1.5s" }', 1.5)],
)
def test_fall_behind_timeout_forms(fall_behind: str, seconds: float) -> None:
    text = ONE_DEVICE + _site(f"fall_behind = {fall_behind}")
    assert parse_config(text, PATH).groups["db"].site("dr").fall_behind.seconds == seconds


def test_ios_0_is_a_limit() -> None:
    """`ios = 0`: the site is over its limit as soon as one write is behind."""
    group = parse_config(ONE_DEVICE + _site("fall_behind = { ios = 0 }"), PATH).groups["db"]
    limits = group.site("dr").fall_behind
    assert limits == FallBehind(ios=0) and limits.limited


@pytest.mark.parametrize(
    ("lines", "problem"),
    [
        (
            "fall_behind = 100",
            "group.db.site.dr.fall_behind: must be a table like { ios = 1000, size = ",
        ),
        ("fall_behind = {}", "group.db.site.dr.fall_behind: must be a table like"),
        ('fall_behind = "64MiB"', "group.db.site.dr.fall_behind: must be a table like"),
        (
            "fall_behind = { writes = 10 }",
            "group.db.site.dr.fall_behind.writes: unknown key (allowed: ios, size, timeout)",
        ),
        (
            "fall_behind = { ios = -1 }",
            "group.db.site.dr.fall_behind.ios: -1 is not a count of writes (0 or more)",
        ),
        (
            "fall_behind = { ios = true }",
            "group.db.site.dr.fall_behind.ios: True is not a count of writes (0 or more)",
        ),
        (
            'fall_behind = { ios = "100" }',
            "group.db.site.dr.fall_behind.ios: '100' is not a count of writes (0 or more)",
        ),
        ("fall_behind = { ios = 1.5 }", "group.db.site.dr.fall_behind.ios: 1.5 is not a count"),
        ('fall_behind = { size = "12Q" }', "group.db.site.dr.fall_behind.size: cannot read size"),
        ('fall_behind = { size = "0" }', "group.db.site.dr.fall_behind.size: must be greater"),
        (
            'fall_behind = { size = "100B" }',
            "group.db.site.dr.fall_behind.size: size '100B' is 100 bytes, not a whole number",
        ),
        ("fall_behind = { size = 1.5 }", "group.db.site.dr.fall_behind.size: must be a size"),
        (
            'fall_behind = { size = "9EiB" }',
            "group.db.site.dr.fall_behind.size: 9EiB is more than the largest device",
        ),
        (
            'fall_behind = { timeout = "0s" }',
            "group.db.site.dr.fall_behind.timeout: '0s' is not a duration of 1s to 24h",
        ),
        (
            'fall_behind = { timeout = "500ms" }',
            "group.db.site.dr.fall_behind.timeout: '500ms' is not a duration of 1s to 24h",
        ),
        (
            'fall_behind = { timeout = "25h" }',
            "group.db.site.dr.fall_behind.timeout: '25h' is not a duration of 1s to 24h",
        ),
        (
            "fall_behind = { timeout = true }",
            "group.db.site.dr.fall_behind.timeout: True is not a duration of 1s to 24h",
        ),
        (
            'fall_behind = { timeout = "soon" }',
            "group.db.site.dr.fall_behind.timeout: 'soon' is not a duration of 1s to 24h",
        ),
        (
            'stall_limit = "60s"',
            'group.db.site.dr.stall_limit: only used with policy = "stall" or "synchronous" '
            "(how long writers may be held while it drains or joins) or a fall_behind limit",
        ),
        (
            'policy = "synchronous"\nfall_behind = { ios = 10 }',
            "group.db.site.dr.fall_behind: has no meaning for a synchronous site: its replicas "
            "are mirror legs, so it is never behind while joined (and catches up at once when "
            "not)",
        ),
        (
            'policy = "stall"\nstall_limit = "0s"',
            "group.db.site.dr.stall_limit: '0s' is not a duration of 1s to 24h",
        ),
        (
            'policy = "stall"\nstall_limit = 86401',
            "group.db.site.dr.stall_limit: 86401 is not a duration of 1s to 24h",
        ),
        (
            'policy = "sync"',
            "group.db.site.dr.policy: 'sync' is not one of asynchronous, synchronous, stall",
        ),
    ],
)
def test_malformed_policy_keys(lines: str, problem: str) -> None:
    problems = _site_problems(lines)
    assert any(problem in p for p in problems), problems


def test_stall_limit_with_a_fall_behind_limit_stall_or_synchronous() -> None:
    for lines in ('policy = "stall"', "fall_behind = { ios = 10 }", 'policy = "synchronous"'):
        text = ONE_DEVICE + _site(f'{lines}\nstall_limit = "2m"')
        assert parse_config(text, PATH).groups["db"].site("dr").stall_limit_s == 120.0


@pytest.mark.parametrize(
    ("transport", "lines"),
    [
        ("dir", 'path = "/srv/dr"'),
        ("ssh", 'host = "dr.example"'),
        ("nbd", '[group.db.site.dr.export]\ndata = "nbd://dr:10809/data"'),
    ],
)
def test_synchronous_needs_a_blockdev_site(transport: str, lines: str) -> None:
    text = (
        ONE_DEVICE
        + f'[group.db.site.dr]\ntransport = "{transport}"\npolicy = "synchronous"\n{lines}\n'
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    assert (
        "group.db.site.dr.policy: synchronous needs replicas that are block devices on this host "
        '(transport = "blockdev", e.g. an NBD or iSCSI disk); '
        f"a {transport} site can be asynchronous or stall"
    ) in caught.value.problems


def test_sync_replicas_are_the_replicas_of_synchronous_sites() -> None:
    text = (
        ONE_DEVICE
        + """
[group.db.device.logs]
origin = "/dev/vdd"
metadata = "/dev/vdc"
metadata_offset = "64MiB"
[group.db.site.near]
transport = "blockdev"
policy = "synchronous"
[group.db.site.near.replica]
data = "/dev/sda"
logs = "/dev/sdb"
[group.db.site.far]
transport = "blockdev"
policy = "stall"
[group.db.site.far.replica]
data = "/dev/nbd0"
logs = "/dev/nbd1"
[group.db.site.also]
transport = "blockdev"
policy = "synchronous"
[group.db.site.also.replica]
data = "/dev/sdc"
logs = "/dev/sdd"
"""
    )
    data, logs = parse_config(text, PATH).groups["db"].devices
    assert data.sync_replicas == ("/dev/sda", "/dev/sdc")
    assert logs.sync_replicas == ("/dev/sdb", "/dev/sdd")
    only_async = parse_config(ONE_DEVICE + _site('policy = "asynchronous"'), PATH)
    assert only_async.groups["db"].devices[0].sync_replicas == ()
