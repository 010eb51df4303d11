"""era_invalidate output parsed as it streams; the tool's failures as a typed error."""

from __future__ import annotations

import random
import stat
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dmrepl import era
from dmrepl.era import EraToolFailed
from dmrepl.eraxml import EraInvalidateParser, parse_era_invalidate
from dmrepl.errors import ExitCode, ParseError
from dmrepl.executor import DryRunRunner, Runner
from dmrepl.ops import Op, probe
from dmrepl.ranges import Extent, coalesce

DATA = Path(__file__).parent.parent / "data" / "era"
ACCESS = "/dev/mapper/db-data-access"


def captured(name: str) -> str:
    return (DATA / name).read_text()


def synthetic(count: int, *, spaced: bool, seed: int = 5) -> tuple[str, list[Extent]]:
    """era_invalidate-like output of `count` elements and its coalesced extents.

    Blocks and ranges in ascending order; about half touch the one before, so
    coalescing has work to do.
    """
    rng = random.Random(seed)
    eq = " = " if spaced else "="
    lines = ["<blocks>"]
    listed: list[Extent] = []
    block = 0
    for _ in range(count):
        block += rng.choice((0, 0, 1, 2, 7))  # 0: touches the previous extent
        if rng.random() < 0.5:
            lines.append(f'  <block block{eq}"{block}"/>')
            listed.append(Extent(block, block + 1))
            block += 1
        else:
            length = rng.randint(2, 40)
            lines.append(f'  <range begin{eq}"{block}" end{eq}"{block + length}"/>')
            listed.append(Extent(block, block + length))
            block += length
    lines.append("</blocks>")
    return "\n".join(lines) + "\n", list(coalesce(listed))


def pieces(text: str, seed: int = 9) -> Iterator[str]:
    """`text` cut into small pieces of 1..13 characters (mid-tag, mid-attribute)."""
    rng = random.Random(seed)
    at = 0
    while at < len(text):
        step = rng.randint(1, 13)
        yield text[at : at + step]
        at += step


@pytest.mark.parametrize("spaced", [True, False], ids=["end = (C++ 0.9.0)", "end= (Rust)"])
def test_large_output_in_small_pieces_coalesces_on_the_fly(spaced: bool) -> None:
    text, expected = synthetic(50_000, spaced=spaced)
    assert ('end = "' in text) == spaced
    parser = EraInvalidateParser()
    got: list[Extent] = []
    for piece in pieces(text):
        got += parser.feed(piece)
    got += parser.close()
    assert got == expected
    assert len(expected) < 40_000  # coalescing merged many


def test_pushed_extents_are_returned_when_complete() -> None:
    parser = EraInvalidateParser()
    assert parser.feed('<blocks><block block="3"/>') == []  # may still grow
    assert parser.feed('<range begin="4" end = "9"/>') == []  # touched: grew
    assert parser.feed('<block block="12"/>') == [Extent(3, 9)]  # gap: [3, 9) is final
    assert parser.feed("</blocks>\n") == []
    assert parser.close() == [Extent(12, 13)]


def test_without_coalescing_every_listed_extent_comes_back() -> None:
    text = '<blocks><block block="3"/><block block="4"/></blocks>'
    assert list(parse_era_invalidate([text])) == [Extent(3, 4), Extent(4, 5)]
    assert list(parse_era_invalidate([text], coalesce=True)) == [Extent(3, 5)]


def test_captured_cpp_output_line_by_line() -> None:
    lines = captured("written-since-1.xml").splitlines(keepends=True)
    assert list(parse_era_invalidate(lines, coalesce=True)) == [
        Extent(3, 4),
        Extent(10, 13),
        Extent(20, 21),
        Extent(511, 512),
    ]


@pytest.mark.parametrize(
    "text", ["<blocks/>", "<blocks/>\n", captured("written-since-2-empty.xml")]
)
def test_empty_list(text: str) -> None:
    assert list(parse_era_invalidate(pieces(text), coalesce=True)) == []


def test_out_of_order_extents_are_refused_when_coalescing() -> None:
    with pytest.raises(ParseError, match="out of order"):
        list(parse_era_invalidate(['<blocks><block block="9"/><block block="3"/>'], coalesce=True))


def test_memory_stays_flat_for_many_ranges_streamed_through() -> None:
    # 100 000 separate blocks pass through; nothing is kept by the parser
    # (a tree-building parser held every element: about 200 bytes each).
    def output() -> Iterator[str]:
        yield "<blocks>\n"
        for block in range(0, 200_000, 2):
            yield f'  <block block="{block}"/>\n'
        yield "</blocks>\n"

    parser = EraInvalidateParser()
    count = 0
    tracemalloc.start()
    try:
        for line in output():
            count += len(parser.feed(line))
        count += len(parser.close())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 100_000
    assert peak < 1_000_000


def test_feeding_after_an_error_is_refused() -> None:
    parser = EraInvalidateParser()
    with pytest.raises(ParseError, match="not well-formed"):
        parser.feed("bad checksum in superblock")
    with pytest.raises(ValueError):
        parser.feed("<blocks/>")


class FakeStream(Runner):
    """Plays a recorded tool run into `stream`: stdout pieces, stderr, exit code."""

    def __init__(self, stdout: Iterator[str] | list[str], stderr: str = "", code: int = 0):
        super().__init__(timeout_s=33)
        self.stdout, self.stderr, self.code = stdout, stderr, code
        self.ops: list[Op] = []
        self.sent = 0

    def stream(
        self,
        op: Op,
        sink: Callable[[str], object] | None = None,
        *,
        stderr: Callable[[str], object] | None = None,
    ) -> int:
        assert sink is not None and stderr is not None  # stdout must not mix with stderr
        self.ops.append(op)
        for piece in self.stdout:
            self.sent += 1
            if sink(piece):
                break
        for line in self.stderr.splitlines(keepends=True):
            stderr(line)
        return self.code


def test_written_since_streams_and_coalesces() -> None:
    text, expected = synthetic(20_000, spaced=True)
    runner = FakeStream(pieces(text))
    assert era.written_since(runner, ACCESS, 7) == expected
    (op,) = runner.ops
    assert op.argv == (
        "era_invalidate",
        "--metadata-snapshot",
        "--written-since",
        "7",
        ACCESS,
    )
    assert not op.mutating  # a probe: it runs under --dry-run too
    assert op.timeout_s == 33  # the runner's timeout, as run() would apply


def test_written_since_without_metadata_snapshot() -> None:
    runner = FakeStream(["<blocks/>\n"])
    assert era.written_since(runner, ACCESS, 1, metadata_snapshot=False) == []
    assert "--metadata-snapshot" not in runner.ops[0].argv


@pytest.mark.parametrize(
    ("code", "stderr"),
    [
        # thin-provisioning-tools 0.9.0, as captured (access path given the gate instead)
        (
            int(captured("error-not-metadata.exit")),
            captured("error-not-metadata.stderr"),
        ),
        (64, "Couldn't find a metadata snapshot\n"),  # Rust tools' code; message made up
    ],
    ids=["exit 1 (C++)", "exit 64 (Rust)"],
)
def test_tool_failure_is_a_typed_error(code: int, stderr: str) -> None:
    runner = FakeStream([captured("error-not-metadata.stdout")], stderr=stderr, code=code)
    with pytest.raises(EraToolFailed) as caught:
        era.written_since(runner, ACCESS, 1)
    error = caught.value
    assert error.exit_code == ExitCode.COMMAND_FAILED
    assert error.returncode == code
    assert ACCESS in error.message
    assert stderr.strip() in error.message
    assert f"exit code {code}" in error.message
    assert error.context == stderr.strip()
    assert error.hint is not None and "dmrepl status" in error.hint


def test_tool_failure_wins_over_truncated_output() -> None:
    runner = FakeStream(["<blocks>\n", '  <block block="1"/>\n'], stderr="io error\n", code=1)
    with pytest.raises(EraToolFailed, match="io error"):
        era.written_since(runner, ACCESS, 1)


def test_unreadable_output_stops_the_sink_and_raises_on_the_caller() -> None:
    runner = FakeStream(["<ranges>\n"] + ['  <block block="1"/>\n'] * 1000)
    with pytest.raises(ParseError, match="root is not <blocks>"):
        era.written_since(runner, ACCESS, 1)
    assert runner.sent == 1  # the sink asked for no more lines after the error


def test_truncated_output_with_exit_zero_is_a_parse_error() -> None:
    runner = FakeStream(["<blocks>\n", '  <block block="1"/>\n'])
    with pytest.raises(ParseError, match="truncated"):
        era.written_since(runner, ACCESS, 1)


@pytest.fixture
def fake_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """Install an `era_invalidate` shell script (body given) first on PATH."""

    def install(body: str) -> None:
        script = tmp_path / "era_invalidate"
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(script.stat().st_mode | stat.S_IXUSR)

    monkeypatch.setenv("PATH", f"{tmp_path}:{Path('/usr/bin')}:{Path('/bin')}")
    return install


@pytest.mark.timeout(60)
def test_real_process_streams_through_the_runner(fake_tool: Callable[[str], None]) -> None:
    # 200 000 lines: blocks 0, 2, 4, ... each printed as its own element
    fake_tool(
        "echo '<blocks>'; seq 0 2 399998 | sed 's/.*/  <block block = \"&\"\\/>/'; echo '</blocks>'"
    )
    extents = era.written_since(Runner(), ACCESS, 1)
    assert len(extents) == 200_000
    assert extents[0] == Extent(0, 1) and extents[-1] == Extent(399_998, 399_999)


@pytest.mark.timeout(60)
def test_real_process_failure_keeps_stderr_apart(fake_tool: Callable[[str], None]) -> None:
    fake_tool(
        f"cat {DATA / 'error-not-metadata.stdout'}; echo 'bad checksum in superblock' >&2; exit 1"
    )
    with pytest.raises(EraToolFailed, match="bad checksum in superblock") as caught:
        era.written_since(Runner(), ACCESS, 1)
    assert caught.value.returncode == 1


@pytest.mark.timeout(60)
def test_real_process_bad_output_does_not_block_the_tool(fake_tool: Callable[[str], None]) -> None:
    # The sink stops at the first line; the tool still prints megabytes and must
    # not block on a full pipe.
    fake_tool("echo 'not xml'; seq 1 300000")
    with pytest.raises(ParseError, match="not well-formed"):
        era.written_since(Runner(), ACCESS, 1)


@pytest.mark.timeout(60)
def test_dry_run_still_runs_it(fake_tool: Callable[[str], None]) -> None:
    fake_tool(f"cat {DATA / 'written-since-1.xml'}")
    printed: list[str] = []
    extents = era.written_since(DryRunRunner(sink=printed.append), ACCESS, 1)
    assert extents == [Extent(3, 4), Extent(10, 13), Extent(20, 21), Extent(511, 512)]
    assert printed == []


def test_runner_stream_can_keep_stderr_apart() -> None:
    out: list[str] = []
    err: list[str] = []
    code = Runner().stream(
        probe("sh", "-c", "echo one; echo two >&2; echo three; exit 3"),
        out.append,
        stderr=err.append,
    )
    assert code == 3
    assert "".join(out) == "one\nthree\n"
    assert "".join(err) == "two\n"
