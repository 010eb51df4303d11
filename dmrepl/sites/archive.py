"""`dir` sites: an archive of delta files in a directory (local, or a mounted remote store);
`dmrepl apply` turns them into a device. The newest file is the cut the site holds.

A delta is received as a stream: copied into a dot-named partial file while it is
verified, fsynced, and only then renamed to the name its header gives it
(dmrepl.deltafiles), so a listed file is always whole.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from dmrepl import compact, delta, deltafiles, phases, retention, safefile
from dmrepl.config import FieldReader, SiteSpec, inside
from dmrepl.errors import DmreplError
from dmrepl.sites.base import (
    CompareSeeder,
    Delivery,
    RecordUnreadable,
    ReplicaMismatch,
    SiteContext,
    SiteDown,
)


@dataclass(frozen=True)
class DirSiteSpec(SiteSpec):
    """`transport = "dir"`: the directory receiving delta files."""

    KEYS: ClassVar[frozenset[str]] = frozenset({"path", "keep"})

    path: str
    keep: retention.Grid = ()  # empty: every file is kept

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        path = reader.path(raw, "path", spec.key, required=False)
        if path is None and "path" not in raw:
            reader.problem(f"{spec.key}.path", "missing (the directory receiving delta files)")
        keep: retention.Grid = ()
        if "keep" in raw:
            try:
                keep = retention.parse_grid(raw["keep"])
            except retention.GridError as exc:
                reader.problem(f"{spec.key}.keep", str(exc))
                return None
        if path is None:
            return None
        return cls(spec.group, spec.name, spec.transport, spec.policy, path, keep)

    def state_dir_problems(self, state_dir: Path) -> list[str]:
        if not inside(Path(self.path), state_dir):
            return []
        return [
            f"{self.key}.path: {self.path} is inside state_dir {state_dir}, whose cleanup "
            "would delete the site's files"
        ]

    def filesystem_problems(self) -> list[str]:
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            return [f"{self.key}.path: {self.path} is not a directory"]
        return []


class ArchiveSite:
    """A `dir` site: a Receiver that stores each verified delta as a file."""

    def __init__(self, spec: DirSiteSpec, context: SiteContext):
        self._spec = spec
        self.directory = Path(spec.path)
        self._say = context.say

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> DirSiteSpec:
        return self._spec

    def check(self) -> None:
        if not self.directory.is_dir():
            raise SiteDown(f"site {self.name}: {self.directory} is not a directory (not mounted?)")
        if not os.access(self.directory, os.W_OK):
            raise SiteDown(f"site {self.name}: {self.directory} is not writable")
        try:
            safefile.check_directory(self.directory, what=f"site {self.name}: path")
        except safefile.UnsafePath as exc:
            raise ReplicaMismatch(exc.message, hint=exc.hint) from None

    def held(self) -> int | None:
        files = deltafiles.list_files(self.directory, self._spec.group)
        return files[-1].seq if files else None

    def recorded(self) -> int | None:
        if not self.directory.is_dir():
            raise RecordUnreadable(f"{self.directory} is not reachable")
        return self.held()

    def recover(self) -> Delivery | None:
        return None  # a file is published whole or not at all: nothing is ever half done

    def compare_seeder(self) -> CompareSeeder | None:
        return None

    def close(self) -> None:
        pass  # nothing held open

    def receive(self, stream: BinaryIO) -> Delivery:
        """Verify the delta while copying it into the directory; keep it only if whole."""
        label = f"delta for site {self.name}"
        partial = self.directory / f".incoming.{os.getpid()}.partial"
        phases.reached("journal-write")
        try:
            partial.unlink(missing_ok=True)  # left by a run of the same pid that died
            with safefile.open_new(partial) as out:
                header, summary = delta.verify(delta.Tee(stream, out), label)  # type: ignore[arg-type]
                out.flush()
                os.fsync(out.fileno())
            final = self.directory / deltafiles.file_name(
                self._spec.group, header.seq, header.base_seq
            )
            deltafiles.publish(partial, final)
        except OSError as exc:
            raise SiteDown(
                f"site {self.name}: writing into {self.directory} failed: {exc.strerror or exc}"
            ) from None
        finally:
            partial.unlink(missing_ok=True)
        phases.reached("applied")
        if self._spec.keep:
            self.prune()
        return Delivery(header.seq, header.base_seq, summary.data_bytes)

    def prune(self) -> None:
        """Compact the directory to the cuts `keep` keeps (dmrepl.compact). A failure is
        said and leaves every kept cut restorable; the delivery stands, and the next one
        tries again."""
        say = self._say
        try:
            compact.prune(
                self.directory, self._spec.group, self._spec.keep,
                lambda line: say(f"site {self.name}: {line}"),
            )  # fmt: skip
        except (OSError, DmreplError) as exc:
            reason = exc.message if isinstance(exc, DmreplError) else exc.strerror or str(exc)
            say(
                f"site {self.name}: warning: pruning {self.directory} stopped: {reason}; "
                "every kept cut is still restorable, and the next delivery tries again"
            )
