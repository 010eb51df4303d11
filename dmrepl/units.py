"""Units: sectors are the one internal unit; conversions live here.

Sizes typed by users accept a bare number of sectors (`4096`), an explicit
`s` suffix (`4096s`), binary multiples (`2M`, `2MiB`, `16T`, `16TiB`) and byte
counts with `B` (`4096B`). Decimal SI units (`MB`, `GB`, ...) are accepted too
and mean powers of 1000, as `lsblk --bytes` users expect.
"""

from __future__ import annotations

import re
from typing import NewType

from dmrepl.errors import InvalidInput

Sectors = NewType("Sectors", int)
Bytes = NewType("Bytes", int)
EraBlocks = NewType("EraBlocks", int)

SECTOR_BYTES = 512

_BINARY = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40, "P": 2**50, "E": 2**60}
_DECIMAL = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}
_SIZE_RE = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>s|[KMGTPE]iB|[KMGTPE]B|[KMGTPE]|[kmgtpe]|B)?\s*$"
)


def parse_size_bytes(text: str, *, what: str = "size") -> Bytes:
    """Parse a user-typed size into bytes. A bare number means sectors."""
    match = _SIZE_RE.match(text)
    if not match:
        raise InvalidInput(
            f"cannot read {what} {text!r}",
            hint="use sectors (4096 or 4096s), binary units (2MiB, 2M, 16T) or bytes (4096B)",
        )
    number, unit = match["num"], match["unit"] or "s"
    if unit == "s":
        factor = SECTOR_BYTES
    elif unit == "B":
        factor = 1
    elif unit.endswith("iB"):
        factor = _BINARY[unit[0]]
    elif len(unit) == 2:
        factor = _DECIMAL[unit[0]]
    else:
        factor = _BINARY[unit.upper()]
    value = float(number) * factor if "." in number else int(number) * factor
    if value != int(value):
        raise InvalidInput(f"{what} {text!r} is not a whole number of bytes")
    return Bytes(int(value))


def parse_size_sectors(text: str, *, what: str = "size") -> Sectors:
    """Parse a user-typed size that must be a whole number of 512-byte sectors."""
    size = parse_size_bytes(text, what=what)
    if size % SECTOR_BYTES:
        raise InvalidInput(
            f"{what} {text!r} is {size} bytes, not a whole number of 512-byte sectors",
            hint="round it to a multiple of 512 bytes",
        )
    return Sectors(size // SECTOR_BYTES)


def bytes_to_sectors(size: int) -> Sectors:
    """Whole sectors covering `size` bytes (rounded up)."""
    return Sectors(-(-size // SECTOR_BYTES))


def sectors_to_bytes(sectors: int) -> Bytes:
    return Bytes(sectors * SECTOR_BYTES)


def format_bytes(size: int) -> str:
    """Human binary size: `0 B`, `512 B`, `4 KiB`, `1.5 GiB`."""
    for unit in ("EiB", "PiB", "TiB", "GiB", "MiB", "KiB"):
        factor = _BINARY[unit[0]]
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size} B"


def format_sectors(sectors: int) -> str:
    """Human size of a sector count, with the exact count: `2 MiB (4096 sectors)`."""
    return f"{format_bytes(sectors_to_bytes(sectors))} ({sectors} sectors)"
