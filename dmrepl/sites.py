"""Sites: where replicas live, and how a delta reaches them durably.

`blockdev`: the replicas are device nodes on this host (loop, NBD, iSCSI). A
delta goes through the site's journal (dmrepl.journal) so the replicas move
from one cut to the next atomically; the journal header is the site's own
record of the cut it holds.

`dir`: deltas are files in a directory (an archive or a mounted remote store),
written under a temporary name, fsynced and renamed; `dmrepl apply` rebuilds or
rolls a device forward from them. The newest file is the cut the site holds.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dmrepl import blockio, delta, phases, safefile
from dmrepl.config import SiteSpec
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.journal import (
    EMPTY_HEADER,
    Journal,
    JournalHeader,
    JournalMissing,
    JournalState,
    read_header_slots,
)
from dmrepl.probe import DeviceProblem, probe_block_device
from dmrepl.stack import StackSpec
from dmrepl.statedir import StateDir
from dmrepl.units import format_sectors

Progress = Callable[[int], object]


class SiteDown(DmreplError):
    """The site cannot be reached now (a replica missing, unwritable, or failing I/O)."""


class ReplicaMismatch(DmreplError):
    """A replica does not fit its origin; the site is skipped until the config is fixed."""

    exit_code = ExitCode.UNSAFE


@dataclass(frozen=True)
class Delivery:
    """One delta durably applied at a site."""

    seq: int
    base_seq: int | None
    data_bytes: int


def journal_path(spec: SiteSpec, state_dir: Path) -> Path:
    """A blockdev site's journal: as configured, else a file in the state directory."""
    if spec.journal:
        return Path(spec.journal)
    return StateDir(state_dir).journal(spec.group, spec.name)


class RecordUnreadable(Exception):
    """A site's own record lives somewhere that cannot be read now (a journal device or a
    `dir` site's directory that is missing, detached or failing)."""


def recorded_cut(spec: SiteSpec, state_dir: Path) -> int | None:
    """The newest cut number a site's own record names (a journal header's, a `dir` site's
    newest file), read without creating or changing anything; None if it has none.

    Cut numbers are never reused, so a state store rebuilt after a loss numbers past these.
    Raises RecordUnreadable when the record is configured to live outside the state
    directory and cannot be read: the site may hold any cut.
    """
    if spec.transport == "dir":
        directory = Path(spec.path or "")
        if not directory.is_dir():
            raise RecordUnreadable(f"{directory} is not reachable")
        deltas = listed_deltas(directory, spec.group)
        return deltas[-1][0] if deltas else None
    path = journal_path(spec, state_dir)
    try:
        # O_NONBLOCK: a FIFO planted as the journal must not hang the cycle.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if spec.journal is None:
            return None  # the default journal: not made until the first delivery or seed
        raise RecordUnreadable(f"journal {path} does not exist") from None
    except OSError as exc:
        raise RecordUnreadable(f"journal {path}: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise RecordUnreadable(f"journal {path} is not a file or block device")
        slots = read_header_slots(fd)
    except OSError as exc:
        raise RecordUnreadable(f"journal {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    seqs = [h.seq for h in slots if h.state is not JournalState.IDLE]
    return max(seqs, default=None)


class BlockdevSite:
    """Replicas that are block devices on this host, behind a journal."""

    def __init__(self, spec: SiteSpec, stacks: tuple[StackSpec, ...], state_dir: Path):
        self.spec = spec
        self.stacks = stacks
        self.state_dir = state_dir
        self.journal_path = journal_path(spec, state_dir)

    @property
    def name(self) -> str:
        return self.spec.name

    def check(self) -> None:
        """Raise SiteDown or ReplicaMismatch unless every replica (and a configured journal)
        is present and fits; JournalError for a configured journal that is not one."""
        for stack in self.stacks:
            device = stack.device.name
            path = self.spec.replicas[device]
            try:
                replica = probe_block_device(path, role=f"replica of {device}")
            except DeviceProblem as exc:
                raise SiteDown(f"site {self.name}: {exc.message}") from None
            if replica.size_sectors != stack.origin_sectors:
                raise ReplicaMismatch(
                    f"site {self.name}: replica {path} of {device} is "
                    f"{format_sectors(replica.size_sectors)}, the origin is "
                    f"{format_sectors(stack.origin_sectors)}",
                    hint="a replica must be exactly the size of its origin; nothing was written",
                )
            if replica.mountpoints:
                raise ReplicaMismatch(
                    f"site {self.name}: replica {path} is mounted on "
                    f"{', '.join(replica.mountpoints)}",
                    hint="unmount it; a replica is written only by dmrepl",
                )
        if self.spec.journal:
            self._header()  # a configured journal is never created: missing, SiteDown
        else:
            try:
                safefile.private_dir(
                    self.journal_path.parent, what="state_dir", strict_from=self.state_dir
                )
            except safefile.UnsafePath as exc:
                raise ReplicaMismatch(f"site {self.name}: {exc.message}", hint=exc.hint) from None

    def _header(self) -> JournalHeader:
        """The journal's header, read without creating the journal: a default journal not
        made yet holds nothing; a configured one that is missing is the site being down."""
        try:
            with Journal(self.journal_path, create=False) as journal:
                return journal.header
        except JournalMissing as exc:
            if self.spec.journal:
                raise SiteDown(f"site {self.name}: {exc.message}", hint=exc.hint) from None
            return EMPTY_HEADER

    def _open(self) -> Journal:
        """The journal, to write: the default one is created if missing, a configured one
        (a device) never is."""
        try:
            return Journal(self.journal_path, create=not self.spec.journal)
        except JournalMissing as exc:
            raise SiteDown(f"site {self.name}: {exc.message}", hint=exc.hint) from None

    def held_seq(self) -> int | None:
        """The cut the replicas hold per the journal (None: never seeded or mid-apply)."""
        header = self._header()
        return header.seq if header.state is JournalState.APPLIED else None

    def pending_seq(self) -> int | None:
        """A committed but unapplied cut in the journal, if any."""
        header = self._header()
        return header.seq if header.state is JournalState.COMMITTED else None

    def replay(self) -> Delivery | None:
        """Finish applying a committed journal left by an interrupted run."""
        if self._header().state is not JournalState.COMMITTED:
            return None
        with self._open() as journal:
            header, summary = journal.verify_staged(journal.header.length)
            self._check_header(header)
            return self._apply(journal, summary)

    def receive(self, source: BinaryIO) -> Delivery:
        """Journal, verify, commit and apply one delta stream; return what was applied."""
        with self._open() as journal:
            phases.reached("journal-write")
            length = journal.stage(source)
            _, summary = journal.commit(length, accept=self._check_header)
            phases.reached("journal-committed")
            return self._apply(journal, summary)

    def _apply(self, journal: Journal, summary: delta.DeltaSummary) -> Delivery:
        """Write the committed (and verified) delta's records to the replicas, fsync, mark."""
        source = f"{self.journal_path} (journal)"
        with ExitStack() as fds, journal.staged(journal.header.length) as reader:
            header = delta.read_header(reader, source)
            targets = self._open_replicas(fds, header)
            try:
                # verified end to end just before (commit or replay): no second CRC pass
                for record in delta.records(reader, header, source, checksums=False):
                    blockio.write_at(targets[record.device], record.offset, record.data)
                    phases.reached("apply")
                for fd in targets.values():
                    os.fsync(fd)
            except OSError as exc:
                raise SiteDown(
                    f"site {self.name}: writing the replicas failed: {exc.strerror or exc}",
                    hint="the journal keeps the delta; the next run finishes the apply",
                ) from None
        phases.reached("applied")
        journal.mark_applied(header.seq)
        return Delivery(header.seq, header.base_seq, summary.data_bytes)

    def _check_header(self, header: delta.DeltaHeader) -> None:
        expected = {s.device.name: s.origin_sectors for s in self.stacks}
        got = {d.name: d.sectors for d in header.devices}
        if got != expected:
            raise DmreplError(
                f"site {self.name}: delta for cut {header.seq} describes devices {got}, "
                f"the group has {expected}",
                hint="the group's devices changed; re-seed the site",
            )

    def _open_replicas(self, fds: ExitStack, header: delta.DeltaHeader) -> dict[int, int]:
        targets: dict[int, int] = {}
        for index, device in enumerate(header.devices):
            path = self.spec.replicas[device.name]
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError as exc:
                raise SiteDown(f"site {self.name}: cannot open {path}: {exc.strerror}") from None
            fds.callback(os.close, fd)
            targets[index] = fd
        return targets

    def seed(
        self, images: dict[str, str], *, target_zeroed: bool, progress: Progress
    ) -> blockio.CopyStats:
        """Copy the cut's images (device -> `-pit` path) onto the replicas, compare mode."""
        total = blockio.CopyStats()
        with ExitStack() as fds:
            for stack in self.stacks:
                device = stack.device.name
                source = os.open(images[device], os.O_RDONLY)
                fds.callback(os.close, source)
                target = os.open(self.spec.replicas[device], os.O_RDWR)
                fds.callback(os.close, target)
                stats = blockio.compare_copy(
                    source, target, stack.origin_sectors * 512,
                    target_zeroed=target_zeroed, progress=progress,
                )  # fmt: skip
                os.fsync(target)
                for field in ("compared", "written", "equal", "zero_skipped"):
                    setattr(total, field, getattr(total, field) + getattr(stats, field))
        return total

    def mark_seeded(self, seq: int) -> None:
        """The replicas now hold cut `seq` (once the cut's images were confirmed intact)."""
        with self._open() as journal:
            journal.mark_applied(seq)


DELTA_NAME = re.compile(r"^(?P<group>[^.]+)\.(?P<seq>\d{10})\.(?P<base>full|\d{10})\.delta$")


def delta_file_name(group: str, seq: int, base_seq: int | None) -> str:
    base = "full" if base_seq is None else f"{base_seq:010d}"
    return f"{group}.{seq:010d}.{base}.delta"


def listed_deltas(directory: Path, group: str) -> list[tuple[int, int | None, Path]]:
    """(seq, base seq or None for a full image, path) of a group's delta files, by seq."""
    found = []
    for path in directory.glob(f"{group}.*.delta"):
        match = DELTA_NAME.match(path.name)
        if match and match["group"] == group:
            base = None if match["base"] == "full" else int(match["base"])
            found.append((int(match["seq"]), base, path))
    return sorted(found, key=lambda item: item[0])


def write_durably(directory: Path, name: str, fill: Callable[[BinaryIO], object]) -> Path:
    """Write a file via a temporary name, fsync it, rename it into place, fsync the directory."""
    final = directory / name
    partial = directory / f".{name}.partial"
    try:
        with safefile.open_new(partial) as out:
            fill(out)
            out.flush()
            os.fsync(out.fileno())
        os.rename(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    fsync_directory(directory)
    return final


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirSite:
    """Delta files in a directory; `dmrepl apply` turns them into a device."""

    def __init__(self, spec: SiteSpec, stacks: tuple[StackSpec, ...], state_dir: Path):
        assert spec.path is not None
        self.spec = spec
        self.stacks = stacks
        self.directory = Path(spec.path)

    @property
    def name(self) -> str:
        return self.spec.name

    def check(self) -> None:
        if not self.directory.is_dir():
            raise SiteDown(f"site {self.name}: {self.directory} is not a directory (not mounted?)")
        if not os.access(self.directory, os.W_OK):
            raise SiteDown(f"site {self.name}: {self.directory} is not writable")
        try:
            safefile.check_directory(self.directory, what=f"site {self.name}: path")
        except safefile.UnsafePath as exc:
            raise ReplicaMismatch(exc.message, hint=exc.hint) from None

    def held_seq(self) -> int | None:
        deltas = listed_deltas(self.directory, self.spec.group)
        return deltas[-1][0] if deltas else None

    def replay(self) -> Delivery | None:
        return None

    def receive(self, source: BinaryIO) -> Delivery:
        """Verify the delta while copying it into the directory; keep it only if whole."""
        label = f"delta for site {self.name}"
        spooled = _Tee(source)
        phases.reached("journal-write")

        def fill(out: BinaryIO) -> None:
            spooled.sink = out
            header, summary = delta.verify(spooled, label)  # type: ignore[arg-type]
            spooled.result = (header, summary)

        probe_header = delta.read_header(source, label)
        source.seek(0)
        name = delta_file_name(self.spec.group, probe_header.seq, probe_header.base_seq)
        write_durably(self.directory, name, fill)
        header, summary = spooled.result
        phases.reached("applied")
        return Delivery(header.seq, header.base_seq, summary.data_bytes)


class _Tee:
    """A reader that copies everything read through it into `sink`."""

    def __init__(self, source: BinaryIO):
        self.source = source
        self.sink: BinaryIO | None = None
        self.result: tuple[delta.DeltaHeader, delta.DeltaSummary]

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        if self.sink is not None and data:
            self.sink.write(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)


Site = BlockdevSite | DirSite


def open_site(spec: SiteSpec, stacks: tuple[StackSpec, ...], state_dir: Path) -> Site:
    if spec.transport == "blockdev":
        return BlockdevSite(spec, stacks, state_dir)
    return DirSite(spec, stacks, state_dir)
