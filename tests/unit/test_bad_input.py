"""Bad input from ../shared/reports/bad-input-2026-12.md: a clear error, the right exit code,
nothing touched. Case ids are the report's."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from dmrepl import loop
from dmrepl.config import ConfigError, load_config, parse_config
from dmrepl.errors import ExitCode
from dmrepl.executor import Runner
from dmrepl.lock import group_lock
from dmrepl.probe import DeviceMissing
from dmrepl.replication import cycle as sync_cycle
from tests.clirun import run_cli_here
from tests.unit.badinput import tree_digest

PATH = Path("/etc/dmrepl/test.toml")


def config_text(device: str = "", site: str = "", top: str = 'state_dir = "/var/lib/x"') -> str:
    """One group `db` with device `data`, plus extra TOML lines for the device and the site."""
    return (
        f"[dmrepl]\n{top}\n\n"
        '[group.db.device.data]\norigin = "/dev/vdb"\nmetadata = "/dev/vdc"\n'
        f"{device}\n{site}\n"
    )


SITE_BLOCKDEV = (
    '[group.db.site.dr]\ntransport = "blockdev"\n[group.db.site.dr.replica]\ndata = "/dev/vdz"\n'
)
SITE_BLOCKDEV = (
    '[group.db.site.dr]\ntransport = "blockdev"\n[group.db.site.dr.replica]\ndata = "/dev/vdz"\n'
)
SITE_DIR = '[group.db.site.vault]\ntransport = "dir"\npath = "{path}"\n'

CONFIG_CASES = [
    ("C08c", config_text('metadata_size = "1E"'), "metadata_size: 1E is more than dm-era's"),
    ("C08d", config_text('metadata_size = "0"'), "metadata_size: must be greater than 0"),
    ("C08j", config_text('metadata_size = "99999999999999999999E"'), "metadata_size"),
    (
        "C09c",
        config_text().replace(
            "[group.db.device", '[group.db]\nspool_size = "0"\n\n[group.db.device'
        ),
        "spool_size: must be greater than 0",
    ),
    (
        "C09e",
        config_text().replace(
            "[group.db.device", '[group.db]\nspool_size = "9E"\n\n[group.db.device'
        ),
        "spool_size: 9E is more than the largest device",
    ),
    ("C10b", config_text('block_size = "0"'), "block_size: must be greater than 0"),
    ("C10y", config_text('cow_size = "0"'), "cow_size: must be greater than 0"),
    ("C10y-", config_text('cow_size = "-1G"'), "cow_size"),
    (
        "C11",
        config_text().replace('metadata = "/dev/vdc"', 'metadata = "/dev/vdb"'),
        "/dev/vdb is also the origin",
    ),
    (
        "C13b",
        config_text(top='state_dir = "state"'),
        "dmrepl.state_dir: 'state' is not an absolute path",
    ),
    ("C14h", config_text().replace("device.data]", "device.control]"), "reserved by device-mapper"),
    (
        "C14j",
        config_text() + '[group.db.device.data-meta]\norigin = "/dev/vdd"\nmetadata = "/dev/vde"\n',
        "would also be a layer of",
    ),
    (
        "C14k",
        config_text()
        .replace("group.db.", f"group.{'g' * 64}.")
        .replace("device.data]", f"device.{'d' * 64}]"),
        "dm allows 128",
    ),
    (
        "C17c",
        config_text(site=SITE_DIR.format(path="/var/lib/x/spool/db")),
        "inside state_dir /var/lib/x",
    ),
    ("C17c=", config_text(site=SITE_DIR.format(path="/var/lib/x")), "inside state_dir"),
    (
        "C19",
        config_text().replace('"/dev/vdb"', '"/dev/vd\\nb"'),
        "whitespace or control characters",
    ),
    (
        "C19 ",
        config_text().replace('"/dev/vdb"', '"/dev/my disk"'),
        "whitespace or control characters",
    ),
    # Finding 12: a device with a problem is not also "not a device of this group" in a site.
    (
        "F12",
        config_text('block_size = "0"', SITE_BLOCKDEV),
        "block_size: must be greater than 0",
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "problem"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES]
)
def test_config_problem_is_reported_once_with_its_key(case: str, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    problems = caught.value.problems
    assert len(problems) == 1, problems
    assert problem in problems[0]
    assert caught.value.exit_code == ExitCode.CONFIG


def test_c09e_a_spool_cap_above_the_disk_is_accepted() -> None:
    """spool_size is a cap on what the spool may hold, not an allocation: 1 EiB only means the
    spool is bounded by its filesystem instead."""
    text = config_text().replace(
        "[group.db.device", '[group.db]\nspool_size = "1E"\n\n[group.db.device'
    )
    assert parse_config(text, PATH).groups["db"].spool_bytes == 2**60


def test_zero_offset_and_defaults_are_still_fine() -> None:
    config = parse_config(config_text('metadata_offset = "0"'), PATH)
    (device,) = config.groups["db"].devices
    assert device.metadata_offset == 0 and device.block_sectors == 4096
    assert config.groups["db"].spool_bytes == 4 * 2**30


def test_c02c_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(config_text().encode() + b"# caf\xff\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"not UTF-8 text: byte 0xff at offset {len(config_text()) + 5}"
    ]


@pytest.fixture
def good_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A valid config whose state_dir does not exist yet, on a kernel without device-mapper."""
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    path = tmp_path / "dmrepl.toml"
    site = SITE_DIR.format(path=tmp_path / "vault")
    path.write_text(config_text(site=site, top=f'state_dir = "{tmp_path / "state"}"'))
    return path


CLI_CASES = [
    ("A04", ["changes", "db", "--since-cut", "-1"], ExitCode.INVALID_INPUT, "out of range"),
    ("A04b", ["changes", "db", "--since-cut", str(2**70)], ExitCode.INVALID_INPUT, "out of range"),
    ("since-era-0", ["changes", "db", "--since-era", "0"], ExitCode.INVALID_INPUT, "out of range"),
    ("A05f", ["run", "db", "--interval", "nan"], ExitCode.INVALID_INPUT, "out of range"),
    ("A05g", ["run", "db", "--interval", "inf"], ExitCode.INVALID_INPUT, "out of range"),
    ("A05h", ["run", "db", "--interval", "1e-9"], ExitCode.INVALID_INPUT, "out of range"),
    ("A05i", ["run", "db", "--interval", "1e400"], ExitCode.INVALID_INPUT, "out of range"),
    ("A05j", ["run", "db", "--interval", "0.000001"], ExitCode.INVALID_INPUT, "out of range"),
    ("A05k", ["run", "db", "--interval", "8d"], ExitCode.INVALID_INPUT, "is not like 30s"),
    # No device-mapper: the documented 6 before any dmsetup call, not 4 with libdevmapper's text.
    ("dm-up", ["up"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
    ("dm-down", ["down"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
    ("dm-status", ["status"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
    ("dm-changes", ["changes", "db"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
    ("dm-check", ["check-config"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
    ("dm-sync", ["sync"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
    ("dm-seed", ["seed", "db", "--site", "vault"], ExitCode.NO_DEVICE_MAPPER, "no device-mapper"),
]


@pytest.mark.parametrize(
    ("case", "args", "code", "message"), CLI_CASES, ids=[c[0] for c in CLI_CASES]
)
def test_cli_refuses_before_touching_anything(
    case: str, args: list[str], code: ExitCode, message: str, good_config: Path
) -> None:
    before = tree_digest(good_config.parent)
    exit_code, _, stderr = run_cli_here(*args, "--config", str(good_config))
    assert exit_code == code, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert tree_digest(good_config.parent) == before  # no state dir, lock, spool or site file


def two_group_config(tmp_path: Path) -> Path:
    path = tmp_path / "two.toml"
    text = f'[dmrepl]\nstate_dir = "{tmp_path / "state"}"\n'
    for group in ("a", "b"):
        text += (
            f'[group.{group}.device.{group}data]\norigin = "/dev/vd{group}"\n'
            f'metadata = "/dev/vd{group}m"\n'
            f'[group.{group}.site.vault]\ntransport = "dir"\npath = "{tmp_path / group}"\n'
        )
    path.write_text(text)
    return path


def test_one_groups_failure_does_not_stop_the_other_groups(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: a lost disk in the first group stopped every later group, each cycle."""
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    reached: list[str] = []

    def sync(runner: object, config: object, group: str, **_: object) -> None:
        reached.append(group)
        raise DeviceMissing(f"group {group}: its disk is gone")

    monkeypatch.setattr(sync_cycle, "sync", sync)
    code, _, stderr = run_cli_here("sync", "--config", str(two_group_config(tmp_path)))
    assert reached == ["a", "b"]
    assert code == ExitCode.DEVICE_MISSING
    assert "group a: its disk is gone" in stderr and "group b: its disk is gone" in stderr
    assert "group a: no cut this cycle; going on with the other groups" in stderr


def test_a_state_store_failure_mid_cycle_is_an_error_not_a_traceback(
    good_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)

    def sync(*_: object, **__: object) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(sync_cycle, "sync", sync)
    code, _, stderr = run_cli_here("sync", "db", "--config", str(good_config))
    assert code == ExitCode.FAILURE
    assert "the state store (state.db) failed: database or disk is full" in stderr
    assert "Traceback" not in stderr


def test_down_refuses_while_a_sync_holds_the_group(
    good_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review finding: `down` recovered (resumed gates, removed -pit images) under a running
    sync's cut. It now takes the group's lock first: busy is exit 7, nothing touched."""
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("down ran a command while the group was busy")

    monkeypatch.setattr(Runner, "run", refuse)
    state_dir = good_config.parent / "state"
    with group_lock(state_dir, "db", "sync"):
        before = tree_digest(good_config.parent)
        code, _, stderr = run_cli_here("down", "--config", str(good_config))
        assert tree_digest(good_config.parent) == before
    assert code == ExitCode.BUSY
    assert "group db is busy" in stderr
