"""Every host-tier case of the report's sections "Configuration" (C*), "Command-line arguments"
(A*) and "Non-root" (N*) (../shared/reports/bad-input-2026-12.md), table-driven: the exit code
docs/cli.md gives that kind of problem, a message naming it, no traceback, and a hash of every
file under the scratch tree `$W` the same before and after.

Case ids are the report's. Cases already in test_bad_input.py are not repeated (C02c, C08c/d/j,
C09c/e, C10b/y, C11, C13b, C14h/j/k, C17c, C19, F12, A04, A04b, A05f-j, exit 6 before dmsetup).
This host kernel has no device-mapper: cases marked dm="fake" pretend it has and put the
report's fake `dmsetup` (no devices; refuses everything else) first on PATH, so the device
checks that follow kernel contact run. Fake devices are sparse regular files, so a valid config
ends at the device check: exit 11, "is not a block device".

A case without a `why` is one the report rated "clear" (it says what is wrong, with the
documented exit code, and touches nothing) and that we agree with; `why` says why the behaviour
is right where the report had a doubt, or for a baseline (a valid input). Every case also checks
that no device with its own problem adds a spurious "not a device of this group" (finding 12),
and runs in $W as its working directory, so a relative path cannot reach anything else.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrepl.config import DEFAULT_PATH
from dmrepl.errors import ExitCode
from tests.unit.badinput import (
    NOBODY,
    SITE_DR,
    Case,
    check_case,
    good_config,
    public_scratch,
)

GOOD = good_config()
ERR = ExitCode
FAKE = "fake"


def _names(name: str) -> str:
    """good.toml with device `data` renamed (its replica follows, so only the name is wrong)."""
    return GOOD.replace("device.data]", f'device."{name}"]').replace(
        'data = "$W/dev/replica"', f'"{name}" = "$W/dev/replica"'
    )


CONFIGURATION = [
    Case(
        "C00",
        ("check-config",),
        ERR.DEVICE_MISSING,
        "origin $W/dev/origin is not a block device",
        GOOD,
        dm=FAKE,
        why="baseline: a valid file passes the parser; the device checks then refuse regular "
        "files (on this dm-less kernel without the fake dmsetup: exit 6, test_bad_input.py)",
    ),
    Case("C01", ("check-config", "--config", "$W/cfg/nope.toml"), ERR.CONFIG, "does not exist"),
    Case(
        "C01b",
        ("check-config",),
        ERR.CONFIG,
        "$W/cfg/nope2.toml: 1 problem in the configuration",
        env={"DMREPL_CONFIG": "$W/cfg/nope2.toml"},
    ),
    Case(
        "C01c",
        ("check-config",),
        ERR.CONFIG,
        "/etc/dmrepl/dmrepl.toml: 1 problem in the configuration",
        why="no --config and no DMREPL_CONFIG: the default path is named, with what to do",
    ),
    Case(
        "C02",
        ("check-config", "--config", "$W/cfg/unreadable.toml"),
        ERR.CONFIG,
        "cannot read the file: Permission denied",
        runuser=True,
        why="a config file nobody may read is a configuration problem (3, like C02b's "
        "directory), not click's usage error 2",
    ),
    Case("C02b", ("check-config", "--config", "$W/dev/adir"), ERR.CONFIG, "Is a directory"),
    Case(
        "C03",
        ("check-config",),
        ERR.CONFIG,
        "not valid TOML: Illegal character",
        GOOD.replace('origin = "$W/dev/origin"', 'origin = "$W/dev/origin'),
    ),
    Case(
        "C03b",
        ("check-config",),
        ERR.CONFIG,
        "not valid TOML: Cannot declare ('group', 'db', 'device', 'data') twice",
        GOOD + '[group.db.device.data]\norigin = "/dev/x"\n',
    ),
    Case(
        "C04",
        ("check-config",),
        ERR.CONFIG,
        "extra: unknown section",
        "[extra]\nx = 1\n"
        + good_config(top="colour = 1", group="colour = 1", device="colour = 1").replace(
            'transport = "blockdev"', 'transport = "blockdev"\ncolour = 1'
        ),
    ),
    Case(
        "C05",
        ("check-config",),
        ERR.CONFIG,
        "group.db.device.data.origin: must be a non-empty string, not 5",
        GOOD.replace('origin = "$W/dev/origin"', "origin = 5")
        .replace("[group.db.device.data]", "[group.db.device.data]\nblock_size = true")
        .replace("[group.db.device.data]", '[group.db.device.data]\nmirror_legs = "/dev/x"'),
    ),
    Case(
        "C05b",
        ("check-config",),
        ERR.CONFIG,
        "block_size",
        good_config(group="block_size = 1.5\nspool_size = [1]"),
    ),
    Case(
        "C05c",
        ("check-config",),
        ERR.CONFIG,
        "dmrepl.group: unknown key",
        good_config(top='group = "db"', sites="").replace(
            "[group.db.device.data]", "[group.db]\ndevice = [1, 2]\n\n[group.db2.device.data]"
        ),
    ),
    Case(
        "C06",
        ("check-config",),
        ERR.CONFIG,
        "group.db2.device.data: device name 'data' also used by group.db.device.data",
        GOOD + '[group.db2.device.data]\norigin = "/dev/x"\nmetadata = "/dev/y"\n',
    ),
    Case(
        "C06b",
        ("check-config",),
        ERR.CONFIG,
        "$W/dev/origin is also group.db.device.data.origin",
        good_config(sites="")
        + '[group.db.device.data2]\norigin = "$W/dev/origin"\nmetadata = "/dev/y"\n',
    ),
    Case(
        "C07",
        ("check-config",),
        ERR.CONFIG,
        "group.db.device: no devices",
        '[dmrepl]\nstate_dir = "$W/state"\n[group.db]\nblock_size = "2MiB"\n',
    ),
    Case("C07b", ("check-config",), ERR.CONFIG, "group: no groups configured", ""),
    *(
        Case(
            case,
            ("check-config",),
            ERR.CONFIG,
            f"group.db.device.data.metadata_size: {message}",
            good_config(device=f"metadata_size = {value!r}"),
        )
        for case, value, message in (
            ("C08a", "12Q", "cannot read metadata_size '12Q'"),
            ("C08b", "-1G", "cannot read metadata_size '-1G'"),
            (
                "C08e",
                "1.5s",
                "metadata_size '1.5s' is 768 bytes, not a whole number of 512-byte sectors",
            ),
            ("C08f", "0x10", "cannot read metadata_size '0x10'"),
            ("C08g", "", "cannot read metadata_size ''"),
            ("C08h", " ", "cannot read metadata_size ' '"),
            ("C08i", "1e3", "cannot read metadata_size '1e3'"),
        )
    ),
    *(
        Case(
            case,
            ("check-config",),
            ERR.CONFIG,
            f"group.db.spool_size: {message}",
            good_config(group=f"spool_size = {value!r}"),
        )
        for case, value, message in (
            ("C09a", "12Q", "cannot read spool_size '12Q'"),
            ("C09b", "-1G", "cannot read spool_size '-1G'"),
            ("C09d", "garbage", "cannot read spool_size 'garbage'"),
            ("C09f", "1B", "spool_size '1B' is 1 bytes, not a whole number of 512-byte sectors"),
        )
    ),
    *(
        Case(
            case,
            ("check-config",),
            ERR.CONFIG,
            f"group.db.device.data.block_size: era block size {message}",
            good_config(device=f"block_size = {value!r}"),
        )
        for case, value, message in (
            ("C10a", "12", "12 sectors is not a multiple of 8 sectors"),
            ("C10c", "4", "4 sectors is not a multiple of 8 sectors"),
            ("C10e", "17179869184s", "17179869184 sectors does not fit dm-era's 32-bit"),
            ("C10f", "2T", "4294967296 sectors does not fit dm-era's 32-bit"),
            ("C10h", "4294967296s", "4294967296 sectors does not fit dm-era's 32-bit"),
            ("C10i", "1E", "2251799813685248 sectors does not fit dm-era's 32-bit"),
        )
    ),
    # Valid block sizes (the smallest and the documented largest) pass the parser and reach
    # the device checks.
    *(
        Case(
            case,
            ("check-config",),
            ERR.DEVICE_MISSING,
            "origin $W/dev/origin is not a block device",
            good_config(device=f"block_size = {value!r}"),
            dm=FAKE,
            why="baseline: a valid block size; the regular-file devices are then refused",
        )
        for case, value in (("C10d", "8"), ("C10g", "4294967288s"))
    ),
    Case(
        "C10x",
        ("check-config",),
        ERR.CONFIG,
        "group.db.device.data.block_size: era block size 12 sectors is not a multiple of 8",
        good_config(group="block_size = 12"),
    ),
    Case(
        "C11b",
        ("check-config",),
        ERR.CONFIG,
        "group.db.device.data.metadata_offset: 1 sectors is not 4 KiB aligned",
        good_config(device='metadata_offset = "1"'),
    ),
    Case(
        "C12",
        ("check-config",),
        ERR.DEVICE_MISSING,
        "origin /nonexistent/origin does not exist",
        GOOD.replace("$W/dev/origin", "/nonexistent/origin").replace(
            "$W/dev/metadata", "/nonexistent/metadata"
        ),
        dm=FAKE,
        why="the device checks run as soon as the kernel has device-mapper; on a kernel "
        "without it the documented 6 comes first (a missing driver is the bigger problem, "
        "and both are reported before any dmsetup call): see C12-nodm",
    ),
    Case(
        "C12-nodm",
        ("check-config",),
        ERR.NO_DEVICE_MAPPER,
        "this kernel has no device-mapper",
        GOOD.replace("$W/dev/origin", "/nonexistent/origin"),
    ),
    Case(
        "C12b",
        ("check-config",),
        ERR.DEVICE_MISSING,
        "origin $W/dev/adir is not a block device",
        GOOD.replace("$W/dev/origin", "$W/dev/adir").replace("$W/dev/metadata", "/dev/null"),
        dm=FAKE,
    ),
    Case(
        "C13",
        ("check-config",),
        ERR.CONFIG,
        "group.db.device.data.origin: 'dev/origin' is not an absolute path",
        GOOD.replace('"$W/dev/origin"', '"dev/origin"').replace(
            'transport = "blockdev"', 'transport = "blockdev"\njournal = "journal"'
        ),
    ),
    Case(
        "C13c",
        ("check-config",),
        ERR.CONFIG,
        "dmrepl.state_dir: must be a non-empty string, not ''",
        GOOD.replace('state_dir = "$W/state"', 'state_dir = ""'),
    ),
    *(
        Case(
            case,
            ("check-config",),
            ERR.CONFIG,
            f"name {name!r} must be 1-64 of A-Z a-z 0-9 _ + - (no dots)",
            _names(name),
        )
        for case, name in (
            ("C14a", "a/b"),
            ("C14b", "a b"),
            ("C14c", ".."),
            ("C14d", "dätä"),
            ("C14e", "x" * 65),
            ("C14f", "x" * 127),
            ("C14g", "-data"),
            ("C14i", ""),
        )
    ),
    Case(
        "C14g2",
        ("check-config",),
        ERR.CONFIG,
        "group.a.b: name 'a.b' must be 1-64 of A-Z a-z 0-9 _ + - (no dots)",
        good_config(sites="").replace("group.db.", 'group."a.b".'),
    ),
    Case(
        "C15",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.dr.policy: 'sync' is not one of asynchronous, synchronous, stall",
        GOOD.replace('transport = "blockdev"', 'transport = "ssh"\npolicy = "sync"'),
    ),
    Case(
        "C15b",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.vault.policy: synchronous needs replicas that are block devices on this "
        'host (transport = "blockdev", e.g. an NBD or iSCSI disk); a dir site can be '
        "asynchronous or stall",
        GOOD.replace('transport = "dir"', 'transport = "dir"\npolicy = "synchronous"'),
        why="the report's case, a synchronous blockdev site, was refused as not implemented; it "
        "is valid now (C15b2). A dir site keeps delta files, with no replica a write could wait "
        "for, so synchronous there is still refused, naming the transport that can have it",
    ),
    Case(
        "C15b2",
        ("check-config",),
        ERR.DEVICE_MISSING,
        "origin $W/dev/origin is not a block device",
        GOOD.replace('transport = "blockdev"', 'transport = "blockdev"\npolicy = "synchronous"'),
        dm=FAKE,
        why="baseline: synchronous on a blockdev site passes the parser and reaches the device "
        "checks, like C00",
    ),
    Case(
        "C16",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.dr.replica: missing: a table naming the replica of every group device",
        good_config(sites='[group.db.site.dr]\ntransport = "blockdev"\n'),
    ),
    Case(
        "C16b",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.dr.replica.other: not a device of this group",
        GOOD.replace('data = "$W/dev/replica"', 'other = "$W/dev/replica"'),
        why="two problems of the site's own: data's replica is missing, other is not a device",
    ),
    Case(
        "C16c",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.dr.replica.data: $W/dev/origin is also group.db.device.data.origin",
        GOOD.replace('data = "$W/dev/replica"', 'data = "$W/dev/origin"'),
    ),
    Case(
        "C17b",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.vault.path: 'vault' is not an absolute path",
        GOOD.replace('path = "$W/vault"', 'path = "vault"'),
    ),
    Case(
        "C17d",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.dr2.replica.data: $W/dev/replica is also group.db.site.dr.replica.data",
        GOOD + SITE_DR.replace("site.dr", "site.dr2"),
    ),
    Case(
        "C18",
        ("check-config",),
        ERR.CONFIG,
        'group.db.device.data.mirror_log_device: required when mirror_log = "disk"',
        good_config(
            device='mirror_legs = ["/dev/x"]\nmirror_log = "disk"\nmirror_region_size = "3"'
        ),
    ),
    Case(
        "C02n",
        ("check-config",),
        ERR.OK,
        "1 group(s), 1 device(s); run as root to check the devices too",
        GOOD,
        euid=NOBODY,
        why="baseline: as non-root check-config checks the file only, and says so",
    ),
]

COMMAND_LINE = [
    *(
        Case(case, ("size", *args), ERR.INVALID_INPUT, message)
        for case, args, message in (
            ("A01a", ("12Q", "--block-size", "2MiB"), "cannot read origin size '12Q'"),
            ("A01b", ("--block-size", "2MiB", "--", "-1G"), "cannot read origin size '-1G'"),
            ("A01c", ("0", "--block-size", "2MiB"), "origin size 0 sectors is not a positive"),
            ("A01d", ("1E", "--block-size", "2MiB"), "dm-era supports fewer than 2^31"),
            ("A01e", ("16T", "--block-size", "0"), "era block size 0 sectors is not positive"),
            ("A01f", ("16T", "--block-size", "12"), "12 sectors is not a multiple of 8"),
            ("A01g", ("16T", "--block-size", "2T"), "does not fit dm-era's 32-bit block size"),
            ("A01h", ("16T", "--block-size", "-8"), "cannot read block size '-8'"),
            ("A01i", ("16T", "--block-size", "4096B"), "dm-era supports fewer than 2^31"),
            ("A01k", ("16T", "--block-size", "1.5K"), "3 sectors is not a multiple of 8"),
            (
                "A01l",
                ("99999999999999999999999E", "--block-size", "8"),
                "dm-era supports fewer than 2^31",
            ),
        )
    ),
    Case(
        "A01j",
        ("size", "1", "--block-size", "8"),
        ERR.OK,
        "-> 1 era blocks",
        why="baseline: one sector in one era block is a valid (tiny) origin",
    ),
    Case(
        "A01m",
        ("size", "4", "--block-size", "64KiB"),
        ERR.OK,
        "-> 1 era blocks",
        why="baseline: an origin smaller than one era block still needs one era block",
    ),
    # `size` of a device path: a missing or non-block device is exit 11 (docs/cli.md), as for
    # a configured device, not 8 (a safety check refusing a device that exists).
    Case(
        "A02",
        ("size", "$W/dev/origin"),
        ERR.DEVICE_MISSING,
        "origin $W/dev/origin is not a block device",
    ),
    Case(
        "A02b",
        ("size", "/nonexistent/dev"),
        ERR.DEVICE_MISSING,
        "origin /nonexistent/dev does not exist",
    ),
    Case("A02d", ("size", "/dev/null"), ERR.DEVICE_MISSING, "origin /dev/null is not a block"),
    Case(
        "A02c",
        ("size", "dev/origin"),
        ERR.INVALID_INPUT,
        "hint: give a device by its absolute path: dmrepl size $W/dev/origin",
        why="a relative name is read as a size (`size 16T` must not look for a file 16T); "
        "the hint says how to name a device instead",
    ),
    Case(
        "A02c-",
        ("size", "sdb"),
        ERR.INVALID_INPUT,
        "or give a device by its absolute path, e.g. /dev/sdb",
        why="neither a size nor an existing file: both readings are offered",
    ),
    # An unknown group or site is an argument problem: exit 10 before the kernel is looked at
    # (this kernel has no device-mapper, which would be 6).
    Case("A03", ("status", "nosuch"), ERR.INVALID_INPUT, "no group 'nosuch' in", GOOD),
    Case("A03b", ("up", "nosuch", "--dry-run"), ERR.INVALID_INPUT, "no group 'nosuch'", GOOD),
    Case("A03c", ("sync", "nosuch"), ERR.INVALID_INPUT, "no group 'nosuch' in", GOOD),
    Case(
        "A04c",
        ("changes", "db", "--since-cut", "abc"),
        ERR.USAGE,
        "Invalid value for '--since-cut'",
        GOOD,
        why="not a number at all: click's usage error (2, 'bad arguments' in docs/cli.md)",
    ),
    Case(
        "A04d",
        ("changes", "db", "--since-cut", "1", "--since-era", "1"),
        ERR.INVALID_INPUT,
        "give --since-cut or --since-era, not both",
        GOOD,
    ),
    Case("A04e", ("changes", "nosuch"), ERR.INVALID_INPUT, "no group 'nosuch' in", GOOD),
    *(
        Case(case, ("run", "db", "--interval", value), ERR.INVALID_INPUT, message, GOOD)
        for case, value, message in (
            ("A05a", "0", "interval '0' is out of range"),
            ("A05b", "-5", "interval '-5' is out of range"),
            ("A05c", "abc", "interval 'abc' is not like 30s, 5m or 1h"),
            ("A05d", "", "interval '' is not like 30s, 5m or 1h"),
            ("A05e", "5x", "interval '5x' is not like 30s, 5m or 1h"),
        )
    ),
    Case(
        "A06",
        ("seed", "db", "--site", "nosuch"),
        ERR.INVALID_INPUT,
        "group db has no site 'nosuch'",
        GOOD,
    ),
    Case("A07", ("down", "nosuch", "--force"), ERR.INVALID_INPUT, "no group 'nosuch'", GOOD),
    Case(
        "A08",
        ("frobnicate",),
        ERR.USAGE,
        "No such command 'frobnicate'",
        why="click's usage error: exit 2 is 'bad arguments' in docs/cli.md",
    ),
]

# As non-root: every command that drives device-mapper says so (5) before reading the config
# or its arguments, so nothing is read or created; `size` and `check-config` (parse only, C02n)
# need no privilege by design.
NOT_ROOT_MESSAGE = "dmrepl must run as root to drive device-mapper"
NON_ROOT = [
    *(
        Case(case, args, ERR.NOT_ROOT, NOT_ROOT_MESSAGE, GOOD, euid=NOBODY)
        for case, args in (
            ("N01", ("sync", "db")),
            ("N02", ("status",)),
            ("N03", ("up", "--dry-run")),
            ("N04", ("down", "db")),
            ("N05", ("changes", "db")),
            ("N06", ("run", "db", "--interval", "abc")),
            ("N07", ("seed", "db", "--site", "dr")),
        )
    ),
    Case(
        "N08",
        ("size", "16T"),
        ERR.OK,
        "origin         16 TiB (34359738368 sectors)",
        euid=NOBODY,
        why="baseline: sizing is arithmetic and needs no privilege",
    ),
    Case(
        "N09",
        ("status", "--config", "$W/cfg/nope.toml"),
        ERR.NOT_ROOT,
        NOT_ROOT_MESSAGE,
        euid=NOBODY,
        why="the root check comes before reading the config: a missing file is not worth "
        "reporting to someone who cannot run the command anyway",
    ),
    Case(
        "N11",
        ("apply", "$W/deltas", "--group", "db", "--to", "data=$W/nb/t"),
        ERR.OK,
        "targets hold cut 1 of db",
        runuser=True,
        writes=("nb/t",),
        why="baseline: apply writes files, not device-mapper; a user may rebuild an image file "
        "of their own from deltas they can read",
    ),
]

FIXED_AFTER_THE_REPORT = [
    # A dir site's path that exists but is not a directory (F15: `sync` then reported the site
    # down, exit 17, after taking a cut).
    Case(
        "C17",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.vault.path: $W/dev/origin is not a directory",
        GOOD.replace('path = "$W/vault"', 'path = "$W/dev/origin"'),
        euid=NOBODY,
    ),
    # A site without `transport` said "None is not one of blockdev, dir".
    Case(
        "C15c",
        ("check-config",),
        ERR.CONFIG,
        "group.db.site.dr.transport: missing (one of blockdev, dir, nbd, s3, ssh)",
        GOOD.replace('transport = "blockdev"\n', ""),
    ),
    # apply as nobody onto a root-owned 0644 target was a PermissionError traceback (exit 1);
    # a target that cannot be opened for writing is exit 11 with the reason, nothing written.
    Case(
        "N10",
        ("apply", "$W/deltas", "--group", "db", "--to", "data=$W/dev/origin"),
        ERR.DEVICE_MISSING,
        "Permission denied",
        runuser=True,
    ),
]

CASES = CONFIGURATION + COMMAND_LINE + NON_ROOT + FIXED_AFTER_THE_REPORT


@pytest.fixture
def scratch() -> Iterator[Path]:
    with public_scratch() as w:
        (w / "cfg/unreadable.toml").write_text(GOOD.replace("$W", str(w)))
        (w / "cfg/unreadable.toml").chmod(0o000)
        yield w


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_report_case(case: Case, scratch: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.id == "C01c" and DEFAULT_PATH.exists():
        pytest.skip(f"this host has a {DEFAULT_PATH}")
    check_case(case, scratch, monkeypatch)
    if case.id == "C01c":
        assert not DEFAULT_PATH.parent.exists()  # nothing created there either


def test_every_case_is_named_once() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
