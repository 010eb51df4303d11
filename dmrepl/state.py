"""The state store: a SQLite database under the state directory.

Holds what must survive reboots that the kernel does not keep: a log of stack
events (metadata formatted or reused, stacks built and removed), the cuts of each
group, and each site's cursor (the last cut it applied durably) and health, and the ranges
a site placed by `dmrepl reverse` is still owed.
"""

from __future__ import annotations

import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dmrepl import safefile
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.policy import WriteCounters
from dmrepl.ranges import Extent
from dmrepl.statedir import StateDir

SCHEMA = """
CREATE TABLE IF NOT EXISTS cuts (
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    time REAL NOT NULL,
    stall_s REAL NOT NULL,
    PRIMARY KEY (grp, seq)
);
CREATE TABLE IF NOT EXISTS cut_devices (
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    device TEXT NOT NULL,
    era INTEGER NOT NULL,
    PRIMARY KEY (grp, seq, device)
);
CREATE TABLE IF NOT EXISTS sites (
    grp TEXT NOT NULL,
    site TEXT NOT NULL,
    seq INTEGER,
    applied REAL,
    state TEXT NOT NULL,
    detail TEXT NOT NULL,
    checked REAL NOT NULL,
    PRIMARY KEY (grp, site)
);
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


@dataclass(frozen=True)
class CutRecord:
    """A completed cut: every write to the group's devices before it carries an era at most
    `eras[device]`; every write after it carries a later era."""

    group: str
    seq: int
    time: float
    stall_s: float
    eras: dict[str, int]


@dataclass(frozen=True)
class TransferRecord:
    """The last delta sent to a remote site: when, which cut, and how it crossed the wire."""

    time: float
    seq: int
    resumed_from: int
    stream_bytes: int
    wire_bytes: int
    seconds: float


@dataclass(frozen=True)
class SiteRecord:
    """What the primary knows of a site: its cursor and how the last attempt went."""

    group: str
    site: str
    seq: int | None  # the last cut it applied durably; None: never seeded
    applied: float | None  # when that apply finished
    state: str  # in sync, behind, down, resyncing, seeding, ...
    detail: str  # the last error, if any
    checked: float


# sqlite3's result codes for a file that is damaged or not a database at all.
_CORRUPT_CODES = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB
# A reader finding a hot rollback journal (a writer died mid-transaction) it may not roll back.
_READONLY_ROLLBACK = 776  # SQLITE_READONLY_ROLLBACK
_TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))
# Added later: a store without it is still whole (the last transfer is simply unknown).
TRANSFERS = """
CREATE TABLE IF NOT EXISTS transfers (
    grp TEXT NOT NULL,
    site TEXT NOT NULL,
    time REAL NOT NULL,
    seq INTEGER NOT NULL,
    resumed_from INTEGER NOT NULL,
    stream_bytes INTEGER NOT NULL,
    wire_bytes INTEGER NOT NULL,
    seconds REAL NOT NULL,
    PRIMARY KEY (grp, site)
);
"""
# Added with the fall-behind policies: each gate's write counters as a cut saw them, and
# each site's policy mode with how often it switched.
POLICY_TABLES = """
CREATE TABLE IF NOT EXISTS cut_counters (
    grp TEXT NOT NULL,
    seq INTEGER NOT NULL,
    device TEXT NOT NULL,
    write_ios INTEGER NOT NULL,
    write_sectors INTEGER NOT NULL,
    PRIMARY KEY (grp, seq, device)
);
CREATE TABLE IF NOT EXISTS site_modes (
    grp TEXT NOT NULL,
    site TEXT NOT NULL,
    mode TEXT NOT NULL,
    since REAL NOT NULL,
    reason TEXT NOT NULL,
    enforced INTEGER NOT NULL DEFAULT 0,
    released INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (grp, site)
);
"""
# Added with failback: the ranges a site placed at a cut by `dmrepl reverse` must still be
# sent (what the old primary wrote after the cut its replicas were promoted at).
FAILBACK_TABLES = """
CREATE TABLE IF NOT EXISTS owed (
    grp TEXT NOT NULL,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    first_sector INTEGER NOT NULL,
    end_sector INTEGER NOT NULL
);
"""
# Added with the metrics (dmrepl.metrics): running totals and last times that outlive a
# process, such as cycles by result or bytes shipped to a site; site '' holds a group's own.
TALLIES = """
CREATE TABLE IF NOT EXISTS tallies (
    grp TEXT NOT NULL,
    site TEXT NOT NULL,
    name TEXT NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (grp, site, name)
);
"""


class SiteMode(StrEnum):
    """How a site is driven now (dmrepl.policy)."""

    NORMAL = "normal"  # by its policy
    ENFORCED = "enforced"  # over its fall-behind limit: driven synchronously
    DROPPED = "dropped"  # writers were held for it longer than stall_limit: not held again
    # until it has caught up


@dataclass(frozen=True)
class SiteModeRecord:
    mode: SiteMode
    since: float
    reason: str
    enforced: int  # times switched to synchronous behaviour
    released: int  # times switched back
    dropped: int  # times dropped after holding writers for stall_limit


NORMAL_MODE = SiteModeRecord(SiteMode.NORMAL, 0.0, "", 0, 0, 0)


class StateStoreError(DmreplError):
    """The state store cannot be opened (not because it is corrupt: that one is rebuilt)."""

    exit_code = ExitCode.INVALID_INPUT  # like a state_dir that cannot be used (safefile)


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


_WRITER_HINT = (
    "check that the state directory is writable and not on a full or read-only "
    "filesystem, and that no other program holds the file"
)


def _unusable(
    path: Path, exc: Exception, more: str = "", hint: str = _WRITER_HINT
) -> StateStoreError:
    return StateStoreError(f"cannot use the state store {path}: {exc}{more}", hint=hint)


def _quick_check(db: sqlite3.Connection) -> None:
    """Raise sqlite3.DatabaseError (with a corrupt code) unless SQLite's quick_check passes."""
    (verdict,) = db.execute("PRAGMA quick_check(1)").fetchone()
    if verdict != "ok":
        error = sqlite3.DatabaseError(f"integrity check: {verdict}")
        error.sqlite_errorcode = _CORRUPT_CODES[0]
        raise error


class StateStore:
    """Opens (creating if needed) `<state_dir>/state.db`; `open_readonly` only reads it.

    The store is a cache of what the kernel and the sites know. A corrupt one is
    moved aside as `state.db.corrupt-<UTC time>` (kept as evidence), `warn` says
    so, and a new one is started; the cycle then rebuilds each site's cursor from
    the site's own record (see dmrepl.replication.cycle).
    """

    def __init__(self, state_dir: Path, warn: Callable[[str], None] = _warn):
        safefile.private_dir(state_dir, what="state_dir")
        self.path = StateDir(state_dir).db
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            if (getattr(exc, "sqlite_errorcode", 0) & 0xFF) not in _CORRUPT_CODES:
                raise _unusable(self.path, exc) from None
            try:
                aside = self._move_aside()
            except OSError as failed:
                raise _unusable(self.path, exc, f"; moving it aside failed: {failed}") from None
            warn(
                f"{self.path} is corrupt ({exc}); moved it to {aside.name} and started a new "
                "state store. Each site's place is taken from the site itself; a site holding "
                "a cut the new store does not know is re-seeded by compare."
            )
            try:
                self.db = self._open()
            except sqlite3.Error as again:
                raise _unusable(self.path, again) from None

    @classmethod
    def open_readonly(
        cls, state_dir: Path, warn: Callable[[str], None] = _warn
    ) -> StateStore | None:
        """Open `<state_dir>/state.db` to read only (SQLite `mode=ro`): nothing is created,
        changed or moved aside, so a read command leaves a fresh host as it found it.

        None when there is no history to read: no state directory or store, a store without
        its tables, or (with a warning) a corrupt store or one whose interrupted write left a
        rollback journal only a writer may replay; the next writing run moves the first aside
        and finishes the second. Raises UnsafePath for an unsafe state directory (as a writer
        would) and StateStoreError when the store cannot be read for another reason.
        """
        path = StateDir(state_dir).db
        if not os.path.lexists(state_dir):
            return None
        safefile.check_directory(state_dir, what="state_dir")
        hint = "check the permissions of the file and that no other program holds it"
        try:  # a symlink, a FIFO or another user's file is refused as a writer refuses it
            os.close(safefile.open_own(path, os.O_RDONLY, create=False))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unusable(path, exc, hint=hint) from None
        try:
            db = sqlite3.connect(Path(os.path.abspath(path)).as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as exc:
            raise _unusable(path, exc, hint=hint) from None
        try:
            _quick_check(db)
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as exc:
            db.close()
            code = getattr(exc, "sqlite_errorcode", 0)
            if code & 0xFF in _CORRUPT_CODES:
                warn(
                    f"{path} is corrupt ({exc}): read as holding no history, and left as it is "
                    "(the next sync moves it aside and starts a new state store)"
                )
                return None
            if code == _READONLY_ROLLBACK:
                warn(
                    f"{path} holds a write an interrupted run did not finish "
                    f"({path.name}-journal): read as holding no history, and left as it is "
                    "(the next sync finishes it)"
                )
                return None
            raise _unusable(path, exc, hint=hint) from None
        if not tables >= _TABLES:  # created empty (a full disk) and never filled
            db.close()
            return None
        store = cls.__new__(cls)
        store.path, store.db = path, db
        return store

    def _open(self) -> sqlite3.Connection:
        try:  # created 0600 and never through a link; then sqlite opens it
            os.close(safefile.open_own(self.path))
        except OSError as exc:
            raise _unusable(self.path, exc) from None
        db = sqlite3.connect(self.path)
        try:
            _quick_check(db)
            db.executescript(SCHEMA + TRANSFERS + POLICY_TABLES + FAILBACK_TABLES + TALLIES)
        except BaseException:
            db.close()
            raise
        return db

    def _move_aside(self) -> Path:
        """Rename the corrupt database (and its rollback journal) out of the way, never over
        an earlier one."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        count = 1
        while aside.exists():
            count += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{count}")
        os.rename(self.path, aside)
        journal = self.path.with_name(self.path.name + "-journal")
        if journal.exists():
            os.rename(journal, aside.with_name(aside.name + "-journal"))
        return aside

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

    def next_cut_seq(self, group: str) -> int:
        (last,) = self.db.execute(
            "SELECT COALESCE(MAX(seq), 0) FROM cuts WHERE grp = ?", (group,)
        ).fetchone()
        return int(last) + 1

    def record_cut(
        self,
        group: str,
        eras: dict[str, int],
        stall_s: float,
        seq: int | None = None,
        counters: dict[str, WriteCounters] | None = None,
    ) -> CutRecord:
        """Store a new cut (by default with the next sequence number of its group), with
        the gates' write counters as the cut saw them when they were read."""
        with self.db:
            seq = self.next_cut_seq(group) if seq is None else seq
            record = CutRecord(group, seq, time.time(), stall_s, dict(eras))
            self.db.execute(
                "INSERT INTO cuts (grp, seq, time, stall_s) VALUES (?, ?, ?, ?)",
                (group, record.seq, record.time, stall_s),
            )
            self.db.executemany(
                "INSERT INTO cut_devices (grp, seq, device, era) VALUES (?, ?, ?, ?)",
                [(group, record.seq, device, era) for device, era in eras.items()],
            )
            self.db.executemany(
                "INSERT INTO cut_counters (grp, seq, device, write_ios, write_sectors) "
                "VALUES (?, ?, ?, ?, ?)",
                [(group, record.seq, d, c.ios, c.sectors) for d, c in (counters or {}).items()],
            )
        return record

    def _added_later(self, query: str, args: tuple[object, ...]) -> list[Any]:
        """The rows of a query on a table added after the first release: none from a store
        opened read-only that predates it (a writer creates it on opening)."""
        try:
            return self.db.execute(query, args).fetchall()
        except sqlite3.OperationalError:
            return []

    def cut_counters(self, group: str, seq: int) -> dict[str, WriteCounters]:
        """Each gate's write counters at cut `seq` (empty: not recorded)."""
        rows = self._added_later(
            "SELECT device, write_ios, write_sectors FROM cut_counters WHERE grp = ? AND seq = ?",
            (group, seq),
        )
        return {device: WriteCounters(ios, sectors) for device, ios, sectors in rows}

    def site_mode(self, group: str, site: str) -> SiteModeRecord:
        rows = self._added_later(
            "SELECT mode, since, reason, enforced, released, dropped FROM site_modes "
            "WHERE grp = ? AND site = ?",
            (group, site),
        )
        return SiteModeRecord(SiteMode(rows[0][0]), *rows[0][1:]) if rows else NORMAL_MODE

    def switch_mode(self, group: str, site: str, mode: SiteMode, reason: str) -> None:
        """Record a site's switch to `mode` (and count it)."""
        counted = {SiteMode.ENFORCED: "enforced", SiteMode.NORMAL: "released"}.get(mode, "dropped")
        with self.db:
            self.db.execute(
                "INSERT INTO site_modes (grp, site, mode, since, reason) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (grp, site) DO UPDATE SET mode = excluded.mode, "
                "since = excluded.since, reason = excluded.reason",
                (group, site, mode.value, time.time(), reason),
            )
            self.db.execute(
                f"UPDATE site_modes SET {counted} = {counted} + 1 WHERE grp = ? AND site = ?",
                (group, site),
            )

    def cuts(self, group: str, limit: int = 20) -> list[CutRecord]:
        """The group's latest cuts, newest first."""
        rows = self.db.execute(
            "SELECT seq, time, stall_s FROM cuts WHERE grp = ? ORDER BY seq DESC LIMIT ?",
            (group, limit),
        ).fetchall()
        return [self._cut(group, seq, when, stall) for seq, when, stall in rows]

    def cut(self, group: str, seq: int) -> CutRecord | None:
        row = self.db.execute(
            "SELECT time, stall_s FROM cuts WHERE grp = ? AND seq = ?", (group, seq)
        ).fetchone()
        return None if row is None else self._cut(group, seq, row[0], row[1])

    def _cut(self, group: str, seq: int, when: float, stall_s: float) -> CutRecord:
        eras = dict(
            self.db.execute(
                "SELECT device, era FROM cut_devices WHERE grp = ? AND seq = ?", (group, seq)
            ).fetchall()
        )
        return CutRecord(group, seq, when, stall_s, eras)

    def site(self, group: str, site: str) -> SiteRecord | None:
        row = self.db.execute(
            "SELECT seq, applied, state, detail, checked FROM sites WHERE grp = ? AND site = ?",
            (group, site),
        ).fetchone()
        return None if row is None else SiteRecord(group, site, *row)

    def set_cursor(self, group: str, site: str, seq: int, state: str = "in sync") -> None:
        """The site applied cut `seq` durably."""
        now = time.time()
        with self.db:
            self.db.execute(
                "INSERT INTO sites (grp, site, seq, applied, state, detail, checked) "
                "VALUES (?, ?, ?, ?, ?, '', ?) ON CONFLICT (grp, site) DO UPDATE SET "
                "seq = excluded.seq, applied = excluded.applied, state = excluded.state, "
                "detail = '', checked = excluded.checked",
                (group, site, seq, now, state, now),
            )

    def record_transfer(self, group: str, site: str, transfer: TransferRecord) -> None:
        """How the last delta reached a remote site (its throughput and compression)."""
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO transfers (grp, site, time, seq, resumed_from, "
                "stream_bytes, wire_bytes, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (group, site, transfer.time, transfer.seq, transfer.resumed_from,
                 transfer.stream_bytes, transfer.wire_bytes, transfer.seconds),
            )  # fmt: skip

    def last_transfer(self, group: str, site: str) -> TransferRecord | None:
        rows = self._added_later(
            "SELECT time, seq, resumed_from, stream_bytes, wire_bytes, seconds "
            "FROM transfers WHERE grp = ? AND site = ?",
            (group, site),
        )
        return TransferRecord(*rows[0]) if rows else None

    def tally(
        self,
        group: str,
        site: str,
        add: Mapping[str, float],
        stamp: Mapping[str, float] | None = None,
    ) -> None:
        """Add `add` to the named running totals of a group (`site` '') or site, and set the
        names in `stamp` (last times) to their values."""
        with self.db:
            self.db.executemany(
                "INSERT INTO tallies (grp, site, name, value) VALUES (?, ?, ?, ?) ON CONFLICT "
                "(grp, site, name) DO UPDATE SET value = value + excluded.value",
                [(group, site, name, amount) for name, amount in add.items()],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO tallies (grp, site, name, value) VALUES (?, ?, ?, ?)",
                [(group, site, name, value) for name, value in (stamp or {}).items()],
            )

    def tallies(self, group: str) -> dict[tuple[str, str], float]:
        """The group's running totals and last times: (site, name) -> value."""
        rows = self._added_later("SELECT site, name, value FROM tallies WHERE grp = ?", (group,))
        return {(site, name): value for site, name, value in rows}

    def stall_histogram(
        self, group: str, bounds: Iterable[float]
    ) -> tuple[list[tuple[float, int]], int, float]:
        """How long the group's recorded cuts held writers: (each bound, cuts that held
        them at most that long), the number of cuts, and their sum of seconds."""
        bounds = sorted(bounds)
        counts = ", ".join("COALESCE(SUM(stall_s <= ?), 0)" for _ in bounds)
        row = self.db.execute(
            f"SELECT COUNT(*), COALESCE(SUM(stall_s), 0){', ' if counts else ''}{counts} "
            "FROM cuts WHERE grp = ?",
            (*bounds, group),
        ).fetchone()
        return list(zip(bounds, row[2:], strict=True)), row[0], row[1]

    def set_site_state(self, group: str, site: str, state: str, detail: str = "") -> None:
        """How the last attempt to reach the site went (its cursor is unchanged)."""
        with self.db:
            self.db.execute(
                "INSERT INTO sites (grp, site, seq, applied, state, detail, checked) "
                "VALUES (?, ?, NULL, NULL, ?, ?, ?) ON CONFLICT (grp, site) DO UPDATE SET "
                "state = excluded.state, detail = excluded.detail, checked = excluded.checked",
                (group, site, state, detail, time.time()),
            )

    def owe(self, group: str, site: str, ranges: Mapping[str, Iterable[Extent]]) -> None:
        """Ranges (sectors, per device) the site must be sent besides what changed since its
        cut, until it has applied one delta that carried them (replaces earlier ones)."""
        with self.db:
            self.db.execute("DELETE FROM owed WHERE grp = ? AND site = ?", (group, site))
            self.db.executemany(
                "INSERT INTO owed (grp, site, device, first_sector, end_sector) "
                "VALUES (?, ?, ?, ?, ?)",
                [(group, site, d, e.begin, e.end) for d, extents in ranges.items()
                 for e in extents],
            )  # fmt: skip

    def owed(self, group: str, site: str) -> dict[str, list[Extent]]:
        """What `owe` recorded for the site and no delivery has carried yet."""
        rows = self._added_later(
            "SELECT device, first_sector, end_sector FROM owed WHERE grp = ? AND site = ? "
            "ORDER BY device, first_sector",
            (group, site),
        )
        owed: dict[str, list[Extent]] = {}
        for device, begin, end in rows:
            owed.setdefault(device, []).append(Extent(begin, end))
        return owed

    def paid(self, group: str, site: str) -> None:
        """The site applied a delta carrying what it was owed."""
        with self.db:
            self.db.execute("DELETE FROM owed WHERE grp = ? AND site = ?", (group, site))

    def new_epoch(self, group: str, baseline: CutRecord) -> None:
        """The group became primary here at `baseline` (a promotion): the cuts, cursors and
        owed ranges of its earlier life here name another history, so they go, and the
        baseline becomes its only cut."""
        with self.db:
            for table in (
                "cuts",
                "cut_devices",
                "cut_counters",
                "sites",
                "owed",
                "site_modes",
                "transfers",
            ):
                self.db.execute(f"DELETE FROM {table} WHERE grp = ?", (group,))
            self.db.execute(
                "INSERT INTO cuts (grp, seq, time, stall_s) VALUES (?, ?, ?, ?)",
                (group, baseline.seq, baseline.time, baseline.stall_s),
            )
            self.db.executemany(
                "INSERT INTO cut_devices (grp, seq, device, era) VALUES (?, ?, ?, ?)",
                [(group, baseline.seq, device, era) for device, era in baseline.eras.items()],
            )

    def forget_cursor(self, group: str, site: str, why: str) -> None:
        """The site no longer holds a known cut (it must be seeded again)."""
        with self.db:
            self.db.execute(
                "UPDATE sites SET seq = NULL, applied = NULL, state = 'needs seed', detail = ?, "
                "checked = ? WHERE grp = ? AND site = ?",
                (why, time.time(), group, site),
            )
