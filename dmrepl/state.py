"""The state store: a SQLite database under the state directory.

Holds what must survive reboots that the kernel does not keep: for now, a log of
stack events (metadata formatted or reused, stacks built and removed).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    grp TEXT NOT NULL,
    device TEXT NOT NULL,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class Event:
    time: float
    group: str
    device: str
    kind: str
    detail: str


class StateStore:
    """Opens (creating if needed) `<state_dir>/state.db`."""

    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.path = state_dir / "state.db"
        self.db = sqlite3.connect(self.path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def record(self, group: str, device: str, kind: str, detail: str) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO events (time, grp, device, kind, detail) VALUES (?, ?, ?, ?, ?)",
                (time.time(), group, device, kind, detail),
            )

    def events(self, group: str | None = None, limit: int = 50) -> list[Event]:
        query = "SELECT time, grp, device, kind, detail FROM events"
        args: tuple[object, ...] = ()
        if group is not None:
            query += " WHERE grp = ?"
            args = (group,)
        rows = self.db.execute(query + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Event(*row) for row in rows]
