"""Talking to a dm-era device: status, metadata snapshots, written-since lists."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from dmrepl import dm
from dmrepl.eraxml import parse_era_invalidate
from dmrepl.errors import ParseError
from dmrepl.executor import Runner, probe
from dmrepl.ranges import Extent, coalesce
from dmrepl.status import EraStatus, parse_era_status, parse_status_line


def read_status(runner: Runner, era_device: str) -> EraStatus:
    """The era device's status (refuses if it is suspended: that would block)."""
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
    held snapshot; the caller must hold one.
    """
    argv = ["era_invalidate", "--written-since", str(era)]
    if metadata_snapshot:
        argv.insert(1, "--metadata-snapshot")
    out = runner.run(probe(*argv, access_device)).stdout
    return list(coalesce(parse_era_invalidate([out])))
