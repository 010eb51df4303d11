"""Talking to a dm-era device: status, metadata snapshots, written-since lists."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from dmrepl import dm, erameta, erareader
from dmrepl.erameta import MetadataDoubt
from dmrepl.eraxml import EraInvalidateParser
from dmrepl.errors import ParseError
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import probe
from dmrepl.ranges import Extent
from dmrepl.status import EraStatus, parse_era_status, parse_status_line

log = logging.getLogger(__name__)

# How `written_since` reads a metadata snapshot: "auto" (our reader, era_invalidate
# when it has any doubt), "reader" (ours only: doubts are errors) or "tool" (era_invalidate).
LIST_ENV = "DMREPL_ERA_LIST"
LIST_MODES = ("auto", "reader", "tool")


class EraToolFailed(CommandFailed):
    """era_invalidate exited non-zero, its reason on stderr.

    thin-provisioning-tools 0.9.0 (C++) exits 1 (captured in tests/data/era/);
    the Rust rewrite is said to exit 64 (not captured here). Any non-zero code
    is a failure.
    """

    def __init__(self, argv: tuple[str, ...], device: str, returncode: int, stderr: str):
        super().__init__(argv, returncode, "", stderr)
        first = next((line for line in stderr.splitlines() if line.strip()), "(no message)")
        self.device = device
        self.message = f"era_invalidate failed on {device} (exit code {returncode}): {first}"
        self.args = (self.message,)
        self.hint = (
            "is a metadata snapshot held on the era device, and is this its metadata "
            "(access) device? run `dmrepl status`"
        )


def read_status(runner: Runner, era_device: str, *, checked: bool = True) -> EraStatus:
    """The era device's status (refuses if it is suspended: that would block).

    `checked=False` skips the suspension check (one process start) for callers
    that know the device is active: they resumed it or never suspended it.
    """
    if checked:
        dm.require_active(runner, era_device)
    line = parse_status_line(runner.run(dm.status(era_device)).stdout)
    if line.target != "era":
        raise ParseError(f"status of {era_device} (not an era target)", line.target)
    return parse_era_status(line.params)


@contextmanager
def metadata_snapshot(runner: Runner, era_device: str) -> Iterator[EraStatus]:
    """Hold a metadata snapshot for the body; always drop it afterwards.

    `take_metadata_snap` also closes the current era (the era number moves on),
    so the yielded status shows the era that writes after the take belong to.
    """
    dm.require_active(runner, era_device)
    runner.run(dm.message(era_device, "take_metadata_snap"))
    try:
        yield read_status(runner, era_device)
    finally:
        runner.run(dm.message(era_device, "drop_metadata_snap"))


def written_since(
    runner: Runner, access_device: str, era: int, *, metadata_snapshot: bool = True
) -> list[Extent]:
    """Era-block extents written in era `era` or later, coalesced.

    Run against the read path onto the metadata (the era target holds the
    metadata device itself exclusively). With `metadata_snapshot`, reads the
    held snapshot; the caller must hold one. The tool's output is parsed as it
    arrives, so memory follows the number of coalesced ranges, not its length.
    Raises `EraToolFailed` when the tool fails, `ParseError` on output it cannot read.

    A held snapshot is read by `dmrepl.erareader` (tens of milliseconds where
    the tool takes seconds on large devices); on any doubt (a bad checksum, a
    shape it does not know, no crc32c module) era_invalidate lists it instead.
    `DMREPL_ERA_LIST` chooses (`LIST_MODES`).
    """
    mode = list_mode()
    if mode == "auto" and not erameta.FAST_CHECKSUMS:
        _warn_once("the crc32c module is not installed: change lists use era_invalidate")
        mode = "tool"
    if metadata_snapshot and mode != "tool":
        try:
            return erareader.written_since(access_device, era)
        except (MetadataDoubt, OSError) as exc:
            if mode == "reader":
                raise
            log.warning("era metadata of %s: %s; listing with era_invalidate", access_device, exc)
    return _tool_written_since(runner, access_device, era, metadata_snapshot=metadata_snapshot)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)


def list_mode() -> str:
    """The `DMREPL_ERA_LIST` setting (default "auto")."""
    mode = os.environ.get(LIST_ENV, "auto") or "auto"
    if mode not in LIST_MODES:
        raise ValueError(f"{LIST_ENV}={mode!r}: expected one of {', '.join(LIST_MODES)}")
    return mode


def _tool_written_since(
    runner: Runner, access_device: str, era: int, *, metadata_snapshot: bool
) -> list[Extent]:
    """`written_since` by era_invalidate."""
    argv = ["era_invalidate", "--written-since", str(era)]
    if metadata_snapshot:
        argv.insert(1, "--metadata-snapshot")
    op = dataclasses.replace(probe(*argv, access_device), timeout_s=runner.timeout_s)
    reader = _StreamedList()
    errors: list[str] = []
    code = runner.stream(op, reader.feed, stderr=errors.append)
    if code != 0:
        raise EraToolFailed(op.argv, access_device, code, "".join(errors))
    return reader.result()


class _StreamedList:
    """The stdout sink: feeds the parser and keeps the finished extents.

    It runs on the runner's reader thread, where an exception would be lost
    (and leave the tool blocked on a full pipe), so an error is kept and
    raised by `result` once the tool has exited.
    """

    def __init__(self) -> None:
        self.parser = EraInvalidateParser()
        self.extents: list[Extent] = []
        self.error: Exception | None = None

    def feed(self, text: str) -> bool:
        try:
            self.extents += self.parser.feed(text)
        except Exception as exc:  # raised by result(), on the caller's thread
            self.error = exc
        return self.error is not None  # True: pass no more lines

    def result(self) -> list[Extent]:
        if self.error is not None:
            raise self.error
        return self.extents + self.parser.close()
