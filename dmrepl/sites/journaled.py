"""`blockdev` sites: replicas that are block devices on this host (loop, NBD, iSCSI), written
through the site's journal (dmrepl.journal) so they move from one cut to the next
atomically. The journal header is the site's own record of the cut it holds.

The journal is a file in the state directory, or the device or file configured as
`journal`; a configured journal must exist (dmrepl never creates one in /dev). Reading
a site (`check`, `held`, `recorded`) opens nothing for writing and creates nothing.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, TypeVar, cast

import xxhash

from dmrepl import blockio, delta, deltafiles, phases, safefile
from dmrepl.config import FieldReader, SiteSpec
from dmrepl.journal import (
    EMPTY_HEADER,
    MISSING_HINT,
    Journal,
    JournalError,
    JournalHeader,
    JournalMissing,
    JournalState,
    payload_path,
    read_header_slots,
)
from dmrepl.probe import DeviceProblem, probe_block_device, replica_views
from dmrepl.sites.base import (
    CompareSeeder,
    Delivery,
    Piece,
    Progress,
    RecordUnreadable,
    ReplicaMismatch,
    SiteBroken,
    SiteContext,
    SiteDown,
    SpooledDelta,
)
from dmrepl.units import format_sectors

T = TypeVar("T")


@dataclass(frozen=True)
class BlockdevSiteSpec(SiteSpec):
    """`transport = "blockdev"`: one replica device per group device, and a journal."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"replica", "journal"})

    replicas: Mapping[str, str]  # group device name -> replica device path
    journal: str | None  # a journal device or file; None: a file in the state directory

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        journal = reader.path(raw, "journal", spec.key, required=False)
        key = f"{spec.key}.replica"
        table = raw.get("replica")
        replicas: dict[str, str] = {}
        if not isinstance(table, dict):
            reader.problem(key, "missing: a table naming the replica of every group device")
            return None
        for device in devices:
            value = reader.path(table, device, key, required=False)
            if value is None and device not in table:
                reader.problem(f"{key}.{device}", "missing (the replica of this group device)")
            elif value is not None:
                replicas[device] = value
        for extra in sorted(set(table) - set(devices)):
            reader.problem(f"{key}.{extra}", "not a device of this group")
        return cls(spec.group, spec.name, spec.transport, spec.policy, replicas, journal)

    def claims(self) -> list[tuple[str, str, str]]:
        used = [(f"{self.key}.replica", device, path) for device, path in self.replicas.items()]
        if self.journal is not None:
            used.append((self.key, "journal", self.journal))
        return used


class JournalUnreadable(SiteDown):
    """The journal cannot be read now (missing device, I/O error, not a file)."""


class JournaledSite:
    """A `blockdev` site: a Receiver (and CompareSeeder) over replicas behind a journal."""

    def __init__(self, spec: BlockdevSiteSpec, context: SiteContext):
        self._spec = spec
        self.devices = context.devices
        self.state_dir = context.state_dir
        configured = Path(spec.journal) if spec.journal else None
        self.journal_path = configured or context.state_dir.journal(spec.group, spec.name)

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> BlockdevSiteSpec:
        return self._spec

    def check(self) -> None:
        """Raise SiteDown or ReplicaMismatch unless every replica (and a configured journal)
        is present and fits."""
        for device, sectors in self.devices.items():
            path = self._spec.replicas[device]
            try:
                replica = probe_block_device(path, role=f"replica of {device}")
            except DeviceProblem as exc:
                raise SiteDown(f"site {self.name}: {exc.message}") from None
            if replica.size_sectors != sectors:
                raise ReplicaMismatch(
                    f"site {self.name}: replica {path} of {device} is "
                    f"{format_sectors(replica.size_sectors)}, the origin is "
                    f"{format_sectors(sectors)}",
                    hint="a replica must be exactly the size of its origin; nothing was written",
                )
            if replica.mountpoints:
                raise ReplicaMismatch(
                    f"site {self.name}: replica {path} is mounted on "
                    f"{', '.join(replica.mountpoints)}",
                    hint="unmount it; a replica is written only by dmrepl",
                )
            views = replica_views(replica.holders)
            if views:
                raise SiteDown(
                    f"site {self.name}: replica {path} of {device} is open for reading as "
                    f"{views[0]}: no delivery changes it under its readers",
                    hint=f"`dmrepl replica close {self._spec.group} --site {self.name}` when done",
                )
        if self._spec.journal is not None:
            self._read_header()  # missing, unreadable or not a journal: down or broken now

    def held(self) -> int | None:
        """The cut the replicas hold per the journal (None: never seeded or mid-apply)."""
        header = self._read_header()
        return header.seq if header is not None and header.state is JournalState.APPLIED else None

    def recorded(self) -> int | None:
        try:
            header = self._read_header()
        except JournalUnreadable as exc:
            raise RecordUnreadable(exc.message) from None
        except SiteBroken:
            return None  # not a journal: it names no cut
        if header is None or header.state is JournalState.IDLE:
            return None
        return header.seq

    def recover(self) -> Delivery | None:
        """Finish applying a committed journal left by an interrupted run, once its delta
        (inline, or the payload it refers to) verifies end to end as the one committed."""
        header = self._read_header()
        if header is None or header.state is not JournalState.COMMITTED:
            stale = header is not None and self._spec.journal is None
            if stale and payload_path(self.journal_path).exists():
                with self._open_journal() as journal:
                    self._guard(journal.drop_payload)  # a link a killed run left uncommitted
            return None
        with self._open_journal() as journal:
            try:
                staged, _ = self._guard(journal.verify_committed)
            except delta.CorruptDelta as exc:
                raise SiteBroken(
                    f"site {self.name}: the committed delta in its journal is damaged: "
                    f"{exc.message}",
                    hint=f"re-seed the site: `dmrepl seed {self._spec.group} --site {self.name}`",
                ) from None
            self._check_header(staged)
            return self._apply(journal)

    def receive(self, stream: BinaryIO) -> Delivery:
        """Journal, verify, commit and apply one delta stream; return what was applied."""
        with self._open_journal() as journal:
            phases.reached("journal-write")
            return self._receive_copy(journal, stream)

    def receive_spooled(self, spooled: SpooledDelta) -> Delivery:
        """Apply a spool file without copying it into the journal (`SpoolReader`).

        The default journal links the file as its payload and commits a reference to it
        (length and stream checksum), so the bytes are written once, at capture, and read
        once, here. A delta this process captured (`spooled.crc` known) is verified while
        it is applied; one an earlier run wrote is verified first. A configured journal
        (a device, or a file elsewhere), or a file system that cannot link the file
        there, takes the copy of `receive`."""
        with self._open_journal() as journal:
            phases.reached("journal-write")
            if self._guard(lambda: journal.link_payload(spooled.path)):
                return self._receive_linked(journal, spooled)
            with spooled.path.open("rb", buffering=blockio.CHUNK_BYTES) as stream:
                return self._receive_copy(journal, stream)

    def _receive_copy(self, journal: Journal, stream: BinaryIO) -> Delivery:
        length = self._guard(lambda: journal.stage(stream))
        self._guard(lambda: journal.commit(length, accept=self._check_header))
        phases.reached("journal-committed")
        return self._apply(journal)

    def _receive_linked(self, journal: Journal, spooled: SpooledDelta) -> Delivery:
        source = f"{spooled.path} (linked as {journal.payload_path})"
        fd = os.open(journal.payload_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            with delta.FileReader(fd, 0, size) as reader:
                stream = cast(BinaryIO, reader)
                if spooled.crc is None:  # written by an earlier run: verified before it is used
                    header, summary = delta.verify(stream, source)
                    crc = summary.stream_crc
                else:
                    header, crc = delta.read_header(stream, source), spooled.crc
                    if size != spooled.size:
                        raise delta.CorruptDelta(
                            source, min(size, spooled.size),
                            f"it is {size} bytes; this run captured {spooled.size}",
                        )  # fmt: skip
        finally:
            os.close(fd)
        self._check_header(header)
        self._guard(lambda: journal.commit_payload(header.seq, size, crc))
        phases.reached("journal-committed")
        return self._apply(journal, verify=spooled.crc is not None)

    def compare_seeder(self) -> CompareSeeder | None:
        return self

    def close(self) -> None:
        pass  # nothing held open

    # -- seeding from another host: chunk digests out, differing chunks in

    def chunk_digests(self, chunk: int) -> Iterator[bytes]:
        """XXH3-64 digests of every `chunk` bytes of each replica, devices in order."""
        for device, sectors in self.devices.items():
            path = self._spec.replicas[device]
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise SiteDown(f"site {self.name}: cannot read {path}: {exc.strerror}") from None
            try:
                for offset in range(0, sectors * 512, chunk):
                    yield xxhash.xxh3_64_digest(os.pread(fd, chunk, offset))
            finally:
                os.close(fd)

    def write_seed(self, stream: BinaryIO) -> int:
        """Write the records of a seed stream (a delta of the chunks that differ) straight
        onto the replicas; returns the bytes written. The journal names no cut until
        `mark_seeded`."""
        self.forget_held()
        source = f"seed stream for site {self.name}"
        header = delta.read_header(stream, source)
        self._check_header(header)
        written = 0
        with ExitStack() as fds:
            targets = self._replica_writers(fds, header)
            try:
                for record in delta.records(stream, header, source):
                    targets[record.device].write_at(record.offset, record.data)
                    written += len(record.data)
                for target in targets.values():
                    target.fsync()
            except OSError as exc:
                raise SiteDown(
                    f"site {self.name}: writing the replicas failed: {exc.strerror or exc}"
                ) from None
        return written

    def digests(self, pieces: Sequence[Piece]) -> list[bytes]:
        """XXH3-64 digests of pieces of the replicas (`Verifier`), read past the page cache:
        a synchronous site's mirror wrote the replicas below it."""
        try:
            return list(blockio.piece_digests(self._spec.replicas, pieces, uncached=True))
        except OSError as exc:
            raise SiteDown(
                f"site {self.name}: reading the replicas failed: {exc.strerror}"
            ) from None

    # -- receiving in chunks, resumable (the receiver of a remote site)

    def staged_so_far(self, seq: int, base: int | None) -> int:
        """Bytes of the delta from `base` to `seq` an interrupted transfer left journaled
        durably (0: start from the beginning)."""
        try:
            record = json.loads(self._staging_path.read_text())
            header = self._read_header()
        except (OSError, ValueError):
            return 0
        current = (header or EMPTY_HEADER).generation
        started = (record.get("seq"), record.get("base"), record.get("generation"))
        if started != (seq, base, current):
            return 0
        length = record.get("length")
        return length if isinstance(length, int) and length > 0 else 0

    def receive_chunks(
        self, chunks: Iterable[bytes], *, seq: int, base: int | None, start: int = 0
    ) -> Delivery:
        """Journal a delta arriving in chunks, from byte `start` (see `staged_so_far`), then
        verify, commit and apply it as `receive` does."""
        with self._open_journal() as journal:
            generation = journal.header.generation
            safefile.private_dir(
                self._staging_path.parent, what="state_dir", strict_from=self.state_dir.root
            )

            def checkpoint(length: int) -> None:
                record = {"seq": seq, "base": base, "generation": generation, "length": length}
                deltafiles.write_durably(
                    self._staging_path.parent,
                    self._staging_path.name,
                    lambda out: out.write(json.dumps(record).encode()),
                )

            phases.reached("journal-write")
            length = self._guard(
                lambda: journal.stage_chunks(chunks, start=start, checkpoint=checkpoint)
            )
            try:
                self._guard(lambda: journal.commit(length, accept=self._check_header))
            except delta.CorruptDelta:
                self._staging_path.unlink(missing_ok=True)  # never resume into bad bytes
                raise
            self._staging_path.unlink(missing_ok=True)
            phases.reached("journal-committed")
            return self._apply(journal)

    @property
    def _staging_path(self) -> Path:
        return self.state_dir.staging(self._spec.group, self._spec.name)

    def seed(
        self, images: Mapping[str, str], *, target_zeroed: bool, progress: Progress
    ) -> blockio.CopyStats:
        """Copy the cut's images (device -> `-pit` path) onto the replicas, compare mode.

        The journal first stops naming the cut the replicas held: a seed cut short leaves
        them holding none (and seeded again), never a cut they no longer hold."""
        self.forget_held()
        total = blockio.CopyStats()
        try:
            with ExitStack() as fds:
                for device, sectors in self.devices.items():
                    source = os.open(images[device], os.O_RDONLY)
                    fds.callback(os.close, source)
                    target = os.open(self._spec.replicas[device], os.O_RDWR)
                    fds.callback(os.close, target)
                    stats = blockio.compare_copy(
                        source, target, sectors * 512,
                        target_zeroed=target_zeroed, progress=progress,
                    )  # fmt: skip
                    os.fsync(target)
                    for field in ("compared", "written", "equal", "zero_skipped"):
                        setattr(total, field, getattr(total, field) + getattr(stats, field))
        except OSError as exc:
            raise SiteDown(f"site {self.name}: seeding failed: {exc.strerror or exc}") from None
        return total

    def forget_held(self) -> None:
        """Make the journal name no cut (before the replicas are overwritten wholesale)."""
        header = self._read_header()
        if header is not None and header.state is not JournalState.IDLE:
            with self._open_journal() as journal:
                self._guard(journal.mark_unknown)

    def mark_seeded(self, seq: int) -> None:
        """The replicas now hold cut `seq` (once the cut's images were confirmed intact)."""
        with self._open_journal() as journal:
            self._guard(lambda: journal.mark_applied(seq))

    # -- the journal

    def _read_header(self) -> JournalHeader | None:
        """The journal's current header, read-only; None if the default journal file was
        never made. Raises SiteDown/SiteBroken when it cannot be read or is not a journal."""
        try:
            # O_NONBLOCK: a FIFO planted as the journal must not hang the cycle.
            fd = os.open(self.journal_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            if self._spec.journal is None:
                return None
            raise JournalUnreadable(
                f"site {self.name}: the journal {self.journal_path} does not exist",
                hint=MISSING_HINT,
            ) from None
        except OSError as exc:
            raise JournalUnreadable(
                f"site {self.name}: journal {self.journal_path}: {exc.strerror}"
            ) from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise JournalUnreadable(
                    f"site {self.name}: journal {self.journal_path} is not a file or device"
                )
            slots = read_header_slots(fd)
            if not slots and any(os.pread(fd, 2 * 4096, 0)):
                raise SiteBroken(
                    f"site {self.name}: {self.journal_path}: neither journal header slot is "
                    "valid (not a dmrepl journal?)",
                    hint="if this really is the site's journal device, zero its first 8 KiB "
                    f"and re-seed the site: `dmrepl seed {self._spec.group} --site {self.name}`",
                )
        except OSError as exc:
            raise JournalUnreadable(
                f"site {self.name}: journal {self.journal_path}: {exc.strerror}"
            ) from None
        finally:
            os.close(fd)
        return max(slots, key=lambda h: h.generation) if slots else None

    def _open_journal(self) -> Journal:
        """The journal, open for writing; only the default journal file is ever created."""
        if self._spec.journal is None:
            try:
                safefile.private_dir(
                    self.journal_path.parent, what="state_dir", strict_from=self.state_dir.root
                )
            except safefile.UnsafePath as exc:
                raise ReplicaMismatch(f"site {self.name}: {exc.message}", hint=exc.hint) from None
        default = self._spec.journal is None
        return self._guard(lambda: Journal(self.journal_path, create=default, payloads=default))

    def _guard(self, step: Callable[[], T]) -> T:
        """Run a journal step; its errors become this site's failures."""
        try:
            return step()
        except JournalMissing as exc:
            raise SiteDown(f"site {self.name}: {exc.message}", hint=exc.hint) from None
        except JournalError as exc:
            raise SiteBroken(f"site {self.name}: {exc.message}", hint=exc.hint) from None
        except OSError as exc:
            raise SiteDown(
                f"site {self.name}: journal {self.journal_path}: {exc.strerror or exc}"
            ) from None

    def _apply(self, journal: Journal, *, verify: bool = False) -> Delivery:
        """Write the committed delta's records to the replicas, fsync, mark APPLIED.

        Without `verify` the delta was verified end to end just before (commit or replay),
        so its checksums are not computed again. With it (a payload this process captured
        and verified as it wrote it, not read back since) they are checked as the records
        are applied: one read instead of two. A failure found that way means the replicas
        are between two cuts; the journal keeps the commit, whose replay then refuses the
        damaged payload, and the site is re-seeded."""
        source = journal.committed_source()
        with ExitStack() as fds:
            reader = self._guard(lambda: fds.enter_context(journal.committed()))
            header = delta.read_header(reader, source)
            targets = self._replica_writers(fds, header)
            applying = delta.records(reader, header, source, checksums=verify)
            try:
                while True:
                    try:
                        record = next(applying)
                    except StopIteration as done:
                        summary: delta.DeltaSummary = done.value
                        break
                    targets[record.device].write_at(record.offset, record.data)
                    phases.reached("apply")
                for target in targets.values():
                    target.fsync()
            except OSError as exc:
                raise SiteDown(
                    f"site {self.name}: writing the replicas failed: {exc.strerror or exc}",
                    hint="the journal keeps the delta; the next run finishes the apply",
                ) from None
            except delta.CorruptDelta as exc:
                raise delta.CorruptDelta(
                    exc.source, exc.offset, exc.problem,
                    message=f"{exc.message} (found while applying it: the replicas of site "
                    f"{self.name} are between two cuts)",
                    hint=f"re-seed the site: `dmrepl seed {self._spec.group} --site {self.name}`",
                ) from None  # fmt: skip
        phases.reached("applied")
        self._guard(lambda: journal.mark_applied(header.seq))
        return Delivery(header.seq, header.base_seq, summary.data_bytes)

    def _check_header(self, header: delta.DeltaHeader) -> None:
        expected = dict(self.devices)
        got = {d.name: d.sectors for d in header.devices}
        if got != expected:
            raise ReplicaMismatch(
                f"site {self.name}: delta for cut {header.seq} describes devices {got}, "
                f"the group has {expected}",
                hint="the group's devices changed; re-seed the site",
            )

    def _replica_writers(
        self, fds: ExitStack, header: delta.DeltaHeader
    ) -> dict[int, blockio.DeviceWriter]:
        """A writer per device index of the delta, closed with `fds`."""
        targets: dict[int, blockio.DeviceWriter] = {}
        for index, device in enumerate(header.devices):
            path = self._spec.replicas[device.name]
            try:
                writer = blockio.DeviceWriter(path)
            except OSError as exc:
                raise SiteDown(f"site {self.name}: cannot open {path}: {exc.strerror}") from None
            fds.callback(writer.close)
            targets[index] = writer
        return targets
