"""The replicator's policies without a kernel: limits, backlogs, the mirror layer's forms,
the spool kept for a draining site, holding writers, and the run loop's wake-up."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

from dmrepl import probe
from dmrepl.cut import cut_steps
from dmrepl.errors import Interrupted
from dmrepl.executor import CommandFailed, Runner
from dmrepl.ops import Op, Result
from dmrepl.plan import table_matches
from dmrepl.policy import Backlog, FallBehind, WriteCounters, backlog
from dmrepl.replication import backlog as site_backlogs
from dmrepl.replication.hold import writers_held
from dmrepl.replication.loop import run_cycles
from dmrepl.replication.plan import Observed, SiteView, finalize, plan_cycle
from dmrepl.replication.synchronous import join
from dmrepl.stack import Layer, StackSpec, mirror_target, plan_stack
from dmrepl.state import SiteMode, StateStore
from dmrepl.tables import Linear, Mirror, TableLine, render_table
from tests.unit.factories import device_spec
from tests.unit.test_plan_cycle import spooled

# --- limits and backlogs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "behind", "over"),
    [
        (FallBehind(ios=10), Backlog(10, 80, 5.0), False),  # at the limit is within it
        (FallBehind(ios=10), Backlog(11, 88, 5.0), True),
        (FallBehind(bytes=4096), Backlog(1, 8, 1.0), False),
        (FallBehind(bytes=4096), Backlog(1, 9, 1.0), True),
        (FallBehind(seconds=30), Backlog(1, 8, 30.0), False),
        (FallBehind(seconds=30), Backlog(1, 8, 30.5), True),
        (FallBehind(), Backlog(10**9, 10**9, 10**9), False),  # no limits: never over
    ],
)
def test_a_site_is_over_its_limit_only_past_it(
    limits: FallBehind, behind: Backlog, over: bool
) -> None:
    assert (limits.exceeded(behind) is not None) is over


def test_a_backlog_has_no_age_until_something_is_written() -> None:
    assert backlog(WriteCounters(5, 40), WriteCounters(5, 40), 99.0) == Backlog(0, 0, 0.0)
    assert backlog(WriteCounters(7, 56), WriteCounters(5, 40), 99.0) == Backlog(2, 16, 99.0)


def test_a_counter_that_went_backwards_counts_from_zero() -> None:
    """The gate was rebuilt (its counters restarted): what it counts now is all after."""
    assert WriteCounters(3, 24).since(WriteCounters(100, 800)) == WriteCounters(3, 24)


def test_backlogs_from_the_store(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.record_cut("g", {"a": 1, "b": 1}, 0.01, counters={
        "a": WriteCounters(10, 80), "b": WriteCounters(0, 0)})  # fmt: skip
    now = {"a": WriteCounters(12, 96), "b": WriteCounters(3, 24)}
    behind = site_backlogs.site_backlog(store, "g", 1, now)
    assert behind is not None and (behind.ios, behind.sectors) == (5, 40)
    assert site_backlogs.site_backlog(store, "g", None, now) is None  # never seeded
    assert site_backlogs.site_backlog(store, "g", 1, {"a": now["a"]}) is None  # a gate unread
    store.record_cut("g", {"a": 2, "b": 2}, 0.01)  # a cut from before counters were kept
    assert site_backlogs.site_backlog(store, "g", 2, now) is None


def test_the_next_delta_is_bounded_by_what_was_written_plus_two_blocks_a_write() -> None:
    at_cut = {"a": WriteCounters(0, 0)}
    now = {"a": WriteCounters(3, 24)}  # three 4 KiB writes
    assert site_backlogs.next_delta_bound(now, at_cut, {"a": 65536}) == 3 * 4096 + 6 * 65536
    assert site_backlogs.next_delta_bound(now, {}, {"a": 65536}) is None
    spool = spooled((2, 1), (3, 2), size=100)
    assert site_backlogs.pending_bytes(spool, 2) == 100
    assert site_backlogs.pending_bytes(spool, None) == 0


def test_mode_switches_are_recorded_and_counted(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.site_mode("g", "dr").mode is SiteMode.NORMAL
    store.switch_mode("g", "dr", SiteMode.ENFORCED, "41 writes behind (limit 40)")
    store.switch_mode("g", "dr", SiteMode.NORMAL, "within its limits")
    store.switch_mode("g", "dr", SiteMode.ENFORCED, "again")
    store.switch_mode("g", "dr", SiteMode.DROPPED, "stall_limit passed")
    mode = store.site_mode("g", "dr")
    assert (mode.mode, mode.reason) == (SiteMode.DROPPED, "stall_limit passed")
    assert (mode.enforced, mode.released, mode.dropped) == (2, 1, 1)


# --- the mirror layer ---------------------------------------------------------------------


def test_the_mirror_layer_is_a_pass_through_until_a_synchronous_replica_joins() -> None:
    device = device_spec(sync_replicas=("/dev/nbd0",))
    assert mirror_target(device, ()) == Linear("/dev/vdb", 0)
    joined = mirror_target(device, ("/dev/nbd0",))
    assert isinstance(joined, Mirror)
    assert joined.legs == (("/dev/vdb", 0), ("/dev/nbd0", 0))
    assert joined.sync == "nosync"  # the replica was made equal with writers held: no copy


def test_a_stack_with_a_joined_replica_is_still_as_configured() -> None:
    device = device_spec(sync_replicas=("/dev/nbd0", "/dev/nbd1"))
    stack = plan_stack(device, 2097152, 8192)
    mirror = stack.require(Layer.MIRROR)
    assert stack.require(Layer.ORIGIN).target.device == mirror.path  # type: ignore[attr-defined]
    ids = {"/dev/vdb": "254:1", "/dev/nbd0": "43:0", "/dev/nbd1": "43:32"}
    running = "0 2097152 mirror core 2 1024 nosync 2 254:1 0 43:32 0"
    assert table_matches(mirror, running, ids.get)
    assert table_matches(mirror, "0 2097152 linear 254:1 0", ids.get)
    assert not table_matches(mirror, "0 2097152 mirror core 2 1024 nosync 2 254:1 0 7:0 0", ids.get)


# --- the spool while a site drains --------------------------------------------------------


def test_a_draining_stall_site_keeps_what_it_needs_past_the_cap() -> None:
    spool = spooled((2, 1), (3, 2), size=900)
    observed = Observed((SiteView("st", True, 1),), spool, cap_bytes=2000)
    plan = plan_cycle(observed)
    evicting = finalize(plan, observed, 900)
    assert [f.seq for f in evicting.evict] == [2] and evicting.resyncs == {"st": 1}
    kept = finalize(plan, observed, 900, protected=frozenset({"st"}))
    assert (kept.evict, kept.resyncs, kept.chain_delta) == ((), {}, True)
    huge = finalize(plan, observed, 5000, protected=frozenset({"st"}))
    assert (huge.over_cap, huge.chain_delta, huge.resyncs) == (False, True, {})


def test_a_cut_under_held_writers_leaves_the_gates_alone() -> None:
    stack = plan_stack(device_spec(), 2097152, 8192)
    steps = cut_steps((stack,), {"d": "/dev/loop1"}, gates_held=True)
    held = [step.op.argv for step in steps if step.stalls]
    gate = stack.require(Layer.GATE).name
    assert not [step for step in steps if step.op.argv[2:3] == (gate,)]
    assert held[0][:3] == ("dmsetup", "message", stack.require(Layer.ERA).name)


# --- holding writers ----------------------------------------------------------------------


class RecordingRunner(Runner):
    ioctls = False  # every op, ioctl or not, is recorded by `run`

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, ...]] = []
        self.lock = threading.Lock()

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        with self.lock:
            self.ops.append(op.argv)
        return Result(op.argv, 0, "", "", 0.0)


class MirrorRunner(RecordingRunner):
    """Answers `dmsetup status` of a mirror layer with `status` (a mirror's status params)."""

    def __init__(self, status: str) -> None:
        super().__init__()
        self.status = status
        self.loaded: list[str] = []  # the tables `dmsetup load` was given

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        result = super().run(op, ok_codes=ok_codes)
        if op.argv[:2] == ("dmsetup", "load"):
            self.loaded.append(str(op.stdin))
        if op.argv[:2] == ("dmsetup", "status"):
            return Result(op.argv, 0, f"0 2097152 {self.status}\n", "", 0.0)
        return result


def test_a_join_keeps_the_legs_the_mirror_has_and_adds_the_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    device = device_spec(sync_replicas=("/dev/nbd0", "/dev/nbd1"))
    stack = plan_stack(device, 2097152, 8192)
    ids = {"/dev/vdb": "254:1", "/dev/nbd0": "43:0", "/dev/nbd1": "43:32"}
    monkeypatch.setattr(probe, "dev_id_of", ids.get)
    observed = {stack.require(Layer.MIRROR).name: None}
    runner = MirrorRunner("mirror 2 254:1 43:32 1024/1024 1 AA 1 core")  # nbd1 joined
    assert join(runner, (stack,), observed, {"/dev/nbd0"}) is None  # type: ignore[arg-type]
    both = mirror_target(device, ("/dev/nbd0", "/dev/nbd1"))  # in configured order
    assert runner.loaded == [render_table([TableLine(0, 2097152, both)])]
    assert ("dmsetup", "load", "d-mirror") in runner.ops
    failed = MirrorRunner("mirror 2 254:1 43:32 1000/1024 1 AD 1 core")
    why = join(failed, (stack,), observed, {"/dev/nbd0"})  # type: ignore[arg-type]
    assert why is not None and "leg 43:32 write failed" in why
    assert failed.loaded == []


def two_gates() -> tuple[StackSpec, ...]:
    return tuple(
        plan_stack(device_spec(name=n, origin=f"/dev/{o}"), 2097152, 8192)
        for n, o in (("a", "vdb"), ("b", "vdd"))
    )


def test_writers_are_held_until_released_and_resumed_once() -> None:
    runner = RecordingRunner()
    with writers_held(runner, two_gates(), 60, lambda _: None) as hold:
        assert runner.ops == [("dmsetup", "suspend", "a"), ("dmsetup", "suspend", "b")]
        assert hold.release() and not hold.release()
    assert runner.ops[2:] == [("dmsetup", "resume", "b"), ("dmsetup", "resume", "a")]
    assert not hold.expired


def test_the_bound_releases_writers_but_never_in_the_middle_of_a_held_step() -> None:
    runner = RecordingRunner()
    said: list[str] = []
    with writers_held(runner, two_gates(), 0.2, said.append) as hold:
        with hold.while_held() as held:
            assert held
            time.sleep(0.4)  # past the bound: the timer waits for this step
            assert ("dmsetup", "resume", "a") not in runner.ops
        deadline = time.monotonic() + 5
        while hold.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert hold.expired and not hold.active
        with hold.while_held() as held:
            assert not held
    assert runner.ops.count(("dmsetup", "resume", "a")) == 1
    assert said == ["writers were held for the configured bound (0.2 s): resumed them"]


def test_a_signal_releases_held_writers_and_stops_the_cycle() -> None:
    runner = RecordingRunner()
    held = writers_held(runner, two_gates(), 60, lambda _: None)
    with pytest.raises(Interrupted, match="SIGTERM"), held as hold:
        signal.raise_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while hold.active and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ("dmsetup", "resume", "a") in runner.ops
        hold.check()


# --- the run loop -------------------------------------------------------------------------


def test_the_run_loop_starts_a_cycle_at_once_when_a_site_is_over_its_limit() -> None:
    stop = threading.Event()
    started: list[float] = []
    looks: list[float] = []

    def cycle() -> int:
        started.append(time.monotonic())
        if len(started) == 3:
            stop.set()
        return 0

    def due() -> bool:
        looks.append(time.monotonic())
        return len(looks) % 2 == 0  # over the limit at every second look

    began = time.monotonic()
    run_cycles(cycle, 3600, on_error=None, stop=stop, due=due, poll_s=0.01)
    assert len(started) == 3 and time.monotonic() - began < 5


class SignalOnSecondSuspend(RecordingRunner):
    """A SIGTERM arrives while the second gate is being suspended."""

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        result = super().run(op, ok_codes=ok_codes)
        if op.argv[:3] == ("dmsetup", "suspend", "b"):
            signal.raise_signal(signal.SIGTERM)
        return result


def test_a_signal_while_gates_are_suspended_releases_every_one_of_them_after() -> None:
    runner = SignalOnSecondSuspend()
    with pytest.raises(Interrupted), writers_held(runner, two_gates(), 60, lambda _: None):
        pytest.fail("the cycle must not run on")  # check() raises before the body
    assert runner.ops == [
        ("dmsetup", "suspend", "a"),
        ("dmsetup", "suspend", "b"),
        ("dmsetup", "resume", "b"),
        ("dmsetup", "resume", "a"),
    ]


def test_a_failed_suspend_resumes_only_the_gates_it_suspended() -> None:
    class FailOnB(RecordingRunner):
        def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
            if op.argv[:3] == ("dmsetup", "suspend", "b"):
                raise CommandFailed(op.argv, 1, "", "busy")
            return super().run(op, ok_codes=ok_codes)

    runner = FailOnB()
    with pytest.raises(CommandFailed), writers_held(runner, two_gates(), 60, lambda _: None):
        pytest.fail("not reached")
    assert runner.ops == [("dmsetup", "suspend", "a"), ("dmsetup", "resume", "a")]
