"""Planning `up` and `down`: pure functions from wanted and observed state to steps.

A plan is a list of `Step`s (an `Op` plus its undo), so `--dry-run` prints the
exact commands and tests compare plans without a kernel. The executor is
`dmrepl.builder.apply_plan`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from dmrepl import dm
from dmrepl.errors import DmreplError, ExitCode, ParseError
from dmrepl.ops import Op, command
from dmrepl.probe import MetadataHeader, MetadataKind
from dmrepl.sizing import METADATA_BLOCK_BYTES
from dmrepl.stack import Layer, LayerSpec, StackSpec
from dmrepl.tables import TableLine, Target, normalise_table, parse_table, table_devices

Resolver = Callable[[str], str | None]  # device path -> "MAJOR:MINOR" (None: no such node)


@dataclass(frozen=True)
class Step:
    """One command of a plan, its undo (if it creates something), and the node it creates."""

    what: str
    op: Op
    undo: Op | None = None
    creates: str | None = None  # dm name whose /dev/mapper node must appear


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...] = ()
    unchanged: tuple[str, ...] = ()  # dm devices already as configured
    notes: tuple[str, ...] = ()  # what was decided, e.g. reuse of existing metadata

    @property
    def empty(self) -> bool:
        return not self.steps


class StackMismatch(DmreplError):
    """Running devices differ from the configuration, or a name is taken; nothing was changed."""

    exit_code = ExitCode.STACK_MISMATCH

    def __init__(self, problems: list[str], hint: str):
        self.problems = problems
        super().__init__(
            f"refusing to change running devices: {len(problems)} problem(s); nothing was changed",
            context="\n".join(f"- {p}" for p in problems),
            hint=hint,
        )


def table_matches(layer: LayerSpec, running_table: str, resolve: Resolver) -> bool:
    """Whether a running table is the layer's wanted table (devices compared by number)."""
    return any(
        _target_matches(layer, target, running_table, resolve)
        for target in (layer.target, *layer.accepted)
    )


def _target_matches(
    layer: LayerSpec, target: Target, running_table: str, resolve: Resolver
) -> bool:
    wanted = (TableLine(0, layer.length, target),)
    ids = {path: resolve(path) for path in table_devices(wanted)}
    known = {path: dev for path, dev in ids.items() if dev is not None}
    if len(known) != len(ids):
        return False  # a device it should sit on does not exist
    try:
        return normalise_table(wanted, known) == parse_table(running_table)
    except ParseError:
        return False


def wanted_text(layer: LayerSpec, resolve: Resolver) -> str:
    """The wanted table with devices as numbers where they exist (for showing differences)."""
    return " ".join((resolve(w) or w) if w.startswith("/dev/") else w for w in layer.table.split())


def zero_superblock(meta_path: str) -> Op:
    """Zero the first metadata block so dm-era formats fresh metadata on load."""
    return command(
        "dd", "if=/dev/zero", f"of={meta_path}", f"bs={METADATA_BLOCK_BYTES}", "count=1",
        "oflag=direct", "conv=notrunc", "status=none",
    )  # fmt: skip


@dataclass
class _Builder:
    steps: list[Step] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def plan(self) -> Plan:
        return Plan(tuple(self.steps), tuple(self.unchanged), tuple(self.notes))


def plan_up(
    stacks: Iterable[StackSpec],
    observed: Mapping[str, dm.ObservedDevice],
    names: Mapping[str, str],
    headers: Mapping[str, MetadataHeader],
    *,
    resolve: Resolver,
    fresh: bool = False,
) -> Plan:
    """Steps that make every stack run as configured; refuses to alter what differs.

    `observed`: dmrepl's running devices; `names`: UUID of every dm device by name;
    `headers`: the metadata superblock of each device (by device name).
    """
    out = _Builder()
    for stack in stacks:
        _plan_stack_up(stack, observed, names, headers[stack.device.name], resolve, fresh, out)
    if out.problems:
        raise StackMismatch(
            out.problems,
            hint="`dmrepl down` the stack first if the configuration changed on purpose",
        )
    return out.plan()


def _plan_stack_up(
    stack: StackSpec,
    observed: Mapping[str, dm.ObservedDevice],
    names: Mapping[str, str],
    header: MetadataHeader,
    resolve: Resolver,
    fresh: bool,
    out: _Builder,
) -> None:
    era_running = stack.require(Layer.ERA).name in observed
    format_metadata = _metadata_decision(stack, header, era_running, fresh, out)
    for layer in stack.layers:
        running = observed.get(layer.name)
        if running is None and layer.name in names:
            out.problems.append(
                f"{layer.name}: a dm device with this name exists and is not dmrepl's "
                f"(UUID {names[layer.name] or 'none'})"
            )
            continue
        if running is not None and running.uuid != layer.uuid:
            out.problems.append(
                f"{layer.name}: running with UUID {running.uuid}, expected {layer.uuid}"
            )
            continue
        if running is not None and not running.table:
            # A create killed between creating the device and loading its table.
            out.notes.append(f"{layer.name}: had no table (interrupted create); recreating")
            out.steps.append(Step(f"remove empty {layer.name}", dm.remove(layer.name)))
            running = None
        if running is None:
            out.steps.append(
                Step(
                    f"create {layer.name}: {layer.table.strip()}",
                    dm.create(layer.name, layer.table, layer.uuid),
                    undo=dm.remove(layer.name),
                    creates=layer.name,
                )
            )
            if layer.layer is Layer.META and format_metadata:
                out.steps.append(
                    Step(
                        f"zero the metadata superblock on {layer.path}", zero_superblock(layer.path)
                    )
                )
            continue
        if not table_matches(layer, running.table, resolve):
            out.problems.append(
                f"{layer.name} differs from the configuration:\n"
                f"    running: {running.table}\n    wanted:  {wanted_text(layer, resolve)}"
            )
        elif running.suspended:
            out.notes.append(f"{layer.name}: was left suspended (interrupted run); resuming")
            out.steps.append(Step(f"resume {layer.name}", dm.resume(layer.name)))
        else:
            out.unchanged.append(layer.name)


def _metadata_decision(
    stack: StackSpec, header: MetadataHeader, era_running: bool, fresh: bool, out: _Builder
) -> bool:
    """Whether to zero the metadata superblock; notes reuse or refuses unsafe cases."""
    device = stack.device
    where = f"{device.key}: metadata on {device.metadata} at sector {device.metadata_offset}"
    era_blocks = -(-stack.origin_sectors // device.block_sectors)
    if era_running:
        if fresh:
            out.problems.append(
                f"{device.key}: --fresh cannot reformat metadata of a running stack"
            )
        return False
    if fresh:
        out.notes.append(
            f"{device.name}: --fresh: formatting new metadata (change tracking restarts)"
        )
        return True
    if header.kind is MetadataKind.EMPTY:
        out.notes.append(f"{device.name}: new metadata (dm-era formats it)")
        return False
    if header.kind is MetadataKind.FOREIGN:
        out.problems.append(
            f"{where} holds data that is not dm-era metadata; refusing to overwrite it "
            "(use --fresh to format it, destroying what is there)"
        )
        return False
    if (header.block_sectors, header.era_blocks) != (device.block_sectors, era_blocks):
        out.problems.append(
            f"{where} was made for {header.era_blocks} era blocks of {header.block_sectors} "
            f"sectors, but the configuration gives {era_blocks} blocks of {device.block_sectors} "
            "(use --fresh to start tracking anew)"
        )
        return False
    held = ", a metadata snapshot is held" if header.snapshot_held else ""
    out.notes.append(f"{device.name}: reusing existing metadata (era {header.current_era}{held})")
    return False


def plan_down(
    stacks: Iterable[StackSpec], observed: Mapping[str, dm.ObservedDevice], *, force: bool = False
) -> Plan:
    """Steps that remove every layer of the stacks, top down.

    An open gate (mounted or in use) is refused; with `force`, every layer is
    removed with `--deferred`, so the kernel removes them once the gate is closed
    and nothing in flight is failed.
    """
    out = _Builder()
    for stack in stacks:
        gate = observed.get(stack.require(Layer.GATE).name)
        deferred = False
        if gate is not None and gate.open_count > 0:
            if not force:
                out.problems.append(
                    f"{gate.name}: /dev/mapper/{gate.name} is open ({gate.open_count} opener(s): "
                    "mounted or in use)"
                )
                continue
            deferred = True
            out.notes.append(f"{gate.name} is open: removal deferred until it is closed")
        present = [layer for layer in stack.layers if layer.name in observed]
        for layer in present:
            if observed[layer.name].uuid != layer.uuid:
                out.problems.append(f"{layer.name}: not this stack's device; leaving it alone")
        for layer in reversed(present):
            running = observed[layer.name]
            if running.uuid != layer.uuid:
                continue
            if running.suspended and not deferred:
                out.steps.append(
                    Step(f"resume {layer.name} (left suspended)", dm.resume(layer.name))
                )
            op = dm.remove_deferred(layer.name) if deferred else dm.remove(layer.name)
            out.steps.append(Step(f"remove {layer.name}", op))
        if not present:
            out.notes.append(f"{stack.device.name}: not running")
    if out.problems:
        raise StackMismatch(out.problems, hint="unmount or close it first, or use --force")
    return out.plan()
