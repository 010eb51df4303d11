"""Parse `dmsetup status` lines of the targets dmrepl uses."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dmrepl.errors import ParseError

# dm-era: <metadata block size> <used>/<total metadata blocks> <current era> <held root | ->
# (Documentation/admin-guide/device-mapper/era.rst; verified on Debian 6.1, see tests/data).
_ERA_STATUS = re.compile(r"^(\d+) (\d+)/(\d+) (\d+) (-|\d+)$")


@dataclass(frozen=True)
class EraStatus:
    metadata_block_sectors: int
    metadata_used_blocks: int
    metadata_total_blocks: int
    current_era: int
    held_root: int | None  # metadata snapshot root while one is held

    @property
    def snapshot_held(self) -> bool:
        return self.held_root is not None


def parse_era_status(params: str) -> EraStatus:
    """Parse the parameters of an era status line (after `start length era`)."""
    match = _ERA_STATUS.match(params.strip())
    if not match:
        raise ParseError("dm-era status", params)
    block, used, total, era, held = match.groups()
    return EraStatus(
        int(block), int(used), int(total), int(era), None if held == "-" else int(held)
    )


@dataclass(frozen=True)
class StatusLine:
    """One line of `dmsetup status NAME`: start, length, target type, parameters."""

    start: int
    length: int
    target: str
    params: str


def parse_status_line(line: str) -> StatusLine:
    parts = line.strip().split(" ", 3)
    if len(parts) < 3 or not parts[0].isdigit() or not parts[1].isdigit():
        raise ParseError("dmsetup status line", line)
    return StatusLine(int(parts[0]), int(parts[1]), parts[2], parts[3] if len(parts) > 3 else "")
