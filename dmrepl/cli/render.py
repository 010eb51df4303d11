"""What the commands print: the consoles, progress, and every result as text or JSON."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict

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

from dmrepl import builder
from dmrepl import changes as changes_api
from dmrepl.compact import HeldCut
from dmrepl.demo import DemoResult
from dmrepl.plan import Plan
from dmrepl.replica import ReceivedState
from dmrepl.replication.cycle import SyncResult
from dmrepl.replication.dryrun import Preview
from dmrepl.replication.status import SiteStatus
from dmrepl.replication.verify import VerifyResult
from dmrepl.status import Health
from dmrepl.units import format_bytes, format_sectors, sectors_to_bytes

# No emoji: rich would turn text such as ":ok:" in a path or message into a picture
# (and importing its emoji table costs 40 ms in the test guest on the first line).
out = Console(highlight=False, soft_wrap=True, emoji=False)


def line(text: str = "") -> None:
    """Print one line as it is (no rich markup)."""
    out.print(text, markup=False)


err = Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def say(text: str) -> None:
    """A progress line, on stderr."""
    err.print(text, markup=False)


def print_plan(plan: Plan, dry_run: bool) -> None:
    """Notes, the commands (under --dry-run) and what was already as configured."""
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


def render_demo(result: DemoResult) -> None:
    """The demo's cycles and verdict; exit 1 if the replica differs."""
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


def render_site_status(site: SiteStatus) -> None:
    """One line per site: state, held cut and lag."""
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
    moved = site.last_transfer
    if moved is not None and moved.seconds > 0:
        ratio = moved.stream_bytes / moved.wire_bytes if moved.wire_bytes else 1.0
        speed = format_bytes(int(moved.stream_bytes / moved.seconds))
        lag.append(f"last transfer (cut {moved.seq}) {speed}/s, compression {ratio:.1f}x")
    if site.last_ack is not None and site.transport == "ssh":
        lag.append(f"last ack {max(0.0, time.time() - site.last_ack):.0f} s ago")
    out.print(
        f"site {site.group}/{site.site} ({site.transport}, {site.policy}): {site.state}; "
        f"holds {cursor}; lag {', '.join(lag) or '-'}; {_site_mode(site)}"
        + (f"; {site.detail}" if site.detail else ""),
        markup=False,
    )
    if site.policy_mode != "normal" and site.policy_mode_since is not None:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(site.policy_mode_since))
        out.print(f"  {site.policy_mode} since {since}: {site.policy_mode_reason}", markup=False)
    switched = site.switches
    if switched.enforced or switched.released or switched.dropped:
        out.print(
            f"  mode switches: enforced {switched.enforced}, released {switched.released}, "
            f"dropped {switched.dropped}",
            markup=False,
        )


def _site_mode(site: SiteStatus) -> str:
    """`mode S (why), outstanding 12 ios, 96 sectors`, in dm-replicator's words."""
    mode = f"mode {site.mode}" + (f" ({site.mode_reason})" if site.mode_reason else "")
    if site.outstanding_ios is None or site.outstanding_sectors is None:
        return f"{mode}, outstanding unknown"
    return f"{mode}, outstanding {site.outstanding_ios} ios, {site.outstanding_sectors} sectors"


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
    """One stack: sizes, era, mirror legs and a table of its layers."""
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


def render_sync(result: SyncResult) -> None:
    """One cycle: the cut, then what each site got."""
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
        moved = [d.transfer for d in site.delivered if d.transfer is not None]
        if moved:
            sent = sum(t.stream_bytes for t in moved)
            wire = sum(t.wire_bytes for t in moved)
            seconds = sum(t.seconds for t in moved)
            resumed = sum(t.resumed_from for t in moved)
            what += (
                f"; sent {format_bytes(sent)} as {format_bytes(wire)} on the wire in "
                f"{seconds:.1f} s"
            )
            if resumed:
                what += f", resumed past {format_bytes(resumed)} received before"
        if site.seeded is not None:
            what = (
                f"seeded: {format_bytes(site.seeded.written)} written of "
                f"{format_bytes(site.seeded.compared)}"
            )
        held = "none" if site.cursor is None else f"cut {site.cursor}"
        detail = f"; {site.detail}" if site.detail else ""
        out.print(f"  site {site.site}: {site.state}, holds {held}; {what}{detail}", markup=False)


def render_preview(preview: Preview) -> None:
    """`sync --dry-run`: the observed sites, the plan, and the cut's commands."""
    plan = preview.plan

    line(f"dry run of group {preview.group}: nothing was changed")
    line(
        f"next cut: {preview.next_cut}; spool {format_bytes(preview.spool_bytes)} of "
        f"{format_bytes(preview.cap_bytes)}"
    )
    for text in preview.repairs:
        line(f"repair first: {text}")
    line("sites:")
    for site in preview.sites:
        held = "none" if site.cursor is None else f"cut {site.cursor}"
        if site.failure is not None:
            what = f"{site.failure}, skipped"
        elif site.name in plan.seeds:
            what = f"seed ({plan.seeds[site.name]})"
        elif site.name in plan.resyncs:
            what = f"resync from cut {plan.resyncs[site.name]} (a delta of its own)"
        elif site.name in plan.followers:
            what = f"follows the chain to cut {preview.next_cut}"
        else:
            what = "nothing to do"
        detail = f"; {site.detail}" if site.detail else ""
        line(f"  {site.name} ({site.transport}): holds {held}; {what}{detail}")
    if plan.head is not None:
        line(
            f"chain delta: cut {plan.head} -> {preview.next_cut}, for "
            f"{', '.join(plan.followers)} (the oldest spooled deltas are evicted if it does "
            "not fit the cap; sites that lose their chain then resync)"
        )
    else:
        line("chain delta: none (no site follows the chain)")
    if preview.before_cut:
        line("before the cut (copy-on-write space and devices for the -pit images):")
        for op in preview.before_cut:
            line(f"  {op.render()}")
    line("the cut (writers wait for these):")
    for op in preview.cut:
        line(f"  {op.render()}")
    line("after the capture (releasing the cut):")
    for op in preview.after_cut:
        line(f"  {op.render()}")


def render_verify(result: VerifyResult, *, as_json: bool) -> None:
    """What `dmrepl verify` compared and what differs (sectors, per device)."""
    if as_json:
        print(json.dumps(asdict(result) | {"ok": result.ok}, indent=2))
        return
    if result.scope == "chain":
        what = (
            f"checked {format_bytes(result.compared_bytes)} of delta files up to cut {result.cut}"
        )
    else:
        what = (
            f"compared {format_bytes(result.compared_bytes)} with cut {result.cut} ({result.scope})"
        )
    out.print(
        f"site {result.site} of {result.group}: {what} in {result.seconds:.1f} s", markup=False
    )
    for problem in result.problems:
        out.print(f"  {problem}", markup=False)
    for mismatch in result.mismatches:
        out.print(
            f"  differs: {mismatch.device} sectors {mismatch.start}-"
            f"{mismatch.start + mismatch.sectors - 1} ({format_bytes(mismatch.sectors * 512)})",
            markup=False,
        )
    if result.repaired_bytes:
        left = len(result.still_differing)
        out.print(
            f"  repaired: {format_bytes(result.repaired_bytes)} sent through the journal; "
            + ("the replicas now hold the cut" if not left else f"{left} ranges still differ"),
            markup=False,
        )
    elif result.ok and result.scope == "chain":
        out.print("  every delta file is whole and the chain reaches the newest cut", markup=False)
    elif result.ok:
        out.print("  the replicas hold the cut", markup=False)


def render_received(state: ReceivedState) -> None:
    """A receiver host's replicas of one group for one site, as its journal says."""
    where = f"received {state.group} for site {state.site}"
    if state.detail:
        text = f"{where}: journal unreadable: {state.detail}"
    elif state.pending is not None:
        text = (
            f"{where}: replay pending (cut {state.pending} committed, not applied; "
            "run `dmrepl replay`)"
        )
    elif state.held is not None:
        text = f"{where}: holds cut {state.held}"
    else:
        text = f"{where}: holds no whole cut"
    out.print(text, markup=False)


def render_cuts(
    group: str,
    site: str,
    transport: str,
    *,
    held: int | None,
    cuts: list[HeldCut] | None,
    keep: str | None = None,
    as_json: bool,
) -> None:
    """What `dmrepl cuts` found: a `dir` site's restorable cuts, or the cut a site holds."""
    if as_json:
        doc = {"group": group, "site": site, "transport": transport, "held": held, "keep": keep}
        listed = None if cuts is None else [asdict(cut) for cut in cuts]
        print(json.dumps(doc | {"cuts": listed}, indent=2))
        return
    if cuts is None:
        what = "holds no whole cut" if held is None else f"holds cut {held}"
        out.print(f"site {site} of {group} ({transport}): {what}", markup=False)
        return
    count = f"{len(cuts)} cut" + ("" if len(cuts) == 1 else "s")
    kept = f"keep {keep}" if keep else "keeps every cut"
    out.print(f"site {site} of {group} ({transport}, {kept}): {count} to restore", markup=False)
    for cut in cuts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(cut.created))
        if cut.full:
            how = f"full image {cut.files[-1]}"
        else:
            how = f"{cut.files[-1]} ({len(cut.files)} files from {cut.files[0]})"
        out.print(f"  cut {cut.seq}  {when}  {how}", markup=False)
