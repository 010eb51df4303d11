"""Stacks up and down: probe, check, plan, then apply with undo. The library API of the CLI.

`apply_plan` is the executor of plans: it runs each step, registers its undo as
soon as the step succeeded, and unwinds in reverse on any failure or on
SIGINT/SIGTERM/SIGHUP (deferred to the next step boundary, so a dmsetup command
is never cut in half and no device is created behind our back).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from dmrepl import dm, era, probe
from dmrepl.config import Config, DeviceSpec, GroupSpec
from dmrepl.cut import recover, recover_cows
from dmrepl.executor import Runner
from dmrepl.lock import group_lock
from dmrepl.plan import Plan, plan_down, plan_up, table_matches
from dmrepl.probe import BlockDevice, DeviceMissing, DeviceProblem, MetadataHeader, MetadataKind
from dmrepl.replication.synchronous import mirror_status
from dmrepl.safety import DeviceFacts, check_all, metadata_area_sectors
from dmrepl.signals import Say, deferred_signals
from dmrepl.stack import Layer, StackSpec, parse_layer_uuid, plan_stack
from dmrepl.state import StateStore
from dmrepl.status import EraStatus, MirrorStatus
from dmrepl.udev import NodeWaiter


def apply_plan(runner: Runner, plan: Plan, say: Say) -> None:
    """Run every step; on failure or signal undo the completed ones in reverse."""
    with deferred_signals() as latch, NodeWaiter() as nodes, ExitStack() as undo:
        for step in plan.steps:
            latch.check()
            say(step.what)
            runner.run(step.op)
            if step.undo is not None:
                undo.callback(runner.run_best_effort, step.undo)
            if step.creates is not None:
                nodes.wait(step.creates)
        latch.check()
        undo.pop_all()  # success: keep everything


@dataclass(frozen=True)
class Survey:
    """Everything probed about the configured stacks, before planning."""

    stacks: tuple[StackSpec, ...]
    facts: tuple[DeviceFacts, ...]
    observed: dict[str, dm.ObservedDevice]
    names: dict[str, str]


def survey(runner: Runner, groups: list[GroupSpec], *, check: bool = True) -> Survey:
    """Probe devices and running stacks; with `check`, run the safety checks (raise if unsafe)."""
    seen = dm.observe(runner)
    observed, names = seen.owned, seen.names
    facts = [_device_facts(device, observed) for group in groups for device in group.devices]
    if check:
        check_all(facts)
    stacks = tuple(
        plan_stack(f.spec, f.origin.size_sectors, metadata_area_sectors(f.spec, f))
        for f in facts
        if f.origin is not None and f.metadata is not None
    )
    return Survey(stacks, tuple(facts), observed, names)


def unprobed_devices(spec: GroupSpec) -> list[str]:
    """Why each origin or metadata path of `spec` that is not a block device cannot be used.

    Reads only stat and sysfs: no command runs, nothing is written.
    """
    problems = []
    for device in spec.devices:
        for path, role in ((device.origin, "origin"), (device.metadata, "metadata device")):
            try:
                probe.probe_block_device(path, role=role)
            except DeviceProblem as exc:
                problems.append(f"{device.key}: {exc.message}")
    return problems


def require_devices(spec: GroupSpec, doing: str, config_path: Path) -> None:
    """Refuse (exit 11) unless every device of the group probes; nothing is touched.

    A group is replicated whole or not at all: a cut without one of its devices
    would mark the sites up to date while that device's replicas go stale.
    """
    problems = unprobed_devices(spec)
    if problems:
        raise _missing(spec, doing, config_path, problems)


def require_surveyed(spec: GroupSpec, found: Survey, doing: str, config_path: Path) -> None:
    """Refuse (exit 11) if the survey could not build a stack for every device of `spec`."""
    built = {stack.device.name for stack in found.stacks}
    problems = [
        text
        for facts in found.facts
        if facts.spec.group == spec.name and facts.spec.name not in built
        for text in facts.missing or (f"{facts.spec.key}: cannot be probed",)
    ]
    if problems:
        raise _missing(spec, doing, config_path, problems)


def _missing(spec: GroupSpec, doing: str, config_path: Path, problems: list[str]) -> DeviceMissing:
    count = len(problems)
    return devices_missing(
        f"refusing to {doing} group {spec.name}: {count} configured device path"
        f"{'s' if count != 1 else ''} cannot be used; nothing was changed",
        problems,
        config_path,
        then="then run again; a group is replicated whole, never without one of its devices",
    )


def devices_missing(
    summary: str, problems: list[str], config_path: Path, *, then: str = ""
) -> DeviceMissing:
    """Exit 11 for configured device paths that cannot be used, one line each."""
    return DeviceMissing(
        summary,
        context="\n".join(f"- {text}" for text in problems),
        hint=f"fix the path in {config_path} (a renamed /dev/disk/by-id link?) or reattach the "
        "disk" + (f", {then}" if then else ""),
    )


def _device_facts(device: DeviceSpec, observed: dict[str, dm.ObservedDevice]) -> DeviceFacts:
    missing: list[str] = []

    def get(path: str | None, role: str) -> BlockDevice | None:
        if path is None:
            return None
        try:
            return probe.probe_block_device(path, role=role)
        except DeviceProblem as exc:
            missing.append(f"{device.key}: {exc.message}")
            return None

    legs = tuple(get(leg, "mirror leg") for leg in (device.mirror.legs if device.mirror else ()))
    log_device = get(device.mirror.log_device if device.mirror else None, "mirror log device")
    own = frozenset(
        running.kernel_name
        for running in observed.values()
        if (parsed := parse_layer_uuid(running.uuid)) and parsed[1:] == (device.group, device.name)
    )
    return DeviceFacts(
        spec=device,
        origin=get(device.origin, "origin"),
        metadata=get(device.metadata, "metadata device"),
        legs=legs,
        log_device=log_device,
        missing=tuple(missing),
        own_holders=own,
    )


def read_headers(
    stacks: tuple[StackSpec, ...], observed: Mapping[str, dm.ObservedDevice]
) -> dict[str, MetadataHeader]:
    """Metadata superblocks of stacks whose era layer is not running (others are not read)."""
    headers = {}
    for stack in stacks:
        device = stack.device
        if stack.require(Layer.ERA).name in observed:
            headers[device.name] = MetadataHeader(MetadataKind.ERA)
        else:
            headers[device.name] = probe.read_metadata_header(
                device.metadata, device.metadata_offset
            )
    return headers


def up(
    runner: Runner,
    config: Config,
    group: str | None,
    *,
    fresh: bool = False,
    dry_run: bool = False,
    say: Say = print,
) -> Plan:
    """Build every configured stack of `group` (all groups when None)."""
    found = survey(runner, config.select(group))
    plan = plan_up(
        found.stacks,
        found.observed,
        found.names,
        read_headers(found.stacks, found.observed),
        resolve=probe.dev_id_of,
        fresh=fresh,
    )
    if dry_run or plan.empty:
        return plan
    apply_plan(runner, plan, say)
    store = StateStore(config.state_dir)
    try:
        for stack in found.stacks:
            notes = [n for n in plan.notes if n.startswith(f"{stack.device.name}:")]
            for note in notes:
                store.record(stack.device.group, stack.device.name, "metadata", note)
            store.record(stack.device.group, stack.device.name, "up", "stack built")
    finally:
        store.close()
    return plan


def down(
    runner: Runner,
    config: Config,
    group: str | None,
    *,
    force: bool = False,
    dry_run: bool = False,
    say: Say = print,
) -> Plan:
    """Remove every layer of the configured stacks of `group`, top down.

    Under each group's lock (as `sync` takes it): recovery resumes gates and removes `-pit`
    images, which must never happen under a cut a running `sync` holds.
    """
    groups = config.select(group)
    with ExitStack() as locks:
        if not dry_run:
            for spec in groups:
                locks.enter_context(group_lock(config.state_dir, spec.name, "down"))
        found = survey(runner, groups, check=False)
        stacks = found.stacks or tuple(_stacks_without_probe(groups))
        plan = plan_down(stacks, found.observed, force=force)
        if dry_run or plan.empty:
            return plan
        if recover(runner, stacks, found.observed, say):
            # What a killed cut left (a stale -pit holds the origin) is gone; plan afresh.
            plan = plan_down(stacks, dm.observe(runner).owned, force=force)
        recover_cows(runner, stacks, config.state_dir, say)
        apply_plan(runner, plan, say)
        return plan


def _stacks_without_probe(groups: list[GroupSpec]) -> Iterator[StackSpec]:
    """Layer names for `down` when the origin is gone (sizes do not matter for removal)."""
    for group in groups:
        for device in group.devices:
            yield plan_stack(device, 1, 1)


@dataclass(frozen=True)
class LayerState:
    layer: str
    name: str
    present: bool
    suspended: bool
    open_count: int
    matches: bool | None  # table equals the configured one (None: not present)


@dataclass(frozen=True)
class DeviceState:
    group: str
    device: str
    gate: str
    origin_sectors: int
    metadata_sectors: int
    block_sectors: int
    layers: tuple[LayerState, ...]
    era: EraStatus | None
    mirror: MirrorStatus | None
    warnings: tuple[str, ...]

    @property
    def running(self) -> bool:
        return all(layer.present for layer in self.layers)


METADATA_WARN_FRACTION = 0.75


def status(runner: Runner, config: Config, group: str | None) -> list[DeviceState]:
    """Observed state of every configured stack (read-only)."""
    found = survey(runner, config.select(group), check=False)
    states = []
    for stack in found.stacks:
        layers = []
        for layer in stack.layers:
            running = found.observed.get(layer.name)
            matches = None
            if running is not None:
                matches = table_matches(layer, running.table, probe.dev_id_of)
            layers.append(
                LayerState(
                    layer.layer.value,
                    layer.name,
                    running is not None,
                    bool(running and running.suspended),
                    running.open_count if running else 0,
                    matches,
                )
            )
        era_state, warnings = _era_state(runner, stack, found.observed)
        mirror_state = _mirror_state(runner, stack, found.observed)
        if mirror_state is not None:
            warnings += [
                f"{stack.device.name}: mirror leg {leg.device} has failed ({leg.health.name})"
                for leg in mirror_state.failed_legs
            ]
        states.append(
            DeviceState(
                group=stack.device.group,
                device=stack.device.name,
                gate=stack.require(Layer.GATE).path,
                origin_sectors=stack.origin_sectors,
                metadata_sectors=stack.metadata_sectors,
                block_sectors=stack.device.block_sectors,
                layers=tuple(layers),
                era=era_state,
                mirror=mirror_state,
                warnings=tuple(warnings),
            )
        )
    return states


def metadata_warnings(era_name: str, state: EraStatus) -> list[str]:
    """Warnings about an era device's metadata: nearly full (no kernel event warns of it), or
    a metadata snapshot held (by a cut in progress, or left by a killed run)."""
    warnings = []
    used = state.metadata_used_blocks / max(state.metadata_total_blocks, 1)
    if used >= METADATA_WARN_FRACTION:
        warnings.append(
            f"{era_name}: metadata {used:.0%} used ({state.metadata_used_blocks}/"
            f"{state.metadata_total_blocks} blocks); dm-era fails writes when it is full"
        )
    if state.snapshot_held:
        warnings.append(f"{era_name}: a metadata snapshot is held (root {state.held_root})")
    return warnings


def _mirror_state(
    runner: Runner, stack: StackSpec, observed: Mapping[str, dm.ObservedDevice]
) -> MirrorStatus | None:
    """The mirror layer's status; None when it is absent, suspended, or runs as a linear
    pass-through (a synchronous site's mirror layer before any replica has joined it)."""
    mirror = stack.get(Layer.MIRROR)
    if mirror is None or mirror.name not in observed or observed[mirror.name].suspended:
        return None
    return mirror_status(runner, mirror.name)


def _era_state(
    runner: Runner, stack: StackSpec, observed: Mapping[str, dm.ObservedDevice]
) -> tuple[EraStatus | None, list[str]]:
    name = stack.require(Layer.ERA).name
    running = observed.get(name)
    if running is None:
        return None, []
    if running.suspended:
        # Never ask a suspended era device for its status: the ioctl blocks until resume.
        return None, [f"{name} is suspended (an interrupted cut?); run `dmrepl up` to resume it"]
    state = era.read_status(runner, name)
    warnings = metadata_warnings(name, state)
    return state, warnings
