"""One map of the state directory (placeholder; replaced by the full map)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StateDir:
    root: Path

    def spool(self, group: str) -> Path:
        return self.root / "spool" / group

    def resync(self, group: str) -> Path:
        return self.spool(group) / "resync"

    def seeds(self, group: str) -> Path:
        return self.spool(group) / "seed"

    def journal(self, group: str, site: str) -> Path:
        return self.root / "journal" / f"{group}.{site}.journal"
