"""`dmrepl metrics` and `metrics_file` after real cycles: `promtool check metrics` passes and
every metric issue 18 asks for is there, with values the cycles explain."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from dmrepl.demo import write_random
from tests.kernel.stacks import Bed

MiB = 2**20
# Issue 18: last success and last cut per group and site, lag in seconds and bytes, site
# state, bytes shipped and applied, cut stall histogram, cycles by result, era metadata use,
# spool use, fall-behind switches.
REQUIRED = (
    "dmrepl_last_success_timestamp_seconds",
    "dmrepl_last_cut",
    "dmrepl_site_cut",
    "dmrepl_site_last_apply_timestamp_seconds",
    "dmrepl_site_lag_seconds",
    "dmrepl_site_lag_bytes",
    "dmrepl_site_state",
    "dmrepl_site_shipped_bytes_total",
    "dmrepl_site_applied_bytes_total",
    "dmrepl_cut_stall_seconds_bucket",
    "dmrepl_cut_stall_seconds_count",
    "dmrepl_cut_stall_seconds_sum",
    "dmrepl_cycles_total",
    "dmrepl_era_metadata_used_bytes",
    "dmrepl_era_metadata_size_bytes",
    "dmrepl_spool_used_bytes",
    "dmrepl_site_fall_behind_switches_total",
)


def promtool_check(text: str) -> None:
    """`promtool check metrics` on `text`; fails (never skips) without promtool."""
    promtool = shutil.which("promtool")
    assert promtool is not None, (
        "promtool is not installed: bin/setup installs it (Debian package prometheus)"
    )
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert checked.returncode == 0, f"promtool check metrics:\n{checked.stdout}{checked.stderr}"


def values_of(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_of_real_cycles_pass_promtool(bed: Bed, workdir: Path) -> None:
    textfile = workdir / "textfile"
    textfile.mkdir()
    prom = textfile / "dmrepl.prom"
    bed.settings["metrics_file"] = str(prom)
    bed.add_device("ma", origin_mib=16)
    bed.add_site("dr")
    bed.cli("up")
    bed.cli("sync", bed.group)  # seeds dr
    for cycle in range(2):
        write_random("/dev/mapper/ma", (cycle + 1) * MiB, 256 * 1024)
        bed.cli("sync", bed.group)
    shown = bed.cli("metrics", bed.group).stdout
    promtool_check(shown)
    promtool_check(prom.read_text())
    values = values_of(shown)
    names = {name for name, _ in values}
    assert not [name for name in REQUIRED if name not in names], shown
    group = frozenset({("group", bed.group)})
    site = group | {("site", "dr")}
    device = group | {("device", "ma")}
    assert values[("dmrepl_cycles_total", group | {("result", "ok")})] == 3
    assert values[("dmrepl_cycles_total", group | {("result", "failed")})] == 0
    assert values[("dmrepl_last_cut", group)] == 3
    assert values[("dmrepl_site_cut", site)] == 3
    assert values[("dmrepl_site_state", site | {("state", "in_sync")})] == 1
    assert values[("dmrepl_site_lag_bytes", site)] == 0
    assert 0 <= values[("dmrepl_site_lag_seconds", site)] < 600
    assert values[("dmrepl_cut_stall_seconds_count", group)] == 3
    assert values[("dmrepl_cut_stall_seconds_bucket", group | {("le", "+Inf")})] == 3
    assert 0 < values[("dmrepl_cut_stall_seconds_sum", group)] < 30
    # Two deltas of 256 KiB each (64 KiB era blocks), and the seed's 16 MiB image before.
    assert values[("dmrepl_site_applied_bytes_total", site)] >= 512 * 1024
    assert values[("dmrepl_site_shipped_bytes_total", site)] >= 512 * 1024
    used = values[("dmrepl_era_metadata_used_bytes", device)]
    assert 0 < used <= values[("dmrepl_era_metadata_size_bytes", device)]
    assert values[("dmrepl_spool_used_bytes", group)] >= 0
    last = values[("dmrepl_last_success_timestamp_seconds", group)]
    assert last >= values[("dmrepl_last_cut_timestamp_seconds", group)] > 0
    # The file `sync` published after its cycle holds the same history.
    published = values_of(prom.read_text())
    assert published[("dmrepl_cycles_total", group | {("result", "ok")})] == 3
    assert published[("dmrepl_last_success_timestamp_seconds", group)] == last
