"""Prometheus metrics: what `dmrepl metrics` prints and `metrics_file` holds (docs/metrics.md).

`read_metrics` gathers a `Reading` (read-only, like `dmrepl status`: the state store opened
with SQLite `mode=ro`, the spool listed, the era targets' status read); `registry` turns a
reading into a prometheus_client registry, which `exposition` renders in the text format and
`write_textfile` publishes atomically for node_exporter's textfile collector.

Totals that outlive a process (cycles by result, bytes shipped and applied) are the state
store's tallies, counted by the cycle (dmrepl.replication.cycle); the cut stall histogram is
counted from the store's cuts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dmrepl import builder
from dmrepl.builder import DeviceState
from dmrepl.config import Config
from dmrepl.deltafiles import fsync_directory, list_files
from dmrepl.executor import Runner
from dmrepl.replication.cycle import CycleResult
from dmrepl.replication.kernelview import observe_kernel
from dmrepl.replication.status import SiteStatus, replication_status
from dmrepl.state import CutRecord, SiteMode, StateStore
from dmrepl.statedir import StateDir

# Upper bounds of the cut stall histogram, in seconds: a cut holds writers for milliseconds
# normally; seconds mean a slow suspend (a device that does not drain).
STALL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# What `dmrepl status` may say of a site (dmrepl.replication.status._site_state).
SITE_STATES = (
    "in sync", "behind", "shipping", "down", "misconfigured", "broken", "not seeded",
    "needs seed",
)  # fmt: skip
TEXTFILE_MODE = 0o644  # node_exporter runs as its own user, and reads it


@dataclass(frozen=True)
class GroupReading:
    """What the state store and the spool say of one group."""

    group: str
    last_cut: CutRecord | None
    stall_buckets: Sequence[tuple[float, int]]  # (upper bound s, cuts that stalled at most that)
    stall_count: int
    stall_sum_s: float
    spool_bytes: int  # the chain deltas in the spool
    spool_cap_bytes: int
    tallies: Mapping[tuple[str, str], float]  # (site or '', name) -> value (StateStore.tally)


@dataclass(frozen=True)
class Reading:
    """Everything one exposition shows."""

    groups: Sequence[GroupReading]
    sites: Sequence[SiteStatus]
    devices: Sequence[DeviceState]


def read_metrics(runner: Runner, config: Config, group: str | None = None) -> Reading:
    """Read what the metrics show of the selected groups (creates and changes nothing)."""
    devices = builder.status(runner, config, group)
    seen = observe_kernel(config, group, devices)
    sites = replication_status(config, group, recent=0, seen=seen).sites
    return Reading(read_groups(config, group), sites, devices)


def read_groups(config: Config, group: str | None = None) -> list[GroupReading]:
    """Each selected group's last cut, stall histogram, spool use and tallies."""
    store = StateStore.open_readonly(config.state_dir)
    readings = []
    try:
        for spec in config.select(group):
            spooled = list_files(StateDir(config.state_dir).spool(spec.name), spec.name)
            buckets: Sequence[tuple[float, int]] = [(b, 0) for b in STALL_BUCKETS_S]
            count, total, latest, tallies = 0, 0.0, None, {}
            if store is not None:
                buckets, count, total = store.stall_histogram(spec.name, STALL_BUCKETS_S)
                latest = next(iter(store.cuts(spec.name, limit=1)), None)
                tallies = store.tallies(spec.name)
            readings.append(
                GroupReading(
                    group=spec.name,
                    last_cut=latest,
                    stall_buckets=buckets,
                    stall_count=count,
                    stall_sum_s=total,
                    spool_bytes=sum(f.size for f in spooled),
                    spool_cap_bytes=spec.spool_bytes,
                    tallies=tallies,
                )
            )
    finally:
        if store is not None:
            store.close()
    return readings


def registry(reading: Reading) -> CollectorRegistry:
    """A registry holding every metric of `reading`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families(reading)))
    return registry


def exposition(reading: Reading) -> bytes:
    """`reading` in Prometheus' text exposition format."""
    return generate_latest(registry(reading))


class _Families(Collector):
    def __init__(self, metrics: list[Metric]):
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self.metrics)


def families(reading: Reading) -> list[Metric]:
    """Every metric family, filled from `reading` (docs/metrics.md lists them)."""
    return [
        *_group_families(reading.groups),
        *_site_families(reading.sites, {g.group: g.tallies for g in reading.groups}),
        *_device_families(reading.devices),
    ]


def _group_families(groups: Iterable[GroupReading]) -> Iterator[Metric]:
    label = ["group"]
    success = GaugeMetricFamily(
        "dmrepl_last_success_timestamp_seconds",
        "When the group's last sync ended with every site holding its cut (0: never).",
        labels=label,
    )
    attempt = GaugeMetricFamily(
        "dmrepl_last_cycle_timestamp_seconds",
        "When the group's last sync ended, whatever its result (0: never).",
        labels=label,
    )
    cycles = CounterMetricFamily(
        "dmrepl_cycles", "Syncs of the group, by result.", labels=["group", "result"]
    )
    cut = GaugeMetricFamily(
        "dmrepl_last_cut", "Sequence number of the group's newest cut (0: none).", labels=label
    )
    cut_time = GaugeMetricFamily(
        "dmrepl_last_cut_timestamp_seconds", "When the group's newest cut was taken.", labels=label
    )
    stall = HistogramMetricFamily(
        "dmrepl_cut_stall_seconds", "How long each cut held the group's writers.", labels=label
    )
    spool = GaugeMetricFamily(
        "dmrepl_spool_used_bytes", "Bytes of chain deltas in the group's spool.", labels=label
    )
    cap = GaugeMetricFamily(
        "dmrepl_spool_capacity_bytes", "The group's spool cap (spool_size).", labels=label
    )
    for reading in groups:
        name, tallies = reading.group, reading.tallies
        lasts = [tallies.get(("", f"last_{result}"), 0.0) for result in CycleResult]
        success.add_metric([name], tallies.get(("", f"last_{CycleResult.OK}"), 0.0))
        attempt.add_metric([name], max(lasts))
        for result in CycleResult:
            cycles.add_metric([name, result.value], tallies.get(("", f"cycles_{result}"), 0.0))
        cut.add_metric([name], 0 if reading.last_cut is None else reading.last_cut.seq)
        if reading.last_cut is not None:
            cut_time.add_metric([name], reading.last_cut.time)
        buckets = [(repr(float(bound)), count) for bound, count in reading.stall_buckets]
        stall.add_metric(
            [name], [*buckets, ("+Inf", reading.stall_count)], sum_value=reading.stall_sum_s
        )
        spool.add_metric([name], reading.spool_bytes)
        cap.add_metric([name], reading.spool_cap_bytes)
    yield from (success, attempt, cycles, cut, cut_time, stall, spool, cap)


def _site_families(
    sites: Iterable[SiteStatus], tallies: Mapping[str, Mapping[tuple[str, str], float]]
) -> Iterator[Metric]:
    label = ["group", "site"]

    def gauge(name: str, text: str, extra: Sequence[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(f"dmrepl_site_{name}", text, labels=[*label, *extra])

    def counter(name: str, text: str, extra: Sequence[str] = ()) -> CounterMetricFamily:
        return CounterMetricFamily(f"dmrepl_site_{name}", text, labels=[*label, *extra])

    cut = gauge("cut", "Sequence number of the cut the site's replicas hold durably.")
    applied_at = gauge(
        "last_apply_timestamp_seconds", "When the site last applied a cut durably (0: never)."
    )
    lag_s = gauge("lag_seconds", "Age of the cut the site's replicas hold.")
    lag_bytes = gauge("lag_bytes", "Bytes of spooled deltas the site has still to be sent.")
    lag_cuts = gauge("lag_cuts", "Cuts the site is behind the group's newest.")
    outstanding = gauge(
        "outstanding_write_bytes", "Bytes written to the gates since the site's cut."
    )
    state = gauge("state", "1 for the site's state as `dmrepl status` shows it.", ["state"])
    synchronous = gauge("synchronous", "1 when each write reaches the site before it completes.")
    policy = gauge("policy_mode", "1 for the site's fall-behind policy mode.", ["mode"])
    shipped = counter("shipped_bytes", "Bytes of deltas sent to the site.")
    applied = counter("applied_bytes", "Bytes of data the site applied (deltas and seeds).")
    deliveries = counter("deliveries", "Deltas the site applied durably.")
    switches = counter(
        "fall_behind_switches",
        "Switches of the site's policy mode: to enforced (over a fall-behind limit), released "
        "(back to its policy), dropped (after holding writers for stall_limit).",
        ["to"],
    )
    for site in sites:
        labels = [site.group, site.site]
        known = tallies.get(site.group, {})
        _add_known(cut, labels, site.cursor)
        applied_at.add_metric(labels, site.last_ack or 0.0)
        _add_known(lag_s, labels, site.lag_s)
        _add_known(lag_bytes, labels, site.lag_bytes)
        _add_known(lag_cuts, labels, site.lag_cuts)
        sectors = site.outstanding_sectors
        _add_known(outstanding, labels, None if sectors is None else sectors * 512)
        for value in SITE_STATES:
            state.add_metric([*labels, value.replace(" ", "_")], float(site.state == value))
        synchronous.add_metric(labels, float(site.mode == "S"))
        for mode in SiteMode:
            policy.add_metric([*labels, mode.value], float(site.policy_mode == mode.value))
        for family, name in ((shipped, "shipped_bytes"), (applied, "applied_bytes")):
            family.add_metric(labels, known.get((site.site, name), 0.0))
        deliveries.add_metric(labels, known.get((site.site, "deliveries"), 0.0))
        for to, count in (
            ("enforced", site.switches.enforced),
            ("released", site.switches.released),
            ("dropped", site.switches.dropped),
        ):
            switches.add_metric([*labels, to], count)
    yield from (cut, applied_at, lag_s, lag_bytes, lag_cuts, outstanding, state, synchronous)
    yield from (policy, shipped, applied, deliveries, switches)


def _add_known(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    """A sample only when the value is known (an absent series, never a made-up 0)."""
    if value is not None:
        family.add_metric(labels, value)


def _device_families(devices: Iterable[DeviceState]) -> Iterator[Metric]:
    label = ["group", "device"]
    up = GaugeMetricFamily(
        "dmrepl_stack_up", "1 when every layer of the device's stack is running.", labels=label
    )
    used = GaugeMetricFamily(
        "dmrepl_era_metadata_used_bytes", "Bytes of dm-era metadata in use.", labels=label
    )
    size = GaugeMetricFamily(
        "dmrepl_era_metadata_size_bytes", "Size of the dm-era metadata area.", labels=label
    )
    for device in devices:
        labels = [device.group, device.device]
        up.add_metric(labels, float(device.running))
        if device.era is not None:
            block = device.era.metadata_block_sectors * 512
            used.add_metric(labels, device.era.metadata_used_blocks * block)
            size.add_metric(labels, device.era.metadata_total_blocks * block)
    yield from (up, used, size)


def write_textfile(path: Path, data: bytes) -> None:
    """Publish `data` at `path` atomically, readable by node_exporter (mode 0644).

    Written to a new hidden temporary file in the same directory (O_EXCL: never through a
    planted link; node_exporter reads only `*.prom`), fsynced, then renamed over `path`, so
    a reader sees the old file or the new one, never a part."""
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), TEXTFILE_MODE)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.rename(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
