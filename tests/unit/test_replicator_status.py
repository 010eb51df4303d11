"""Status in the replicator's words (issue 16 item 4): each site's mode S/A and outstanding
writes from the state store and the gates' counters, and `dmrepl status --format replicator`
printing dm-replicator's `replicator` / `replicator-dev` status lines."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from dmrepl import builder, executor, loop, probe
from dmrepl.builder import DeviceState, LayerState
from dmrepl.config import Config, GroupSpec, parse_config
from dmrepl.policy import WriteCounters
from dmrepl.replication.kernelview import observe_kernel
from dmrepl.replication.status import (
    KernelView,
    ModeSwitches,
    SiteStatus,
    replication_status,
    site_mode,
)
from dmrepl.replication.synchronous import LegsState, SiteLegs, legs_in_mirrors
from dmrepl.replicator_status import render_replicator_status, replicator_status
from dmrepl.state import NORMAL_MODE, SiteMode, SiteModeRecord, StateStore
from dmrepl.status import Health, MirrorLeg, MirrorLogStatus, MirrorStatus
from tests.clirun import run_cli_here
from tests.unit.test_readonly_status import snapshot

LOG_SECTORS = 2 * 2**30 // 512  # spool_size = "2GiB"


def config_at(tmp_path: Path) -> Path:
    """Group db: devices data and logs; sites dr (synchronous), slink2 (asynchronous with a
    fall-behind limit) and vault (dir). Link numbers: slink2 2, dr 3, vault 4."""
    (tmp_path / "vault").mkdir(exist_ok=True)
    path = tmp_path / "dmrepl.toml"
    path.write_text(
        f"""
[dmrepl]
state_dir = "{tmp_path / "state"}"
[group.db]
spool_size = "2GiB"
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"
[group.db.device.logs]
origin = "/dev/vdf"
metadata = "/dev/vdg"
[group.db.site.dr]
transport = "blockdev"
policy = "synchronous"
replica.data = "/dev/vdd"
replica.logs = "/dev/vdh"
[group.db.site.slink2]
transport = "blockdev"
fall_behind = {{ ios = 100 }}
replica.data = "/dev/vde"
replica.logs = "/dev/vdi"
[group.db.site.vault]
transport = "dir"
path = "{tmp_path / "vault"}"
"""
    )
    return path


def loaded(tmp_path: Path) -> Config:
    path = config_at(tmp_path)
    return parse_config(path.read_text(), path)


def group_of(tmp_path: Path) -> GroupSpec:
    return loaded(tmp_path).groups["db"]


def site(name: str, **fields: object) -> SiteStatus:
    """A site of group db as status shows it: in sync at cut 4, mode A, 0 writes behind."""
    values: dict[str, object] = dict(
        group="db", site=name, transport="blockdev", policy="asynchronous", state="in sync",
        cursor=4, latest_cut=4, lag_cuts=0, lag_eras=0, lag_bytes=0, lag_s=1.0, detail="",
        outstanding_ios=0, outstanding_sectors=0, outstanding_age_s=0.0,
    )  # fmt: skip
    values.update(fields)
    return SiteStatus(**values)  # type: ignore[arg-type]


def legs(state: LegsState, **health: tuple[Health | None, tuple[int, int]]) -> SiteLegs:
    return SiteLegs(
        "dr", state, {d: h for d, (h, _) in health.items()}, {d: r for d, (_, r) in health.items()}
    )


JOINED = legs(LegsState.JOINED, data=(Health.ALIVE, (1024, 1024)), logs=(Health.ALIVE, (256, 256)))
BOTH_RUNNING = {"data": 2097152, "logs": 524288}


def lines(tmp_path: Path, sites: list[SiteStatus], running: dict[str, int | None]) -> list[str]:
    shown = replicator_status(group_of(tmp_path), sites, running, "254:1")
    return render_replicator_status(shown)


def test_a_synchronous_site_with_joined_legs_and_two_asynchronous_ones(tmp_path: Path) -> None:
    sites = [
        site("dr", policy="synchronous", mode="S", legs=JOINED),
        site("slink2", outstanding_ios=12, outstanding_sectors=96),
        site("vault", transport="dir", state="not seeded", cursor=None,
             outstanding_ios=None, outstanding_sectors=None),
    ]  # fmt: skip
    assert lines(tmp_path, sites, BOTH_RUNNING) == [
        f"db-replicator: 0 {LOG_SECTORS} replicator A,0,0 A,12,96 S,0,0 A,-,- 12/96/{LOG_SECTORS}",
        "data: 0 2097152 replicator-dev 254:1 0 A,- A,- A,1024/1024 A,-",
        "logs: 0 524288 replicator-dev 254:1 1 A,- A,- A,256/256 A,-",
    ]


def test_a_failed_leg_is_w_a_read_error_r_and_a_resync_a_plus(tmp_path: Path) -> None:
    failed = legs(
        LegsState.FAILED, data=(Health.WRITE_FAILED, (1000, 1024)), logs=(Health.ALIVE, (256, 256))
    )
    sites = [
        site("dr", policy="synchronous", mode="A", legs=failed, outstanding_ios=7,
             outstanding_sectors=56),
        site("slink2"),
        site("vault", transport="dir"),
    ]  # fmt: skip
    shown = lines(tmp_path, sites, BOTH_RUNNING)
    assert shown[0] == f"db-replicator: 0 {LOG_SECTORS} replicator A,0,0 A,0,0 A,7,56 A,0,0 " + (
        f"7/56/{LOG_SECTORS}"
    )
    assert shown[1:] == [
        "data: 0 2097152 replicator-dev 254:1 0 A,- A,- W,1000+/1024 A,-",
        "logs: 0 524288 replicator-dev 254:1 1 A,- A,- A,256/256 A,-",
    ]
    for health, letter in [(Health.READ_FAILED, "R"), (Health.SYNC_FAILED, "W"),
                           (Health.FLUSH_FAILED, "W"), (Health.UNKNOWN, "W")]:  # fmt: skip
        marked = legs(
            LegsState.FAILED, data=(health, (1024, 1024)), logs=(Health.ALIVE, (256, 256))
        )
        sites[0] = dataclasses.replace(sites[0], legs=marked)
        assert lines(tmp_path, sites, BOTH_RUNNING)[1].endswith(f" A,- A,- {letter},1024/1024 A,-")


def test_an_enforced_asynchronous_site_is_s_and_a_down_site_is_w(tmp_path: Path) -> None:
    sites = [
        site("dr", policy="synchronous", mode="A", state="down", legs=None, cursor=3,
             outstanding_ios=None, outstanding_sectors=None),
        site("slink2", mode="S", policy_mode="enforced", outstanding_ios=150,
             outstanding_sectors=1200),
        site("vault", transport="dir", state="misconfigured"),
    ]  # fmt: skip
    assert lines(tmp_path, sites, {"data": 2097152, "logs": None}) == [
        f"db-replicator: 0 {LOG_SECTORS} replicator A,0,0 S,150,1200 A,-,- A,0,0 "
        f"150/1200/{LOG_SECTORS}",
        "data: 0 2097152 replicator-dev 254:1 0 A,- A,- W,- W,-",
    ]
    shown = replicator_status(group_of(tmp_path), sites, {"data": 2097152}, "254:1")
    assert shown.skipped == ("logs: its stack is not running (no replicator-dev line)",)


def test_the_mode_of_each_kind_of_site(tmp_path: Path) -> None:
    spec = {s.name: s for s in group_of(tmp_path).sites}
    enforced = SiteModeRecord(SiteMode.ENFORCED, 100.0, "150 writes behind (limit 100)", 1, 0, 0)
    dropped = SiteModeRecord(SiteMode.DROPPED, 100.0, "did not have cut 9", 1, 0, 1)
    detached = legs(LegsState.DETACHED, data=(None, (8, 8)), logs=(None, (8, 8)))
    failed = legs(LegsState.FAILED, data=(Health.WRITE_FAILED, (8, 8)), logs=(None, (8, 8)))
    cases = [
        (spec["dr"], NORMAL_MODE, JOINED, "S", "synchronous: its replicas are healthy mirror legs"),
        (spec["dr"], enforced, JOINED, "S", "synchronous: its replicas are healthy mirror legs"),
        (spec["dr"], NORMAL_MODE, detached, "A", "not a mirror leg: follows by cycles until it "
         "joins"),
        (spec["dr"], NORMAL_MODE, failed, "A", "a leg failed (data write failed, logs not a leg): "
         "follows by cycles"),
        (spec["dr"], NORMAL_MODE, None, "A", "mirror legs not read: the stack of data is not "
         "running"),
        (spec["slink2"], NORMAL_MODE, None, "A", ""),
        (spec["slink2"], enforced, None, "S", "over its fall-behind limit: driven synchronously"),
        (spec["vault"], dropped, None, "A", "dropped after holding writers for stall_limit"),
    ]  # fmt: skip
    for config, record, seen, mode, why in cases:
        unread = "the stack of data is not running"
        assert site_mode(config, record, seen, unread) == (mode, why), (config.name, record)


def test_legs_read_from_mirror_statuses() -> None:
    def mirror(*legs: tuple[str, Health], in_sync: int = 64) -> MirrorStatus:
        return MirrorStatus(
            tuple(MirrorLeg(d, h) for d, h in legs), in_sync, 64, MirrorLogStatus("core")
        )

    origin = ("254:16", Health.ALIVE)
    both = {"data": "254:48", "logs": "254:64"}
    joined = {
        "data": mirror(origin, ("254:48", Health.ALIVE)),
        "logs": mirror(origin, ("254:64", Health.ALIVE)),
    }
    shown = legs_in_mirrors("dr", both, joined)
    assert shown.state is LegsState.JOINED
    assert shown.regions == {"data": (64, 64), "logs": (64, 64)}
    failed = dict(joined, logs=mirror(origin, ("254:64", Health.WRITE_FAILED)))
    assert legs_in_mirrors("dr", both, failed).state is LegsState.FAILED
    # A region a failed write left to the origin alone: no joined leg can be trusted, even
    # one marked A (dm-raid1 writes such regions to the first leg only).
    out_of_sync = dict(joined, logs=mirror(origin, ("254:64", Health.ALIVE), in_sync=60))
    unsound = legs_in_mirrors("dr", both, out_of_sync)
    assert unsound.state is LegsState.FAILED
    assert unsound.describe_failure() == "logs: mirror 60/64 regions in sync"
    local_failed = dict(
        joined, logs=mirror(("254:16", Health.WRITE_FAILED), ("254:64", Health.ALIVE))
    )
    assert legs_in_mirrors("dr", both, local_failed).state is LegsState.FAILED
    one_linear = dict(joined, logs=None)  # the layer runs as a linear: no legs
    partly = legs_in_mirrors("dr", both, one_linear)
    assert partly.state is LegsState.FAILED and partly.health["logs"] is None
    assert legs_in_mirrors("dr", both, {"data": None, "logs": None}).state is LegsState.DETACHED
    missing_node = {"data": None, "logs": "254:64"}  # a replica without a device node
    assert legs_in_mirrors("dr", missing_node, joined).health == {
        "data": None,
        "logs": Health.ALIVE,
    }


def device_state(name: str, mirror: MirrorStatus | None, *, suspended: str = "") -> DeviceState:
    """A running stack of group db whose mirror layer shows `mirror` (`suspended`: the layer
    that is suspended)."""
    layers = tuple(
        LayerState(layer, f"{name}-{layer}", True, layer == suspended, 1, True)
        for layer in ("meta", "access", "mirror", "orig", "era", "gate")
    )
    return DeviceState("db", name, f"/dev/mapper/{name}", 2097152, 8192, 128, layers, None,
                       mirror, ())  # fmt: skip


def test_the_kernel_view_reads_counters_and_legs_without_running_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    numbers = {"/dev/vdb": "254:16", "/dev/vdd": "254:48", "/dev/vdh": "254:112"}
    monkeypatch.setattr(probe, "dev_id_of", numbers.get)
    counted = {"/dev/mapper/data": WriteCounters(5, 40)}  # the logs gate is not there
    monkeypatch.setattr(probe, "write_counters", counted.get)
    config = loaded(tmp_path)

    def mirror(leg: Health) -> MirrorStatus:
        legs = (MirrorLeg("254:16", Health.ALIVE), MirrorLeg("254:48", leg))
        return MirrorStatus(legs, 1024, 1024, MirrorLogStatus("core"))

    states = [device_state("data", mirror(Health.ALIVE)), device_state("logs", None)]
    seen = observe_kernel(config, "db", states)
    assert seen.counters == {"db": {"data": WriteCounters(5, 40)}}
    assert list(seen.legs) == [("db", "dr")] and seen.legs_unread == {}
    dr = seen.legs[("db", "dr")]  # logs' mirror layer is a linear: dr is not its leg
    assert (dr.state, dr.health) == (LegsState.FAILED, {"data": Health.ALIVE, "logs": None})
    states[1] = device_state("logs", None, suspended="mirror")
    seen = observe_kernel(config, "db", states)
    assert seen.legs == {} and seen.legs_unread == {"db": "logs-mirror is suspended"}
    seen = observe_kernel(config, "db", states[:1])
    assert seen.legs_unread == {"db": "the devices of logs cannot be probed"}
    gone = tuple(dataclasses.replace(layer, present=False) for layer in states[0].layers)
    states = [dataclasses.replace(states[0], layers=gone, mirror=None), states[1]]
    seen = observe_kernel(config, "db", states)
    assert seen.legs_unread == {"db": "the stack of data is not running; logs-mirror is suspended"}


def store_with_history(config: Config) -> None:
    """Cuts 1-2 of db with the gates' counters; dr and slink2 hold cut 1, vault cut 2;
    slink2 was driven synchronously once and still is; vault was dropped once and released."""
    store = StateStore(config.state_dir)
    at_first = {"data": WriteCounters(100, 800), "logs": WriteCounters(10, 80)}
    at_second = {"data": WriteCounters(150, 1200), "logs": WriteCounters(10, 80)}
    store.record_cut("db", {"data": 2, "logs": 2}, 0.01, counters=at_first)
    store.record_cut("db", {"data": 4, "logs": 3}, 0.01, counters=at_second)
    store.set_cursor("db", "dr", 1)
    store.set_cursor("db", "slink2", 1)
    store.set_cursor("db", "vault", 2)
    store.switch_mode("db", "slink2", SiteMode.ENFORCED, "130 writes behind (limit 100)")
    store.switch_mode("db", "vault", SiteMode.DROPPED, "did not have cut 2 after 60 s")
    store.switch_mode("db", "vault", SiteMode.NORMAL, "caught up after being dropped")
    store.close()


def test_status_data_from_the_state_store_and_the_gates(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    store_with_history(config)
    now = {"data": WriteCounters(230, 1840), "logs": WriteCounters(15, 120)}
    seen = KernelView(counters={"db": now}, legs={("db", "dr"): JOINED})
    before = snapshot(tmp_path)
    shown = {s.site: s for s in replication_status(config, "db", seen=seen).sites}
    assert snapshot(tmp_path) == before  # read-only: the store is not written
    dr, slink2, vault = shown["dr"], shown["slink2"], shown["vault"]
    assert (dr.mode, dr.outstanding_ios, dr.outstanding_sectors) == ("S", 0, 0)
    assert dr.legs == JOINED and dr.switches == ModeSwitches()
    # since cut 1: data 130 writes / 1040 sectors, logs 5 / 40
    assert (slink2.mode, slink2.outstanding_ios, slink2.outstanding_sectors) == ("S", 135, 1080)
    assert slink2.outstanding_age_s is not None and slink2.outstanding_age_s >= 0
    assert (slink2.policy_mode, slink2.policy_mode_reason) == (
        "enforced",
        "130 writes behind (limit 100)",
    )
    assert slink2.policy_mode_since is not None and slink2.policy_mode_since <= time.time()
    assert slink2.switches == ModeSwitches(enforced=1, released=0, dropped=0)
    # since cut 2: data 80 / 640, logs 5 / 40
    assert (vault.mode, vault.outstanding_ios, vault.outstanding_sectors) == ("A", 85, 680)
    assert (vault.policy_mode, vault.mode_reason) == ("normal", "")
    assert vault.switches == ModeSwitches(enforced=0, released=1, dropped=1)


def test_status_data_without_the_kernel_or_a_store(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    fresh = {s.site: s for s in replication_status(config, "db").sites}
    assert {(s.mode, s.outstanding_ios, s.policy_mode) for s in fresh.values()} == {
        ("A", None, "normal")
    }
    assert fresh["dr"].mode_reason == "mirror legs not read: no stack was looked at"
    store_with_history(config)
    unread = KernelView(counters={"db": {}}, legs_unread={"db": "the stack of data is not running"})
    known = {s.site: s for s in replication_status(config, "db", seen=unread).sites}
    assert known["dr"].mode_reason == "mirror legs not read: the stack of data is not running"
    assert (known["dr"].mode, known["dr"].outstanding_ios) == ("A", None)  # counters unknown
    assert known["slink2"].mode == "S"  # enforced, as the store says


def test_a_store_from_before_the_policy_tables_reads_as_normal(tmp_path: Path) -> None:
    config = loaded(tmp_path)
    store = StateStore(config.state_dir)
    store.record_cut("db", {"data": 2, "logs": 2}, 0.01)
    store.set_cursor("db", "slink2", 1)
    store.db.executescript("DROP TABLE site_modes; DROP TABLE cut_counters;")
    store.close()
    seen = KernelView(counters={"db": {"data": WriteCounters(1, 8), "logs": WriteCounters(1, 8)}})
    shown = {s.site: s for s in replication_status(config, "db", seen=seen).sites}
    assert (shown["slink2"].mode, shown["slink2"].outstanding_ios) == ("A", None)
    assert shown["slink2"].switches == ModeSwitches()


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's kernel part answers "no stacks up"; no command may run; the devices probe."""

    def refuse(self: executor.Runner, op: executor.Op, **_: object) -> executor.Result:
        raise AssertionError(f"status ran {op.render()}")

    monkeypatch.setattr(executor.Runner, "run", refuse)
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)
    monkeypatch.setattr(builder, "status", lambda *_args: [])
    monkeypatch.setattr(builder, "unprobed_devices", lambda _spec: [])


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="dmrepl status refuses non-root")


@needs_root
@pytest.mark.usefixtures("no_kernel")
def test_cli_replicator_format_on_a_fresh_host_creates_nothing(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    before = snapshot(tmp_path)
    code, out, err = run_cli_here("status", "--format", "replicator", "--config", str(config))
    assert code == 0, out + err
    assert snapshot(tmp_path) == before and not (tmp_path / "state").exists()
    assert out == f"db-replicator: 0 {LOG_SECTORS} replicator A,0,0 A,-,- A,-,- A,-,- " + (
        f"0/0/{LOG_SECTORS}\n"
    )
    assert err.splitlines() == [
        "note: db/data: its stack is not running (no replicator-dev line)",
        "note: db/logs: its stack is not running (no replicator-dev line)",
    ]


@needs_root
@pytest.mark.usefixtures("no_kernel")
def test_cli_status_shows_modes_and_switches(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    store_with_history(parse_config(config.read_text(), config))
    before = snapshot(tmp_path)
    code, out, err = run_cli_here("status", "--config", str(config))
    assert code == 0, out + err
    assert (
        "site db/slink2 (blockdev, asynchronous): behind; holds cut 1; lag 1 cuts, 2 eras, "
        "resync needed" in out
    )
    assert "; mode S (over its fall-behind limit: driven synchronously), outstanding unknown" in out
    assert "  enforced since " in out and ": 130 writes behind (limit 100)" in out
    assert "  mode switches: enforced 1, released 0, dropped 0" in out
    assert "site db/dr (blockdev, synchronous)" in out
    assert "mode A (mirror legs not read: the devices of data cannot be probed; " in out
    code, out, err = run_cli_here("status", "--format", "json", "--config", str(config))
    assert code == 0, out + err
    slink2 = json.loads(out)["sites"][1]
    assert (slink2["site"], slink2["mode"], slink2["policy_mode"]) == ("slink2", "S", "enforced")
    assert slink2["switches"] == {"enforced": 1, "released": 0, "dropped": 0}
    assert snapshot(tmp_path) == before


@needs_root
@pytest.mark.usefixtures("no_kernel")
def test_cli_replicator_format_with_running_stacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """dr's replicas are healthy legs, but the mirror of logs is resynchronising (a local
    leg catching up), so no joined leg can be trusted: dr is A with the writes since its cut;
    slink2 is enforced (S) and vault follows (A); one line per running device."""
    numbers = {"/dev/vdb": "254:16", "/dev/vdf": "254:80", "/dev/vdd": "254:48",
               "/dev/vdh": "254:112"}  # fmt: skip
    monkeypatch.setattr(probe, "dev_id_of", numbers.get)
    now = {"/dev/mapper/data": WriteCounters(230, 1840), "/dev/mapper/logs": WriteCounters(15, 120)}
    monkeypatch.setattr(probe, "write_counters", now.get)

    def mirror(origin: str, replica: str, in_sync: int) -> MirrorStatus:
        legs = (MirrorLeg(origin, Health.ALIVE), MirrorLeg(replica, Health.ALIVE))
        return MirrorStatus(legs, in_sync, 1024, MirrorLogStatus("core"))

    states = [
        device_state("data", mirror("254:16", "254:48", 1024)),
        device_state("logs", mirror("254:80", "254:112", 1000)),
    ]
    monkeypatch.setattr(builder, "status", lambda *_args: states)
    config = config_at(tmp_path)
    store_with_history(parse_config(config.read_text(), config))
    state_dir = os.stat(tmp_path / "state").st_dev
    log = f"{os.major(state_dir)}:{os.minor(state_dir)}"
    code, out, err = run_cli_here("status", "--format", "replicator", "--config", str(config))
    assert code == 0, out + err
    assert err == ""
    assert out.splitlines() == [
        f"db-replicator: 0 {LOG_SECTORS} replicator A,0,0 S,135,1080 A,135,1080 A,85,680 "
        f"355/2840/{LOG_SECTORS}",
        f"data: 0 2097152 replicator-dev {log} 0 A,- A,- A,1024/1024 A,-",
        f"logs: 0 2097152 replicator-dev {log} 1 A,- A,- A,1000+/1024 A,-",
    ]


@needs_root
def test_cli_json_and_another_format_are_refused(tmp_path: Path) -> None:
    config = config_at(tmp_path)
    code, _out, err = run_cli_here(
        "status", "--json", "--format", "replicator", "--config", str(config)
    )
    assert code == 10
    assert "give --json or --format replicator, not both" in err
    code, _out, err = run_cli_here("status", "--format", "yaml", "--config", str(config))
    assert code == 2 and "yaml" in err
