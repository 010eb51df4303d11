"""Device-mapper table lines as values: one class per target, `render()` gives dmsetup's text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Target(Protocol):
    """A target's type name and its parameter string."""

    @property
    def kind(self) -> str: ...

    def params(self) -> str: ...


@dataclass(frozen=True)
class Linear:
    """`linear <device> <offset>`: maps onto a device starting at an offset (sectors)."""

    device: str
    offset: int = 0
    kind: str = "linear"

    def params(self) -> str:
        return f"{self.device} {self.offset}"


@dataclass(frozen=True)
class Era:
    """`era <metadata dev> <origin dev> <block size>`: tracks writes per era block."""

    metadata: str
    origin: str
    block_sectors: int
    kind: str = "era"

    def params(self) -> str:
        return f"{self.metadata} {self.origin} {self.block_sectors}"


@dataclass(frozen=True)
class Zero:
    """`zero`: reads return zeros, writes are discarded."""

    kind: str = "zero"

    def params(self) -> str:
        return ""


@dataclass(frozen=True)
class TableLine:
    start: int
    length: int
    target: Target

    def render(self) -> str:
        params = self.target.params()
        return f"{self.start} {self.length} {self.target.kind}" + (f" {params}" if params else "")


def render_table(lines: tuple[TableLine, ...] | list[TableLine]) -> str:
    """The table text as `dmsetup create` reads it from stdin."""
    return "".join(line.render() + "\n" for line in lines)


def single(length: int, target: Target) -> str:
    """A one-line table covering [0, length)."""
    return render_table([TableLine(0, length, target)])
