"""Configuration parsing: valid files, and every problem reported at once with key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl.config import ConfigError, load_config, parse_config
from dmrepl.errors import ExitCode

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
