"""Table models against `dmsetup table` output captured from a real kernel (tests/data/dmsetup)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dmrepl.errors import ParseError
from dmrepl.tables import (
    CorruptBioByte,
    Delay,
    DelayClass,
    Era,
    Error,
    Flakey,
    Linear,
    Mirror,
    Snapshot,
    SnapshotOrigin,
    TableLine,
    UnknownDevice,
    Zero,
    normalise_table,
    parse_table,
    parse_table_line,
    parse_target,
    render_table,
    single,
    table_devices,
)

DATA = Path(__file__).resolve().parent.parent / "data" / "dmsetup"
TABLES = sorted(p.stem for p in DATA.glob("*.table"))
REFUSED = sorted(p.stem for p in DATA.glob("*.error"))


def read(case: str, suffix: str) -> str:
    return (DATA / f"{case}.{suffix}").read_text()


def devices(case: str) -> dict[str, str]:
    pairs = (line.split() for line in read(case, "devices").splitlines())
    return {path: dev_id for path, dev_id in pairs}


def table_lines(case: str) -> list[str]:
    return read(case, "table").splitlines()


def test_fixtures_are_there() -> None:
    assert len(TABLES) >= 40
    assert {"mirror-core", "mirror-disk", "snapshot", "era", "flakey", "delay"} <= set(TABLES)


@pytest.mark.parametrize("case", TABLES)
def test_render_of_parse_is_the_kernel_text(case: str) -> None:
    # dmsetup ends a line with a space when a target prints no parameters, and 6.1's
    # flakey prints one after its own; neither is part of the table.
    for raw in table_lines(case):
        assert parse_table_line(raw).render() == raw.rstrip(" ")


@pytest.mark.parametrize("case", TABLES)
def test_wanted_table_equals_observed_after_normalising_devices(case: str) -> None:
    wanted = parse_table(read(case, "input"))
    observed = parse_table(read(case, "table"))
    assert normalise_table(wanted, devices(case)) == observed
    assert render_table(normalise_table(wanted, devices(case))) == "".join(
        line.rstrip(" ") + "\n" for line in table_lines(case)
    )


def test_kernel_echoes_canonical_forms() -> None:
    """What one types is not always what the kernel prints back (all seen on 6.1)."""

    def table(case: str) -> str:
        return read(case, "table").rstrip(" \n")

    # Persistence flag upper-cased.
    assert " n 16" in read("snapshot-transient", "input")
    assert table("snapshot-transient").endswith(" N 16")
    # Mirror features in the order handle_errors, keep_log whatever order they came in.
    assert read("mirror-features-reversed", "input").rstrip().endswith("2 keep_log handle_errors")
    assert table("mirror-features-reversed").endswith("2 handle_errors keep_log")
    # An explicit `sync` is kept (2 log arguments); the default prints 1 argument.
    assert "mirror core 2 512 sync 2 " in table("mirror-core-sync")
    assert "mirror core 1 1024 2 " in table("mirror-core")
    # flakey always prints its feature count, and drop_writes before corrupt_bio_byte.
    assert table("flakey").endswith(" 0 5 5 0")
    assert table("flakey-corrupt-read-drop").endswith("6 drop_writes corrupt_bio_byte 7 r 255 0")
    # delay prints back a write class identical to the read class if one was given.
    assert table("delay-write-same").endswith("delay 7:0 0 0 7:0 0 0")
    # Targets without parameters: dmsetup still prints the separating space.
    assert read("zero", "table") == "0 32768 zero \n"


def test_parsed_values() -> None:
    def target(case: str) -> object:
        (line,) = parse_table(read(case, "table"))
        return line.target

    assert target("linear-offset") == Linear("7:1", 4096)
    assert target("era") == Era("254:0", "7:0", 128)
    assert target("snapshot-origin") == SnapshotOrigin("7:0")
    assert target("snapshot") == Snapshot("7:0", "7:6", "P", 8)
    assert target("snapshot-overflow") == Snapshot("7:8", "7:7", "PO", 8)
    assert target("snapshot-discard") == Snapshot("7:0", "7:6", "P", 8, True, True)
    assert target("mirror-core") == Mirror("core", 1024, (("7:1", 0), ("7:2", 0)))
    assert target("mirror-disk-nosync") == Mirror(
        "disk", 1024, (("7:1", 0), ("7:2", 0)), log_device="254:0", sync="nosync"
    )
    assert target("mirror-core-3legs") == Mirror(
        "core",
        2048,
        (("7:1", 0), ("7:2", 0), ("7:3", 0)),
        sync="nosync",
        handle_errors=True,
        keep_log=True,
    )
    assert target("flakey-corrupt") == Flakey(
        "7:0", 0, 5, 5, corrupt_bio_byte=CorruptBioByte(32, "w", 1, 0)
    )
    assert target("flakey-offset") == Flakey("7:0", 8, 3600, 0)
    assert target("flakey-error-writes") == Flakey("7:0", 0, 5, 5, error_writes=True)
    assert target("delay-flush") == Delay(
        DelayClass("7:0", 0, 10), DelayClass("7:1", 16, 20), DelayClass("7:0", 8, 5)
    )
    assert target("zero") == Zero()
    assert target("error") == Error()


def test_multi_line_table() -> None:
    lines = parse_table(read("linear-multi", "table"))
    assert [(line.start, line.length, line.target.kind) for line in lines] == [
        (0, 1024, "linear"),
        (1024, 2048, "linear"),
        (3072, 1024, "zero"),
        (4096, 1024, "error"),
    ]
    assert table_devices(lines) == ("7:0", "7:1")


# --- tables the kernel refused ---------------------------------------------------------


@pytest.mark.parametrize("case", REFUSED)
def test_refused_inputs(case: str) -> None:
    """Combinations 6.1 refuses are refused here too; features of newer kernels parse."""
    newer_kernel_features = {"flakey-error-reads", "flakey-random-read"}
    assert "Invalid argument" in read(case, "error")
    if case in newer_kernel_features:
        parse_table(read(case, "input"))
    else:
        with pytest.raises(ParseError):
            parse_table(read(case, "input"))


def test_newer_flakey_features_render_in_kernel_order() -> None:
    target = Flakey(
        "7:0",
        0,
        5,
        5,
        error_reads=True,
        error_writes=True,
        corrupt_bio_byte=CorruptBioByte(1, "r", 0, 0),
        random_read_corrupt=100,
        random_write_corrupt=7,
    )
    text = (
        "7:0 0 5 5 11 error_reads error_writes corrupt_bio_byte 1 r 0 0"
        " random_read_corrupt 100 random_write_corrupt 7"
    )
    assert target.params() == text
    assert Flakey.parse(text) == target


# --- malformed variants of captured tables -----------------------------------------------

CAPTURED_LINES = [(case, raw) for case in TABLES for raw in table_lines(case)]
INTEGER = re.compile(r"^(0|[1-9][0-9]*)$")


def split(raw: str) -> tuple[str, str, str, list[str]]:
    start, length, kind, *params = raw.split()
    return start, length, kind, params


def join(start: str, length: str, kind: str, params: list[str]) -> str:
    return " ".join([start, length, kind, *params])


@pytest.mark.parametrize(("case", "raw"), CAPTURED_LINES)
def test_every_integer_made_malformed_is_refused(case: str, raw: str) -> None:
    start, length, kind, params = split(raw)
    for i, token in enumerate(params):
        if INTEGER.match(token):
            for bad in ("x", "-1", "0" + token, "+1", "1.0", "0x10"):
                mutated = join(start, length, kind, [*params[:i], bad, *params[i + 1 :]])
                with pytest.raises(ParseError):
                    parse_table_line(mutated)


@pytest.mark.parametrize(("case", "raw"), CAPTURED_LINES)
def test_an_extra_argument_is_refused(case: str, raw: str) -> None:
    start, length, kind, params = split(raw)
    for extra in ("extra", "1", "handle_errors"):
        with pytest.raises(ParseError):
            parse_table_line(join(start, length, kind, [*params, extra]))


@pytest.mark.parametrize(("case", "raw"), CAPTURED_LINES)
def test_a_missing_last_argument_is_refused(case: str, raw: str) -> None:
    start, length, kind, params = split(raw)
    if not params:
        return
    shortened = join(start, length, kind, params[:-1])
    target = parse_table_line(raw).target
    if isinstance(target, Flakey) and len(params) == 5:
        # The feature count is optional: "dev 0 5 5" means the same as "dev 0 5 5 0".
        assert parse_table_line(shortened).target == target
    else:
        with pytest.raises(ParseError):
            parse_table_line(shortened)


@pytest.mark.parametrize(("case", "raw"), CAPTURED_LINES)
def test_unknown_feature_names_are_refused(case: str, raw: str) -> None:
    start, length, kind, params = split(raw)
    known = {
        "handle_errors",
        "keep_log",
        "drop_writes",
        "error_writes",
        "corrupt_bio_byte",
        "discard_zeroes_cow",
        "discard_passdown_origin",
        "nosync",
        "sync",
        "core",
        "disk",
    }
    for i, token in enumerate(params):
        if token in known:
            with pytest.raises(ParseError):
                parse_table_line(
                    join(start, length, kind, [*params[:i], "bogus", *params[i + 1 :]])
                )


@pytest.mark.parametrize(
    "raw",
    [
        "0 100 bogus 7:0 0",  # unknown target type
        "0 100",  # no type
        "x 100 linear 7:0 0",
        "0 0 linear 7:0 0",  # empty segment
        "0 100 mirror core 1 1024 1 7:1 0",  # one leg
        "0 100 mirror core 1 1000 2 7:1 0 7:2 0",  # region not a power of 2
        "0 100 mirror core 2 1024 2 7:1 0 7:2 0",  # log arg count says 2, only region given
        "0 100 mirror disk 1 7:3 2 7:1 0 7:2 0",  # disk log needs a region size
        "0 100 mirror core 1 1024 2 7:1 0 7:2 0 1 keep_log",  # keep_log needs handle_errors
        "0 100 mirror core 1 1024 2 7:1 0 7:2 0 2 handle_errors handle_errors",
        "0 100 mirror userspace 3 clustered-core 1024 x 2 7:1 0 7:2 0",
        "0 100 snapshot 7:0 7:1 X 8",  # persistence flag
        "0 100 snapshot 7:0 7:1 P 12",  # chunk not a power of 2
        "0 100 snapshot 7:0 7:1 P 8 1 discard_passdown_origin",  # needs discard_zeroes_cow
        "0 100 flakey 7:0 0 0 0",  # zero interval
        "0 100 flakey 7:0 0 5 5 2 drop_writes error_writes",  # conflict (kernel refuses)
        "0 100 flakey 7:0 0 5 5 5 corrupt_bio_byte 0 w 1 0",  # bytes count from 1
        "0 100 flakey 7:0 0 5 5 5 corrupt_bio_byte 1 x 1 0",  # direction
        "0 100 flakey 7:0 0 5 5 5 corrupt_bio_byte 1 w 256 0",  # not a byte
        "0 100 flakey 7:0 0 5 5 4 corrupt_bio_byte 1 w 1",  # count too small for its args
        "0 100 delay 7:0 0 10 7:1",
        "0 100 era 7:0 7:1 0",  # block size 0
    ],
)
def test_malformed_lines(raw: str) -> None:
    with pytest.raises(ParseError):
        parse_table_line(raw)


def test_table_must_be_contiguous_from_zero() -> None:
    with pytest.raises(ParseError):
        parse_table("0 100 zero\n200 100 zero\n")
    with pytest.raises(ParseError):
        parse_table("10 100 zero\n")
    assert parse_table("") == ()
    assert parse_table("0 100 zero\n100 50 error\n")[1] == TableLine(100, 50, Error())


def test_lower_case_persistence_flag_is_read_as_the_kernel_does() -> None:
    assert Snapshot.parse("7:0 7:1 po 8").persistent == "PO"


# --- devices -----------------------------------------------------------------------------


def test_normalise_keeps_device_numbers_and_refuses_unknown_paths() -> None:
    lines = parse_table("0 100 mirror disk 2 /dev/log 1024 2 7:1 0 /dev/b 8\n")
    assert normalise_table(lines, {"/dev/log": "254:3", "/dev/b": "7:2"}) == parse_table(
        "0 100 mirror disk 2 254:3 1024 2 7:1 0 7:2 8\n"
    )
    with pytest.raises(UnknownDevice):
        normalise_table(lines, {"/dev/log": "254:3"})


def test_devices_of_every_target() -> None:
    assert Mirror("disk", 8, (("a", 0), ("b", 0)), log_device="l").devices() == ("l", "a", "b")
    assert Delay(DelayClass("r", 0, 1), DelayClass("w", 0, 1)).devices() == ("r", "w")
    assert Snapshot("o", "c", "N", 8).devices() == ("o", "c")
    assert Era("m", "o", 8).devices() == ("m", "o")
    assert Zero().devices() == () == Error().devices()
    moved = Delay(DelayClass("r", 0, 1)).map_devices(str.upper)
    assert moved == Delay(DelayClass("R", 0, 1))


# --- construction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Mirror("core", 1024, (("a", 0),)),
        lambda: Mirror("disk", 1024, (("a", 0), ("b", 0))),  # no log device
        lambda: Mirror("core", 1024, (("a", 0), ("b", 0)), log_device="l"),
        lambda: Mirror("core", 1024, (("a", 0), ("b", 0)), keep_log=True),
        lambda: Mirror("ram", 1024, (("a", 0), ("b", 0))),
        lambda: Snapshot("o", "c", "X", 8),  # type: ignore[arg-type]
        lambda: Flakey("d", 0, 1, 1, drop_writes=True, error_writes=True),
        lambda: Delay(DelayClass("r", 0, 1), None, DelayClass("f", 0, 1)),
        lambda: CorruptBioByte(0, "r", 0),
    ],
)
def test_invalid_values_cannot_be_built(build: object) -> None:
    with pytest.raises(ValueError):
        build()  # type: ignore[operator]


def test_existing_helpers_keep_working() -> None:
    assert single(2048, Linear("/dev/loop0")) == "0 2048 linear /dev/loop0 0\n"
    assert single(8, Zero()) == "0 8 zero\n"
    assert parse_target("era", "254:0 7:0 128") == Era("254:0", "7:0", 128)
