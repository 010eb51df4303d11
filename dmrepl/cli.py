"""The `dmrepl` command line: parse options, make one library call, render the result.

Errors are rendered once (message, context, hint) with the exit code of their
type (dmrepl.errors.ExitCode); `--debug` re-raises them with the traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich import box as rich_box
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from dmrepl import __version__, builder, loop, replicate, safefile, vm
from dmrepl import changes as changes_api
from dmrepl.config import DEFAULT_PATH, Config, load_config
from dmrepl.demo import DemoResult, load_modules, run_demo
from dmrepl.errors import (
    DmreplError,
    ExitCode,
    Interrupted,
    InvalidInput,
    NoDeviceMapper,
    NotRoot,
)
from dmrepl.executor import Runner
from dmrepl.plan import Plan
from dmrepl.probe import DeviceMissing, DeviceProblem, probe_block_device
from dmrepl.rebuild import apply_dir
from dmrepl.replication.status import replication_status
from dmrepl.sizing import metadata_size
from dmrepl.status import Health
from dmrepl.units import format_bytes, format_sectors, parse_size_sectors, sectors_to_bytes

app = typer.Typer(
    name="dmrepl",
    help="Replicate block devices to remote sites with mainline device-mapper targets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Options:
    debug: bool = False


def _version(value: bool) -> None:
    if value:
        print(f"dmrepl {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Log every command; show tracebacks.")
    ] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Replicate block devices to remote sites with mainline device-mapper targets."""
    Options.debug = debug
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if debug:
        logging.getLogger("dmrepl").setLevel(logging.DEBUG)


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("dmrepl must run as root to drive device-mapper", hint="run it with sudo")


def config_for_kernel(config: Path, group: str | None) -> Config:
    """The configuration, for a command that talks to device-mapper: bad files (exit 3) and
    unknown groups (exit 10) are refused before the kernel is looked at (exit 6)."""
    loaded = load_config(config)
    loaded.select(group)
    require_device_mapper()
    return loaded


def require_device_mapper() -> None:
    """Refuse before the first dmsetup call on a kernel without device-mapper (exit 6)."""
    if not loop.kernel_has_device_mapper():
        raise NoDeviceMapper(
            "this kernel has no device-mapper: dm-mod is neither loaded nor installed as a module",
            hint="run dmrepl on a kernel with device-mapper (CONFIG_BLK_DEV_DM), "
            "or install this kernel's modules",
        )


@app.command()
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


def render_demo(result: DemoResult) -> None:
    table = Table(title=f"Replicating a mounted ext4 to site dr ({result.kernel})")
    for column in ("cut", "before the cut", "changed", "applied to replica", "stall", "site"):
        table.add_column(column, justify="left" if column == "before the cut" else "right")
    for cycle in result.cycles:
        table.add_row(
            str(cycle.cut), cycle.what, format_bytes(cycle.changed_bytes),
            format_bytes(cycle.shipped_bytes), f"{cycle.stall_ms:.0f} ms", cycle.site_state,
        )  # fmt: skip
    out.print(table)
    verdict = "identical" if result.identical else "DIFFERENT"
    out.print(
        f"replica vs gate after the last cut: {verdict} (sha256 {result.replica_sha256[:16]}…) "
        f"over {format_bytes(sectors_to_bytes(result.origin_sectors))}",
        markup=False,
    )
    if not result.identical:
        raise typer.Exit(1)


ConfigOption = Annotated[
    Path,
    # readable=False: an unreadable file is load_config's exit 3 (like a directory), not
    # click's usage error 2.
    typer.Option(
        "--config",
        "-c",
        envvar="DMREPL_CONFIG",
        readable=False,
        help="Configuration file (TOML).",
    ),
]
GroupArg = Annotated[str | None, typer.Argument(help="Group name (default: every group).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
DryRunOption = Annotated[
    bool, typer.Option("--dry-run", help="Print the exact commands and tables; change nothing.")
]


def say(text: str) -> None:
    err.print(text, markup=False)


def print_plan(plan: Plan, dry_run: bool) -> None:
    for note in plan.notes:
        out.print(f"note: {note}", markup=False)
    if dry_run:
        for step in plan.steps:
            out.print(f"# {step.what.splitlines()[0]}", markup=False)
            out.print(step.op.render(), markup=False)
    if plan.unchanged:
        out.print(f"already as configured: {', '.join(plan.unchanged)}", markup=False)
    if plan.empty:
        out.print("nothing to do", markup=False)


@app.command()
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
    plan = builder.up(Runner(), loaded, group, fresh=fresh, dry_run=dry_run, say=say)
    print_plan(plan, dry_run)


@app.command()
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


@app.command("check-config")
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


@app.command("status")
def show_status(
    group: GroupArg = None, config: ConfigOption = DEFAULT_PATH, as_json: JsonOption = False
) -> None:
    """Show each stack: layers, sizes, current era, metadata use, held snapshot, mirror legs."""
    require_root()
    loaded = config_for_kernel(config, group)
    states = builder.status(Runner(), loaded, group)
    missing = [text for spec in loaded.select(group) for text in builder.unprobed_devices(spec)]
    if as_json:
        devices = [device_state_json(state) for state in states]
        sites = [asdict(site) for site in replicate.site_status(loaded, group)]
        shown = {"devices": devices, "missing_devices": missing, "sites": sites}
        print(json.dumps(shown, indent=2))
        _fail_if_missing(missing, config)
        return
    for state in states:
        render_device_state(state)
    replication = replication_status(loaded, group, recent=5)  # reads only: creates nothing
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
    _fail_if_missing(missing, config)


def _fail_if_missing(missing: list[str], config: Path) -> None:
    """Status shows what it can, then exits 11 if a configured device path does not probe."""
    if missing:
        raise builder.devices_missing(
            f"{len(missing)} configured device path(s) cannot be used; their stacks are not "
            "shown, and sync, seed and changes refuse to run until this is fixed",
            missing,
            config,
        )


def render_site_status(site: replicate.SiteStatus) -> None:
    cursor = "none" if site.cursor is None else f"cut {site.cursor}"
    lag = []
    if site.lag_cuts is not None:
        lag.append(f"{site.lag_cuts} cuts")
    if site.lag_eras is not None:
        lag.append(f"{site.lag_eras} eras")
    if site.lag_bytes is not None:
        lag.append(format_bytes(site.lag_bytes))
    elif site.cursor is not None and site.lag_cuts:
        lag.append("resync needed")
    if site.lag_s is not None:
        lag.append(f"{site.lag_s:.0f} s")
    out.print(
        f"site {site.group}/{site.site} ({site.transport}, {site.policy}): {site.state}; "
        f"holds {cursor}; lag {', '.join(lag) or '-'}"
        + (f"; {site.detail}" if site.detail else ""),
        markup=False,
    )


def _leg_health(health: Health) -> str:
    return "alive" if health is Health.ALIVE else f"failed ({health.value}: {health.name.lower()})"


def device_state_json(state: builder.DeviceState) -> dict[str, object]:
    """The `status --json` record of one device (a stable, documented shape)."""
    record = asdict(state)
    if state.mirror is not None:
        record["mirror"] = {
            "legs": [leg.health.value for leg in state.mirror.legs],
            "leg_devices": [leg.device for leg in state.mirror.legs],
            "in_sync": state.mirror.in_sync_regions,
            "regions": state.mirror.regions,
            "log": state.mirror.log.kind,
        }
    return record


def render_device_state(state: builder.DeviceState) -> None:
    running = "running" if state.running else "not running"
    out.print(
        f"{state.group}/{state.device}: {running}, gate {state.gate}, origin "
        f"{format_sectors(state.origin_sectors)}, era block {state.block_sectors} sectors, "
        f"metadata area {format_sectors(state.metadata_sectors)}",
        markup=False,
    )
    if state.era is not None:
        held = f"held (root {state.era.held_root})" if state.era.snapshot_held else "none held"
        out.print(
            f"  era {state.era.current_era}; metadata {state.era.metadata_used_blocks}/"
            f"{state.era.metadata_total_blocks} blocks used; metadata snapshot {held}",
            markup=False,
        )
    if state.mirror is not None:
        mirror = state.mirror
        legs = ", ".join(f"{leg.device} {_leg_health(leg.health)}" for leg in mirror.legs)
        out.print(
            f"  mirror: {mirror.in_sync_regions}/{mirror.regions} regions in sync; legs: {legs}",
            markup=False,
        )
    table = Table(box=None if not out.is_terminal else rich_box.SIMPLE, show_edge=False)
    for column in ("layer", "dm name", "present", "suspended", "open", "table"):
        table.add_column(column)
    for layer in state.layers:
        match = {None: "-", True: "as configured", False: "DIFFERS"}[layer.matches]
        table.add_row(
            layer.layer,
            layer.name,
            "yes" if layer.present else "no",
            "yes" if layer.suspended else "no",
            str(layer.open_count),
            match,
        )
    out.print(table)
    for warning in state.warnings:
        err.print(f"warning: {warning}", markup=False)


@app.command("changes")
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
) -> None:
    """Take a cut of GROUP and list the ranges written since a cut (default: the last one)."""
    require_root()
    changes_api.validate_since(since_cut, since_era)
    loaded = config_for_kernel(config, group)
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


def changes_json(result: changes_api.ChangesResult) -> dict[str, object]:
    """`changes --json`: ranges are half-open [begin, end) in 512-byte sectors."""
    return {
        "group": result.group,
        "cut": result.cut.seq,
        "stall_s": result.cut.stall_s,
        "since": result.since,
        "recovered": result.recovered,
        "devices": [
            {
                "device": d.device,
                "since_era": d.since_era,
                "cut_era": d.cut_era,
                "block_sectors": d.block_sectors,
                "origin_sectors": d.origin_sectors,
                "changed_sectors": d.changed_sectors,
                "ranges": [[e.begin, e.end] for e in d.ranges],
            }
            for d in result.devices
        ],
    }


class CliProgress:
    """Progress bars (rate, ETA) on a terminal; one plain line per task otherwise."""

    def __init__(self) -> None:
        self.bars: Progress | None = None

    def __call__(self, what: str, total: int) -> Callable[[int], object]:
        if not err.is_terminal:
            err.print(f"{what}: {format_bytes(total)}", markup=False)
            return lambda _done: None
        if self.bars is None:
            self.bars = Progress(
                TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=True,
            )  # fmt: skip
            self.bars.start()
        bars = self.bars
        task = bars.add_task(what, total=total or None)
        return lambda done: bars.advance(task, done)

    def stop(self) -> None:
        if self.bars is not None:
            self.bars.stop()


def _sync_once(config: Path, group: str | None, seed_sites: tuple[str, ...], zeroed: bool) -> int:
    """One cycle of each selected group that has sites; the exit code for the worst outcome."""
    loaded = load_config(config)
    groups = [g.name for g in loaded.select(group) if g.sites or group is not None]
    if not groups:
        raise InvalidInput(f"no group in {config} has sites", hint="add a [group.G.site.S] table")
    for spec in loaded.select(group):
        for site in seed_sites:
            spec.site(site)  # an unknown site is exit 10 before the kernel is looked at
    require_device_mapper()
    worst, failed = ExitCode.OK, None
    for name in groups:
        progress = CliProgress()
        try:
            result = replicate.sync(
                Runner(), loaded, name, seed_sites=seed_sites, target_zeroed=zeroed,
                say=say, progress=progress,
            )  # fmt: skip
        except USER_ERRORS as caught:
            # One group's failure (a lost disk, say) must not stop the other groups' cycles.
            error = as_user_error(caught)
            if error is None or len(groups) == 1 or Options.debug or isinstance(error, Interrupted):
                raise
            render_error(error)
            err.print(f"group {name}: no cut this cycle; going on with the other groups")
            failed = failed or error.exit_code
            continue
        finally:
            progress.stop()
        render_sync(result)
        if any(site.state != "in sync" for site in result.sites):
            worst = ExitCode.SITES_BEHIND
    return int(failed or worst)


def render_sync(result: replicate.SyncResult) -> None:
    for line in result.recovered:
        out.print(f"recovered: {line}", markup=False)
    out.print(
        f"cut {result.cut.seq} of {result.group}: {format_bytes(result.changed_bytes)} changed, "
        f"writers stalled {result.cut.stall_s * 1000:.0f} ms; spool "
        f"{format_bytes(result.spool_bytes)}",
        markup=False,
    )
    for site in result.sites:
        shipped = sum(d.data_bytes for d in site.delivered)
        cuts = ", ".join(str(d.seq) for d in site.delivered)
        what = f"applied cuts {cuts} ({format_bytes(shipped)})" if cuts else "nothing applied"
        if site.seeded is not None:
            what = (
                f"seeded: {format_bytes(site.seeded.written)} written of "
                f"{format_bytes(site.seeded.compared)}"
            )
        held = "none" if site.cursor is None else f"cut {site.cursor}"
        detail = f"; {site.detail}" if site.detail else ""
        out.print(f"  site {site.site}: {site.state}, holds {held}; {what}{detail}", markup=False)


@app.command()
def sync(group: GroupArg = None, config: ConfigOption = DEFAULT_PATH) -> None:
    """One replication cycle: recover, cut, capture, ship to every reachable site (for cron)."""
    require_root()
    raise typer.Exit(_sync_once(config, group, (), False))


@app.command()
def seed(
    group: Annotated[str, typer.Argument(help="Group name.")],
    site: Annotated[str, typer.Option("--site", help="The site to copy everything to.")],
    config: ConfigOption = DEFAULT_PATH,
    target_zeroed: Annotated[
        bool,
        typer.Option("--target-zeroed", help="The replicas are known to be all zeros."),
    ] = False,
) -> None:
    """Full copy of GROUP to SITE from a fresh cut, writing only chunks that differ."""
    require_root()
    raise typer.Exit(_sync_once(config, group, (site,), target_zeroed))


@app.command()
def run(
    group: GroupArg = None,
    config: ConfigOption = DEFAULT_PATH,
    interval: Annotated[
        str, typer.Option("--interval", help="Time between cycles: 30s, 5m, 1h.")
    ] = "30s",
) -> None:
    """Run `sync` every INTERVAL until SIGTERM or SIGINT (finishes the cycle in progress)."""
    require_root()
    seconds = parse_interval(interval)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    code = 0
    while not stop.is_set():
        try:
            code = _sync_once(config, group, (), False)
        except USER_ERRORS as caught:
            error = as_user_error(caught)
            if error is None or Options.debug:
                raise
            if isinstance(error, Interrupted):
                break
            render_error(error)
            code = int(error.exit_code)
        stop.wait(seconds)
    err.print("stopped", markup=False)
    raise typer.Exit(code)


MIN_INTERVAL_S = 1.0  # shorter would run cycles back to back: a busy loop of cuts
MAX_INTERVAL_S = 7 * 86400.0


def parse_interval(text: str) -> float:
    """`run --interval`: seconds between cycles, from 1 s to 7 days."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise InvalidInput(f"interval {text!r} is not like 30s, 5m or 1h") from None
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:  # also false for nan
        raise InvalidInput(
            f"interval {text!r} is out of range",
            hint="give 1s to 7 days between cycles, like 30s, 5m or 1h",
        )
    return seconds


@app.command("apply")
def apply_deltas(
    directory: Annotated[Path, typer.Argument(help="A dir site's directory of delta files.")],
    group: Annotated[str, typer.Option("--group", help="The group the deltas belong to.")],
    to: Annotated[
        list[str], typer.Option("--to", help="DEVICE=/dev/TARGET for every group device.")
    ],
    from_cut: Annotated[
        int | None, typer.Option("--from-cut", help="The cut the targets already hold.")
    ] = None,
    to_cut: Annotated[int | None, typer.Option("--cut", help="Stop at this cut.")] = None,
) -> None:
    """Rebuild devices from a dir site's deltas (or roll them forward with --from-cut)."""
    targets: dict[str, str] = {}
    for item in to:
        name, sep, path = item.partition("=")
        if not sep or not name or not path.startswith("/"):
            raise InvalidInput(f"--to {item!r} is not DEVICE=/dev/TARGET")
        if name in targets:
            raise InvalidInput(
                f"--to gives device {name} twice ({targets[name]} and {path})",
                hint="give one target per device; nothing was written",
            )
        targets[name] = path
    result = apply_dir(directory, group, targets, from_cut=from_cut, to_cut=to_cut, say=say)
    out.print(
        f"targets hold cut {result.cut} of {group} ({len(result.applied)} deltas, "
        f"{format_bytes(result.data_bytes)})",
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


@app.command()
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


def render_error(error: DmreplError) -> None:
    err.print(f"[bold red]error:[/] {error.message}", markup=True)
    if error.context:
        err.print(error.context, markup=False)
    if error.hint:
        err.print(f"[yellow]hint:[/] {error.hint}", markup=True)


# A full, read-only or failing filesystem is the host's problem, not dmrepl's bug: it is said
# plainly (exit 1, like apply's write errors in docs/cli.md); --debug shows the traceback.
FILESYSTEM_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})


def filesystem_error(exc: OSError) -> DmreplError | None:
    """The error to show for an OSError of a full, read-only or failing filesystem; None for
    any other OSError (a bug: its traceback is shown)."""
    if exc.errno not in FILESYSTEM_ERRNOS:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return DmreplError(
        f"{exc.strerror or exc}{where}",
        hint="free space on (or remount read-write) the filesystem it names, then run the "
        "command again; it stopped at that write (--debug shows where)",
    )


USER_ERRORS = (DmreplError, OSError, sqlite3.Error)


def as_user_error(caught: BaseException) -> DmreplError | None:
    """The error to show for what a command raised; None for a bug (its traceback is shown)."""
    if isinstance(caught, DmreplError):
        return caught
    if isinstance(caught, OSError):
        return filesystem_error(caught)
    if isinstance(caught, sqlite3.Error):  # a full or read-only disk, or a store held elsewhere
        return DmreplError(
            f"the state store (state.db) failed: {caught}",
            hint="check that state_dir's filesystem is not full or read-only and that no other "
            "program holds state.db, then run the command again",
        )
    return None


def main() -> None:
    """Console-script entry point. Usage errors are click's (exit 2); ours are rendered here."""
    os.umask(safefile.PRIVATE_UMASK)  # whatever dmrepl creates holds replicated data
    try:
        app()
    except USER_ERRORS as caught:
        error = as_user_error(caught)
        if error is None or Options.debug:
            raise
        render_error(error)
        sys.exit(int(error.exit_code))
