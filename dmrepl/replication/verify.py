"""`dmrepl verify`: a site's replicas against the cut they hold, never the live device.

A verify is a replication cycle whose cut stays held until the site has applied it: then
the site's replicas must equal the cut's `-pit` images, whatever writers do meanwhile.
Both sides are hashed in pieces (XXH3-64; the site hashes its own side where it is, so
over ssh 8 bytes a piece cross the link); `--since-cut K` hashes only the era blocks
written since cut K (read from the held metadata snapshots), `--full` everything.
`--repair` sends the pieces that differ, read from the images, through the site's
journal as a delta of the same cut, and hashes them again.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dmrepl import blockio, delta, deltafiles, s3restore
from dmrepl.config import Config
from dmrepl.cut import HeldCut
from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.executor import Runner
from dmrepl.lock import group_lock
from dmrepl.ranges import Extent
from dmrepl.replication import capture
from dmrepl.replication.capture import ProgressFactory, no_progress
from dmrepl.replication.cycle import Cycle, checked_request
from dmrepl.s3store import Store
from dmrepl.signals import Say
from dmrepl.sites import SiteFailure
from dmrepl.sites.archive import DirSiteSpec
from dmrepl.sites.base import Piece, Verifier
from dmrepl.sites.s3 import S3SiteSpec
from dmrepl.state import CutRecord, StateStore

PIECE_SECTORS = 2048  # 1 MiB: what one digest covers at most


class SiteUnverified(DmreplError):
    """The site could not be brought to the cut or hashed (down, broken): nothing was
    compared, so nothing is said of its replicas (exit 17, as a site left behind)."""

    exit_code = ExitCode.SITES_BEHIND


@dataclass(frozen=True)
class Mismatch:
    """Sectors of a replica that differ from the cut."""

    device: str
    start: int  # sector
    sectors: int


@dataclass
class VerifyResult:
    group: str
    site: str
    cut: int  # the cut the replicas were compared with
    scope: str  # "full" or "since cut K"
    compared_bytes: int
    mismatches: list[Mismatch] = field(default_factory=list)
    repaired_bytes: int = 0
    still_differing: list[Mismatch] = field(default_factory=list)  # after a repair
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)  # a `dir` site's chain: what is wrong

    @property
    def ok(self) -> bool:
        """The replicas hold the cut (after the repair, if one was asked for)."""
        if self.problems:
            return False
        return not (self.still_differing if self.repaired_bytes else self.mismatches)


def pieces_of(extents: Mapping[str, Sequence[Extent]], piece_sectors: int) -> list[Piece]:
    """Sector extents per device cut into pieces of at most `piece_sectors` (pure)."""
    pieces: list[Piece] = []
    for device, found in extents.items():
        for extent in found:
            for start in range(extent.begin, extent.end, piece_sectors):
                pieces.append((device, start, min(piece_sectors, extent.end - start)))
    return pieces


def differing(
    pieces: Sequence[Piece], mine: Sequence[bytes], theirs: Sequence[bytes]
) -> list[Mismatch]:
    """The pieces whose digests differ, adjacent ones merged (pure)."""
    found: list[Mismatch] = []
    for (device, start, sectors), a, b in zip(pieces, mine, theirs, strict=True):
        if a == b:
            continue
        last = found[-1] if found else None
        if last is not None and last.device == device and last.start + last.sectors == start:
            found[-1] = Mismatch(device, last.start, last.sectors + sectors)
        else:
            found.append(Mismatch(device, start, sectors))
    return found


def image_digests(
    held: HeldCut, pieces: Sequence[Piece], progress: Callable[[int], object]
) -> list[bytes]:
    """Digests of the pieces of the cut's `-pit` images."""
    paths = {d.stack.device.name: d.pit.path for d in held.devices if d.pit is not None}
    found = []
    for (_, _, sectors), digest in zip(pieces, blockio.piece_digests(paths, pieces), strict=True):
        held.latch.check()
        found.append(digest)
        progress(sectors * 512)
    return found


def verify(
    runner: Runner,
    config: Config,
    group: str,
    site: str,
    *,
    since_cut: int | None = None,
    repair: bool = False,
    say: Say = print,
    progress: ProgressFactory = no_progress,
) -> VerifyResult:
    """Bring `site` to a fresh cut, hold it, and compare the site's replicas with it (a
    `dir` site: check its chain of delta files instead)."""
    spec = checked_request(config, group, ())
    chosen = spec.site(site)
    started = time.monotonic()
    if isinstance(chosen, DirSiteSpec | S3SiteSpec):
        result = (
            verify_chain(group, chosen)
            if isinstance(chosen, DirSiteSpec)
            else verify_objects(group, chosen)
        )
        result.seconds = time.monotonic() - started
        return result
    with group_lock(config.state_dir, group, "verify"):
        store = StateStore(config.state_dir)
        try:
            base = None if since_cut is None else _known_cut(store, group, since_cut)
            cycle = Cycle(runner, config, spec, store, say, progress)
            comparison = _Comparison(cycle, site, base, repair, progress)
            try:
                cycle.run(set(), False, inspect=comparison)
            finally:
                cycle.close()
        finally:
            store.close()
    assert comparison.result is not None
    comparison.result.seconds = time.monotonic() - started
    return comparison.result


def verify_chain(group: str, site: DirSiteSpec) -> VerifyResult:
    """A `dir` site: every delta file passes its checksums, and the newest cut is reached
    from a full image by deltas that follow each other (what `dmrepl apply` needs)."""
    directory = Path(site.path)
    files = deltafiles.list_files(directory, group)
    problems: list[str] = []
    checked = 0
    for found in files:
        try:
            with found.path.open("rb") as stream:
                delta.verify(stream, str(found.path))
            checked += found.size
        except delta.CorruptDelta as exc:
            problems.append(f"{found.path.name}: {exc.message}")
        except OSError as exc:
            problems.append(f"{found.path.name}: {exc.strerror}")
    newest = files[-1].seq if files else None
    if newest is None:
        problems.append(f"{directory} holds no delta of group {group}")
    elif deltafiles.routes(files).to(newest) is None:
        problems.append(
            f"no full image is followed by deltas up to cut {newest}: `dmrepl apply` cannot "
            "rebuild it (a missing or misnamed file)"
        )
    return VerifyResult(group, site.name, newest or 0, "chain", checked, problems=problems)


def verify_objects(group: str, site: S3SiteSpec) -> VerifyResult:
    """An `s3` site: every manifest and every object a cut needs pass their checksums
    (dmrepl.s3restore.verify_store); each problem names the object, offset and cuts."""
    remote = s3restore.Remote(Store(site.location), group)
    newest, checked, problems = s3restore.verify_store(remote)
    return VerifyResult(group, site.name, newest, "chain", checked, problems=problems)


def _known_cut(store: StateStore, group: str, seq: int) -> CutRecord:
    record = store.cut(group, seq)
    if record is None:
        known = ", ".join(str(c.seq) for c in store.cuts(group, limit=5)) or "none"
        raise InvalidInput(
            f"group {group} has no cut {seq} in the state store",
            hint=f"recent cuts: {known}; or verify with --full",
        )
    return record


class _Comparison:
    """Run by the cycle with its cut held, once every site was shipped to."""

    def __init__(
        self,
        cycle: Cycle,
        site: str,
        base: CutRecord | None,
        repair: bool,
        progress: ProgressFactory,
    ):
        self.cycle, self.site, self.base, self.repair = cycle, site, base, repair
        self.progress = progress
        self.result: VerifyResult | None = None

    def __call__(self, held: HeldCut, seq: int) -> None:
        receiver = self._verifier(seq)
        if self.base is None:
            extents = {
                d.stack.device.name: [Extent(0, d.stack.origin_sectors)] for d in held.devices
            }
            scope = "full"
        else:
            extents = capture.changed_since(self.cycle.runner, held, self.base)
            scope = f"since cut {self.base.seq}"
        pieces = pieces_of(extents, PIECE_SECTORS)
        total = sum(sectors for _, _, sectors in pieces) * 512
        report = self.progress(f"verify {self.site}: hash cut {seq}", total)
        mine = image_digests(held, pieces, report)
        try:
            theirs = receiver.digests(pieces)
        except SiteFailure as exc:
            raise SiteUnverified(f"cannot verify site {self.site}: {exc.message}") from None
        found = differing(pieces, mine, theirs)
        result = VerifyResult(self.cycle.spec.name, self.site, seq, scope, total, found)
        if self.repair and found:
            result.repaired_bytes, result.still_differing = _repair(
                self.cycle, held, seq, self.site, found
            )
        self.result = result

    def _verifier(self, seq: int) -> Verifier:
        """The site, once it holds cut `seq` and can hash its replicas."""
        cycle, name = self.cycle, self.site
        receiver = cycle.sites[name]
        if name in cycle.mirrored:
            raise InvalidInput(
                f"cannot verify site {name}: its replicas are live mirror legs (synchronous), "
                "which no cut can be compared with while writers run"
            )
        if cycle.cursors.get(name) != seq:
            report = cycle.reports[name]
            raise SiteUnverified(
                f"cannot verify site {name}: it did not get cut {seq} "
                f"({report.state}: {report.detail})"
            )
        if not isinstance(receiver, Verifier):
            raise InvalidInput(
                f"site {name} ({receiver.spec.transport}) cannot hash its replicas",
                hint="verify a blockdev, nbd or ssh site",
            )
        return receiver


def _repair(
    cycle: Cycle, held: HeldCut, seq: int, name: str, mismatches: list[Mismatch]
) -> tuple[int, list[Mismatch]]:
    """Send the differing sectors, read from the cut's images, through the site's journal;
    then hash them again. The repair is a partial image of cut `seq` (no base cut: it
    follows none), so applying it leaves the site at the cut it holds."""
    extents: dict[str, list[Extent]] = {d.stack.device.name: [] for d in held.devices}
    for mismatch in mismatches:
        extents[mismatch.device].append(Extent(mismatch.start, mismatch.start + mismatch.sectors))
    head = capture.header(cycle.spec.name, held, seq, None)
    out = io.BytesIO()
    capture.write(out, held, head, extents, no_progress)
    out.seek(0)
    site = cycle.sites[name]
    try:
        delivered = site.receive(out)
        pieces = pieces_of(extents, PIECE_SECTORS)
        theirs = site.digests(pieces)  # type: ignore[attr-defined]
    except (SiteFailure, delta.CorruptDelta) as exc:
        raise SiteUnverified(f"repair of site {name} failed: {exc.message}") from None
    again = differing(pieces, image_digests(held, pieces, lambda _: None), theirs)
    return delivered.data_bytes, again
