"""Prometheus metrics (dmrepl.metrics): built from a fabricated state store, the textfile
written atomically, the `metrics_file` key, and what `sync` and `dmrepl metrics` publish."""

from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dmrepl import builder, loop, metrics
from dmrepl.builder import DeviceState, LayerState
from dmrepl.config import Config, ConfigError, parse_config
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.errors import DmreplError
from dmrepl.replication import cycle
from dmrepl.replication.cycle import CycleResult, SiteReport, SyncResult, count_cycle
from dmrepl.replication.status import replication_status
from dmrepl.sites import SiteState
from dmrepl.state import SiteMode, StateStore
from dmrepl.statedir import StateDir
from dmrepl.status import EraStatus
from tests.clirun import run_cli_here

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def config_text(tmp_path: Path, extra: str = "") -> str:
    return f"""
[dmrepl]
state_dir = "{tmp_path / "state"}"
{extra}
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
[group.db.site.dr]
transport = "blockdev"
replica.data = "/dev/vdd"
[group.db.site.far]
transport = "blockdev"
replica.data = "/dev/vde"
"""


def loaded(tmp_path: Path, extra: str = "") -> Config:
    path = tmp_path / "dmrepl.toml"
    path.write_text(config_text(tmp_path, extra))
    return parse_config(path.read_text(), path)


def fabricate(state: StateDir) -> None:
    """Cuts 1-3 (stalls 2 ms, 20 ms, 3 s); dr at 3, far at 2 and once over its limit; two
    cycles ok and one failed; 3000 bytes shipped and 2500 applied to dr; a 1234-byte delta."""
    store = StateStore(state.root)
    for eras, stall in (({"data": 2}, 0.002), ({"data": 5}, 0.02), ({"data": 9}, 3.0)):
        store.record_cut("db", eras, stall)
    store.set_cursor("db", "dr", 3)
    store.set_cursor("db", "far", 2)
    store.switch_mode("db", "far", SiteMode.ENFORCED, "over 10 writes behind")
    for result in (CycleResult.OK, CycleResult.FAILED, CycleResult.OK):
        count_cycle(store, "db", result)
    for shipped, applied in ((1000, 1000), (2000, 1500)):
        store.tally("db", "dr", {"shipped_bytes": shipped, "applied_bytes": applied})
    store.close()
    state.spool("db").mkdir(parents=True)
    (state.spool("db") / delta_file_name("db", 3, 2)).write_bytes(b"d" * 1234)


def device_state(group: str = "db", running: bool = True) -> DeviceState:
    """Device data with its era metadata 12 of 512 blocks of 4 KiB in use."""
    layer = LayerState("era", "data-era", running, False, 1, True)
    era = EraStatus(8, 12, 512, 9, None) if running else None
    return DeviceState(group, "data", "/dev/mapper/data", 2048, 8192, 128, (layer,), era, None, ())


def exposed(config: Config, devices: list[DeviceState]) -> str:
    sites = replication_status(config, recent=0).sites
    reading = metrics.Reading(metrics.read_groups(config), sites, devices)
    return metrics.exposition(reading).decode()


def samples(text: str) -> tuple[dict[str, str], Samples]:
    """(family name -> type, (sample name, labels) -> value) of an exposition."""
    types, values = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, values


def at(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


EXPECTED_TYPES = {
    "dmrepl_last_success_timestamp_seconds": "gauge",
    "dmrepl_last_cycle_timestamp_seconds": "gauge",
    "dmrepl_cycles": "counter",
    "dmrepl_last_cut": "gauge",
    "dmrepl_last_cut_timestamp_seconds": "gauge",
    "dmrepl_cut_stall_seconds": "histogram",
    "dmrepl_spool_used_bytes": "gauge",
    "dmrepl_spool_capacity_bytes": "gauge",
    "dmrepl_site_cut": "gauge",
    "dmrepl_site_last_apply_timestamp_seconds": "gauge",
    "dmrepl_site_lag_seconds": "gauge",
    "dmrepl_site_lag_bytes": "gauge",
    "dmrepl_site_lag_cuts": "gauge",
    "dmrepl_site_outstanding_write_bytes": "gauge",
    "dmrepl_site_state": "gauge",
    "dmrepl_site_synchronous": "gauge",
    "dmrepl_site_policy_mode": "gauge",
    "dmrepl_site_shipped_bytes": "counter",
    "dmrepl_site_applied_bytes": "counter",
    "dmrepl_site_deliveries": "counter",
    "dmrepl_site_fall_behind_switches": "counter",
    "dmrepl_stack_up": "gauge",
    "dmrepl_era_metadata_used_bytes": "gauge",
    "dmrepl_era_metadata_size_bytes": "gauge",
}


def test_metrics_from_a_fabricated_store(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    fabricate(StateDir(config.state_dir))
    types, values = samples(exposed(config, [device_state()]))
    assert types == EXPECTED_TYPES
    db, dr, far = at(group="db"), at(group="db", site="dr"), at(group="db", site="far")
    assert values[("dmrepl_cycles_total", at(group="db", result="ok"))] == 2
    assert values[("dmrepl_cycles_total", at(group="db", result="failed"))] == 1
    assert values[("dmrepl_cycles_total", at(group="db", result="sites_behind"))] == 0
    success = values[("dmrepl_last_success_timestamp_seconds", db)]
    assert 0 < success <= values[("dmrepl_last_cycle_timestamp_seconds", db)]
    assert values[("dmrepl_last_cut", db)] == 3
    assert values[("dmrepl_last_cut_timestamp_seconds", db)] > 0
    stall = "dmrepl_cut_stall_seconds"
    assert values[(f"{stall}_bucket", at(group="db", le="0.001"))] == 0
    assert values[(f"{stall}_bucket", at(group="db", le="0.0025"))] == 1
    assert values[(f"{stall}_bucket", at(group="db", le="0.025"))] == 2
    assert values[(f"{stall}_bucket", at(group="db", le="10.0"))] == 3
    assert values[(f"{stall}_bucket", at(group="db", le="+Inf"))] == 3
    assert values[(f"{stall}_count", db)] == 3
    assert values[(f"{stall}_sum", db)] == pytest.approx(3.022)
    assert values[("dmrepl_spool_used_bytes", db)] == 1234
    assert values[("dmrepl_spool_capacity_bytes", db)] == 4 * 2**30
    assert (values[("dmrepl_site_cut", dr)], values[("dmrepl_site_cut", far)]) == (3, 2)
    assert (values[("dmrepl_site_lag_cuts", dr)], values[("dmrepl_site_lag_cuts", far)]) == (0, 1)
    assert values[("dmrepl_site_lag_bytes", dr)] == 0
    assert values[("dmrepl_site_lag_bytes", far)] == 1234
    assert values[("dmrepl_site_lag_seconds", far)] >= values[("dmrepl_site_lag_seconds", dr)]
    assert values[("dmrepl_site_last_apply_timestamp_seconds", dr)] > 0
    assert values[("dmrepl_site_state", at(group="db", site="dr", state="in_sync"))] == 1
    assert values[("dmrepl_site_state", at(group="db", site="dr", state="behind"))] == 0
    assert values[("dmrepl_site_state", at(group="db", site="far", state="behind"))] == 1
    assert values[("dmrepl_site_policy_mode", at(group="db", site="far", mode="enforced"))] == 1
    assert values[("dmrepl_site_policy_mode", at(group="db", site="dr", mode="normal"))] == 1
    switched = ("dmrepl_site_fall_behind_switches_total", at(group="db", site="far", to="enforced"))
    assert values[switched] == 1
    assert values[("dmrepl_site_shipped_bytes_total", dr)] == 3000
    assert values[("dmrepl_site_applied_bytes_total", dr)] == 2500
    assert values[("dmrepl_site_shipped_bytes_total", far)] == 0
    assert values[("dmrepl_site_synchronous", dr)] == 0
    device = at(group="db", device="data")
    assert values[("dmrepl_stack_up", device)] == 1
    assert values[("dmrepl_era_metadata_used_bytes", device)] == 12 * 4096
    assert values[("dmrepl_era_metadata_size_bytes", device)] == 512 * 4096
    # Outstanding writes need the gates' counters, which this reading did not look at.
    assert not any(name == "dmrepl_site_outstanding_write_bytes" for name, _ in values)


def test_a_fresh_host_shows_zeros_and_leaves_unknowns_out(tmp_path: Path) -> None:
    """No state store yet: counters are 0, the last success is 0 (never: a freshness alert
    fires), a site's cut and lags are absent rather than a made-up 0; nothing is created."""
    config = loaded(tmp_path)
    types, values = samples(exposed(config, [device_state(running=False)]))
    assert not (tmp_path / "state").exists()
    assert set(types) == set(EXPECTED_TYPES)
    assert values[("dmrepl_last_success_timestamp_seconds", at(group="db"))] == 0
    assert values[("dmrepl_cycles_total", at(group="db", result="failed"))] == 0
    assert values[("dmrepl_cut_stall_seconds_count", at(group="db"))] == 0
    assert values[("dmrepl_site_state", at(group="db", site="dr", state="not_seeded"))] == 1
    assert ("dmrepl_site_cut", at(group="db", site="dr")) not in values
    assert ("dmrepl_site_lag_seconds", at(group="db", site="dr")) not in values
    assert values[("dmrepl_stack_up", at(group="db", device="data"))] == 0
    assert ("dmrepl_era_metadata_used_bytes", at(group="db", device="data")) not in values


def test_a_store_from_before_the_tallies_reads_as_none_counted(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    fabricate(StateDir(config.state_dir))
    with sqlite3.connect(StateDir(config.state_dir).db) as db:
        db.execute("DROP TABLE tallies")
    store = StateStore.open_readonly(config.state_dir)
    assert store is not None and store.tallies("db") == {}
    store.close()
    _, values = samples(exposed(config, []))
    assert values[("dmrepl_cycles_total", at(group="db", result="ok"))] == 0
    assert values[("dmrepl_last_cut", at(group="db"))] == 3


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool: bin/setup installs it")
def test_promtool_accepts_the_exposition(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    fabricate(StateDir(config.state_dir))
    text = exposed(config, [device_state()])
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_sync_counts_its_result_and_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`cycle.sync` counts ok, sites_behind and failed (then the error goes on unchanged)."""
    config = loaded(tmp_path)
    fabricate(StateDir(config.state_dir))
    store = StateStore(config.state_dir)
    cut = store.cuts("db", limit=1)[0]
    store.close()
    outcomes: list[SyncResult | Exception] = [
        DmreplError("the stack is not running"),
        SyncResult("db", cut, [], 0, 0, 0, [SiteReport("dr", "blockdev", SiteState.IN_SYNC, 3)]),
        SyncResult("db", cut, [], 0, 0, 0, [SiteReport("dr", "blockdev", SiteState.DOWN, 2)]),
    ]

    def one_cycle(*_args: object, **_kwargs: object) -> SyncResult:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(cycle, "checked_request", lambda config, group, _s: config.groups[group])
    monkeypatch.setattr(cycle, "_one_cycle", one_cycle)
    with pytest.raises(DmreplError, match="not running"):
        cycle.sync(None, config, "db")  # type: ignore[arg-type]
    cycle.sync(None, config, "db")  # type: ignore[arg-type]
    cycle.sync(None, config, "db")  # type: ignore[arg-type]
    store = StateStore(config.state_dir)
    tallies = store.tallies("db")
    store.close()
    assert tallies[("", "cycles_ok")] == 3  # two fabricated
    assert tallies[("", "cycles_failed")] == 2  # one fabricated
    assert tallies[("", "cycles_sites_behind")] == 1
    assert tallies[("", "last_failed")] <= tallies[("", "last_ok")]


def test_the_textfile_is_replaced_atomically_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "dmrepl.prom"
    target.write_text("old\n")
    with target.open() as reader:  # a reader of the old file keeps reading the old file
        old = os.umask(0o077)  # as `dmrepl` runs
        try:
            metrics.write_textfile(target, b"new\n")
        finally:
            os.umask(old)
        assert reader.read() == "old\n"
    assert target.read_bytes() == b"new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # node_exporter's own user reads it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dmrepl.prom"]  # no temporary left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "dmrepl.prom"
    target.write_text("old\n")

    def full(_fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space"):
        metrics.write_textfile(target, b"new\n")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dmrepl.prom"]


def test_metrics_file_key(tmp_path: Path) -> None:
    assert loaded(tmp_path).metrics_file is None
    chosen = loaded(tmp_path, 'metrics_file = "/var/lib/node-exporter/dmrepl.prom"')
    assert chosen.metrics_file == Path("/var/lib/node-exporter/dmrepl.prom")
    for value, problem in (
        ("dmrepl.prom", "is not an absolute path"),
        ("/var/lib/node-exporter/dmrepl.txt", "must end in .prom"),
        (str(tmp_path / "state" / "m.prom"), "inside state_dir"),
        ("", "must be a non-empty string"),
    ):
        with pytest.raises(ConfigError) as raised:
            loaded(tmp_path, f'metrics_file = "{value}"')
        assert len(raised.value.problems) == 1
        assert "dmrepl.metrics_file" in raised.value.problems[0]
        assert problem in raised.value.problems[0]


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dmrepl refuses non-root")


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device-mapper is there; the stacks are up as `device_state` says; devices probe."""
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)
    monkeypatch.setattr(builder, "status", lambda *_args: [device_state()])


@needs_root
@pytest.mark.usefixtures("no_kernel")
def test_cli_metrics_prints_the_exposition(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    fabricate(StateDir(config.state_dir))
    code, out, err = run_cli_here("metrics", "db", "--config", str(config.path))
    assert code == 0, out + err
    types, values = samples(out)
    assert types == EXPECTED_TYPES
    assert values[("dmrepl_last_cut", at(group="db"))] == 3


@needs_root
@pytest.mark.usefixtures("no_kernel")
def test_a_failed_sync_still_publishes_the_metrics_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is rewritten after a failed cycle, its last success unchanged: what a
    freshness alert needs."""
    (tmp_path / "textfile").mkdir()
    prom = tmp_path / "textfile" / "dmrepl.prom"
    config = loaded(tmp_path, f'metrics_file = "{prom}"')
    fabricate(StateDir(config.state_dir))

    def fail(_runner: object, _config: Config, group: str, **_: object) -> SyncResult:
        store = StateStore(config.state_dir)
        count_cycle(store, group, CycleResult.FAILED)
        store.close()
        raise DmreplError("the stack of data is not running")

    monkeypatch.setattr(cycle, "sync", fail)
    code, _out, err = run_cli_here("sync", "db", "--config", str(config.path))
    assert code != 0 and "not running" in err
    _, values = samples(prom.read_text())
    assert values[("dmrepl_cycles_total", at(group="db", result="failed"))] == 2
    last_success = values[("dmrepl_last_success_timestamp_seconds", at(group="db"))]
    assert 0 < last_success < values[("dmrepl_last_cycle_timestamp_seconds", at(group="db"))]


DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def test_the_doc_lists_every_metric_and_its_rules_pass_promtool(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    fabricate(StateDir(config.state_dir))
    text = DOC.read_text()
    for family in text_string_to_metric_families(exposed(config, [device_state()])):
        shown = family.name + ("_total" if family.type == "counter" else "")
        assert f"| `{shown}` | {family.type} |" in text
    if shutil.which("promtool") is None:
        return  # the rules are checked where promtool is (bin/setup installs it)
    rules = tmp_path / "dmrepl.rules.yml"
    rules.write_text(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    checked = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
