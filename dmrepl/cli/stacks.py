"""Commands on the device stacks: demo, up, down, check-config, status, changes, size.

Registered on the app by `dmrepl.cli`, in the order `dmrepl --help` lists them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from dmrepl import builder, loop, replica, replicator_table, vm
from dmrepl import changes as changes_api
from dmrepl.cli.app import (
    ConfigOption,
    DryRunOption,
    GroupArg,
    JsonOption,
    config_for_kernel,
    require_device_mapper,
    require_root,
)
from dmrepl.cli.render import (
    changes_json,
    device_state_json,
    err,
    out,
    print_plan,
    render_demo,
    render_device_state,
    render_received,
    render_site_status,
    say,
)
from dmrepl.config import DEFAULT_PATH, NAME_RE, Config, load_config
from dmrepl.demo import load_modules, run_demo
from dmrepl.errors import InvalidInput, NoDeviceMapper
from dmrepl.executor import Runner
from dmrepl.probe import DeviceMissing, DeviceProblem, probe_block_device
from dmrepl.replication.kernelview import observe_kernel
from dmrepl.replication.status import ReplicationStatus, SiteStatus, replication_status
from dmrepl.replicator_status import render_replicator_status, replicator_status
from dmrepl.roles import require_primary
from dmrepl.sizing import metadata_size
from dmrepl.units import format_bytes, format_sectors, parse_size_sectors, sectors_to_bytes


def demo(
    no_vm: Annotated[
        bool,
        typer.Option("--no-vm", help="Fail instead of booting a VM when this kernel lacks dm."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Replicate a filesystem on loop devices to a local site over a few cycles; compare."""
    require_root()
    if not loop.kernel_has_device_mapper():
        if no_vm:
            raise NoDeviceMapper(
                "this kernel has no device-mapper",
                hint="drop --no-vm to run the demo in a VM booting Debian's kernel",
            )
        err.print(
            "This kernel has no device-mapper: running the demo in a guest kernel "
            f"({vm.describe()})."
        )
        inner = [sys.executable, "-m", "dmrepl", "demo", "--no-vm"] + (
            ["--json"] if as_json else []
        )
        raise typer.Exit(vm.run_in_vm(shlex.join(inner)))
    runner = Runner()
    runner.run_best_effort(load_modules())
    result = run_demo(runner, say=(lambda _: None) if as_json else err.print)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        render_demo(result)


def up(
    group: GroupArg = None,
    config: ConfigOption = DEFAULT_PATH,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Format new era metadata (tracking restarts).")
    ] = False,
    dry_run: DryRunOption = False,
) -> None:
    """Build the device stacks of GROUP (or all groups); rebuild them after a reboot."""
    require_root()
    loaded = config_for_kernel(config, group)
    for spec in loaded.select(group):
        require_primary(loaded, spec.name, "bring its stack up")
    plan = builder.up(Runner(), loaded, group, fresh=fresh, dry_run=dry_run, say=say)
    print_plan(plan, dry_run)


def down(
    group: GroupArg = None,
    config: ConfigOption = DEFAULT_PATH,
    force: Annotated[
        bool,
        typer.Option("--force", help="If a gate is open, remove the stack once it is closed."),
    ] = False,
    dry_run: DryRunOption = False,
) -> None:
    """Remove the device stacks of GROUP (or all groups). Data on the origins is untouched."""
    require_root()
    loaded = config_for_kernel(config, group)
    plan = builder.down(Runner(), loaded, group, force=force, dry_run=dry_run, say=say)
    print_plan(plan, dry_run)


def check_config(config: ConfigOption = DEFAULT_PATH) -> None:
    """Validate the configuration file (and, as root, the devices it names)."""
    loaded = load_config(config)
    count = sum(len(g.devices) for g in loaded.groups.values())
    if os.geteuid() == 0:
        require_device_mapper()
        builder.survey(Runner(), loaded.select(None), check=True)
        out.print(f"{config}: {len(loaded.groups)} group(s), {count} device(s), devices checked")
    else:
        out.print(
            f"{config}: {len(loaded.groups)} group(s), {count} device(s); run as root "
            "to check the devices too"
        )


class StatusFormat(StrEnum):
    """`status --format`: text, JSON (as `--json`), or dm-replicator's status lines."""

    TEXT = "text"
    JSON = "json"
    REPLICATOR = "replicator"


def show_status(
    group: GroupArg = None,
    config: ConfigOption = DEFAULT_PATH,
    as_json: JsonOption = False,
    output: Annotated[
        StatusFormat | None,
        typer.Option(
            "--format",
            help="text, json (as --json) or replicator (dm-replicator's status lines).",
        ),
    ] = None,
) -> None:
    """Show each stack (layers, sizes, current era, metadata use, held snapshot, mirror legs)
    and each site (cut held, lag, policy, mode S/A, outstanding writes)."""
    if as_json and output not in (None, StatusFormat.JSON):
        raise InvalidInput(f"give --json or --format {output}, not both")
    chosen = StatusFormat.JSON if as_json else output or StatusFormat.TEXT
    require_root()
    loaded = config_for_kernel(config, group)
    states = builder.status(Runner(), loaded, group)
    missing = [text for spec in loaded.select(group) for text in builder.unprobed_devices(spec)]
    seen = observe_kernel(loaded, group, states)  # sysfs and device nodes: runs nothing
    replication = replication_status(loaded, group, recent=5, seen=seen)  # creates nothing
    received = replica.received(loaded)  # a receiver host's journals: reads only
    if chosen is StatusFormat.JSON:
        devices = [device_state_json(state) for state in states]
        sites = [asdict(site) for site in replication.sites]
        shown = {
            "devices": devices,
            "missing_devices": missing,
            "sites": sites,
            "received": [asdict(r) | {"state": r.state} for r in received],
        }
        print(json.dumps(shown, indent=2))
    elif chosen is StatusFormat.REPLICATOR:
        _print_replicator_status(loaded, group, states, replication.sites)
    else:
        _print_status(states, replication)
        for state in received:
            render_received(state)
    _fail_if_missing(missing, config)


def _print_status(states: list[builder.DeviceState], replication: ReplicationStatus) -> None:
    """The text form: each stack, each group's last cuts, each site."""
    for state in states:
        render_device_state(state)
    for name, recent in replication.recent_cuts.items():
        if recent:
            out.print(f"last cuts of {name}:", markup=False)
        for cut in recent:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cut.time))
            eras = ", ".join(f"{d} era {e}" for d, e in sorted(cut.eras.items()))
            out.print(
                f"  cut {cut.seq}  {when}  stall {cut.stall_s * 1000:.0f} ms  {eras}",
                markup=False,
            )
    for site in replication.sites:
        render_site_status(site)


def _print_replicator_status(
    loaded: Config,
    group: str | None,
    states: list[builder.DeviceState],
    sites: list[SiteStatus],
) -> None:
    """`dmsetup status`-like lines per group; devices left out are said on stderr."""
    log_device = _device_number_of(loaded.state_dir)
    for spec in loaded.select(group):
        running = {s.device: s.origin_sectors for s in states if s.group == spec.name and s.running}
        shown = replicator_status(spec, sites, running, log_device)
        for line in render_replicator_status(shown):
            print(line)
        for text in shown.skipped:
            err.print(f"note: {spec.name}/{text}", markup=False)


def _device_number_of(path: Path) -> str:
    """MAJOR:MINOR of the filesystem holding `path`; `0:0` when it does not exist."""
    try:
        number = os.stat(path).st_dev
    except OSError:
        return "0:0"
    return f"{os.major(number)}:{os.minor(number)}"


def _fail_if_missing(missing: list[str], config: Path) -> None:
    """Status shows what it can, then exits 11 if a configured device path does not probe."""
    if missing:
        raise builder.devices_missing(
            f"{len(missing)} configured device path(s) cannot be used; their stacks are not "
            "shown, and sync, seed and changes refuse to run until this is fixed",
            missing,
            config,
        )


def show_changes(
    group: Annotated[str, typer.Argument(help="Group name.")],
    config: ConfigOption = DEFAULT_PATH,
    since_cut: Annotated[
        int | None, typer.Option("--since-cut", help="List changes since this cut.")
    ] = None,
    since_era: Annotated[
        int | None, typer.Option("--since-era", help="List changes since this era.")
    ] = None,
    as_json: JsonOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """Take a cut of GROUP and list the ranges written since a cut (default: the last one)."""
    require_root()
    changes_api.validate_since(since_cut, since_era)
    loaded = config_for_kernel(config, group)
    if dry_run:
        label, ops = changes_api.preview(
            Runner(), loaded, group, since_cut=since_cut, since_era=since_era
        )
        out.print(f"dry run: would take a cut of {group} and list the changes since {label}, "
                  "then record the cut:", markup=False)  # fmt: skip
        for op in ops:
            out.print(op.render(), markup=False)
        return
    result = changes_api.changes(
        Runner(), loaded, group, since_cut=since_cut, since_era=since_era,
        say=(lambda _: None) if as_json else say,
    )  # fmt: skip
    if as_json:
        print(json.dumps(changes_json(result), indent=2))
        return
    out.print(
        f"cut {result.cut.seq} of {result.group}: changes since {result.since} "
        f"(writers stalled {result.cut.stall_s * 1000:.0f} ms)",
        markup=False,
    )
    for device in result.devices:
        changed = format_bytes(sectors_to_bytes(device.changed_sectors))
        out.print(
            f"{device.device}: eras {device.since_era}..{device.cut_era}, "
            f"{len(device.ranges)} ranges, {changed}",
            markup=False,
        )
        for extent in device.ranges:
            out.print(
                f"  sectors [{extent.begin}, {extent.end})  "
                f"{format_bytes(sectors_to_bytes(extent.length))}",
                markup=False,
            )


def _origin_sectors(origin: str) -> int:
    """`size ORIGIN`: an absolute path is a device to probe, anything else a size."""
    if origin.startswith("/"):
        try:
            return probe_block_device(origin, role="origin").size_sectors
        except DeviceProblem as exc:
            raise DeviceMissing(
                exc.message, hint="give a disk, partition, LV or loop device, e.g. /dev/sdb"
            ) from None
    try:
        return parse_size_sectors(origin, what="origin size")
    except InvalidInput as exc:
        if not exc.message.startswith("cannot read"):
            raise
        if os.path.exists(origin):  # `size sdb` run in /dev, or a file name
            hint = f"give a device by its absolute path: dmrepl size {os.path.abspath(origin)}"
        else:
            hint = f"{exc.hint}; or give a device by its absolute path, e.g. /dev/sdb"
        raise InvalidInput(exc.message, hint=hint) from None


def size(
    origin: Annotated[str, typer.Argument(help="Origin size (16T, 500GiB, sectors) or a device.")],
    block_size: Annotated[
        str, typer.Option("--block-size", "-b", help="Era block size (2MiB, 4096s, ...).")
    ] = "2MiB",
    as_json: JsonOption = False,
) -> None:
    """How big the dm-era metadata area must be for ORIGIN at an era block size."""
    origin_sectors = _origin_sectors(origin)
    block = parse_size_sectors(block_size, what="block size")
    result = metadata_size(origin_sectors, block)
    report = {
        "origin_sectors": origin_sectors,
        "block_sectors": block,
        "era_blocks": result.era_blocks,
        "provision_sectors": result.rounded_sectors(),
        "minimum_sectors": result.required_sectors,
        "steady_state_bytes": result.steady_bytes,
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return
    out.print(f"origin         {format_sectors(origin_sectors)}", markup=False)
    out.print(f"era block      {format_sectors(block)} -> {result.era_blocks} era blocks")
    out.print(f"provision      {format_sectors(result.rounded_sectors())}", markup=False)
    out.print(
        f"minimum        {format_sectors(result.required_sectors)} (worst case: held "
        "metadata snapshot while every block is rewritten)",
        markup=False,
    )
    out.print(f"steady state   {format_bytes(result.steady_bytes)} used", markup=False)


def import_table(
    file: Annotated[Path, typer.Argument(help="File of dm-replicator tables ('-': stdin).")],
    group: Annotated[
        str | None, typer.Option("--group", "-g", help="Group name (default: the file's stem).")
    ] = None,
) -> None:
    """Print dmrepl TOML for dm-replicator `replicator`/`replicator-dev` tables."""
    try:
        text = sys.stdin.read() if str(file) == "-" else file.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {file}: {exc}") from None
    name = group or (file.stem if str(file) != "-" else "replicator")
    rep = replicator_table.parse_tables(text)
    if not NAME_RE.match(name):
        raise InvalidInput(
            f"group name {name!r} must be 1-64 of A-Z a-z 0-9 _ + -", hint="pass --group"
        )
    print(replicator_table.render_toml(rep, name, str(file)), end="")
    for change in replicator_table.changed_limits(rep):
        err.print(f"note: {change}", markup=False)


def export_table(
    group: Annotated[str, typer.Argument(help="Group name.")],
    config: ConfigOption = DEFAULT_PATH,
) -> None:
    """Print a configured group as dm-replicator tables (the 2009 patches' form)."""
    loaded = load_config(config)
    spec = loaded.select(group)[0]
    lengths = {device.name: _readable_sectors(device.origin) for device in spec.devices}
    print(replicator_table.export_tables(spec, str(loaded.state_dir), lengths), end="")


def _readable_sectors(path: str) -> int | None:
    """The size of a device or file in sectors, or None when it cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_END) // 512
    except OSError:
        return None
    finally:
        os.close(fd)
