"""A transport that keeps a site's replicas in this process's memory: the smallest complete
transport (a spec class, a Receiver, a registry line), used to show that the cycle needs
nothing else from a transport, and to test the cycle without replica devices."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar

from dmrepl import delta
from dmrepl.config import FieldReader, SiteSpec
from dmrepl.sites import CompareSeeder, Delivery, SiteContext, SiteDown
from dmrepl.sites.registry import Transport, register


@dataclass(frozen=True)
class MemorySiteSpec(SiteSpec):
    KEYS: ClassVar[frozenset[str]] = frozenset({"reachable"})

    reachable: bool

    @classmethod
    def parse(
        cls, reader: FieldReader, spec: SiteSpec, raw: dict[str, Any], devices: list[str]
    ) -> SiteSpec | None:
        reachable = raw.get("reachable", True)
        if not isinstance(reachable, bool):
            reader.problem(f"{spec.key}.reachable", "must be true or false")
            return None
        return cls(spec.group, spec.name, spec.transport, spec.policy, reachable)


@dataclass
class Replicas:
    """What a memory site holds: one image per device and the cut they are at."""

    images: dict[str, bytearray]
    cut: int | None = None


class MemorySite:
    held_by_site: ClassVar[dict[str, Replicas]] = {}  # site key -> its replicas

    def __init__(self, spec: MemorySiteSpec, context: SiteContext):
        self._spec = spec
        self.devices = dict(context.devices)

    @property
    def name(self) -> str:
        return self._spec.name

    @property
    def spec(self) -> MemorySiteSpec:
        return self._spec

    @property
    def replicas(self) -> Replicas:
        return self.held_by_site.setdefault(
            self._spec.key,
            Replicas({d: bytearray(sectors * 512) for d, sectors in self.devices.items()}),
        )

    def check(self) -> None:
        if not self._spec.reachable:
            raise SiteDown(f"site {self.name}: configured unreachable")

    def held(self) -> int | None:
        return self.replicas.cut

    def recorded(self) -> int | None:
        return self.held()

    def recover(self) -> Delivery | None:
        return None

    def receive(self, stream: BinaryIO) -> Delivery:
        """Apply to copies; swap them in only once the whole delta verified."""
        header = delta.read_header(stream, self.name)
        names = [d.name for d in header.devices]
        images = (
            {d: bytearray(sectors * 512) for d, sectors in self.devices.items()}
            if header.base_seq is None
            else {d: bytearray(image) for d, image in self.replicas.images.items()}
        )
        records = delta.records(stream, header, self.name)
        while True:
            try:
                record = next(records)
            except StopIteration as done:
                summary: delta.DeltaSummary = done.value
                break
            start = record.offset * 512
            images[names[record.device]][start : start + len(record.data)] = record.data
        self.held_by_site[self._spec.key] = Replicas(images, header.seq)
        return Delivery(header.seq, header.base_seq, summary.data_bytes)

    def compare_seeder(self) -> CompareSeeder | None:
        return None

    def close(self) -> None:
        pass  # nothing held open


TRANSPORT = Transport("memory", MemorySiteSpec, MemorySite)


@contextmanager
def registered() -> Iterator[None]:
    """The memory transport registered (and every memory site empty) for the body."""
    unregister = register(TRANSPORT)
    MemorySite.held_by_site.clear()
    try:
        yield
    finally:
        unregister()
        MemorySite.held_by_site.clear()
