"""Commands that change which host is primary: switchover (planned), demote (an old
primary back after a failover), reverse (the new primary takes the old one as its site)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from dmrepl import failback, roles
from dmrepl.cli.app import (
    ConfigOption,
    DryRunOption,
    config_for_kernel,
    require_device_mapper,
    require_root,
)
from dmrepl.cli.render import line, out, print_plan, render_preview, say
from dmrepl.config import DEFAULT_PATH, load_config
from dmrepl.errors import ExitCode
from dmrepl.executor import Runner
from dmrepl.roles import Demotion
from dmrepl.statedir import StateDir

GroupName = Annotated[str, typer.Argument(help="Group name.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
SHOWN_RANGES = 20  # the rest are in the demotion record


def switchover(
    group: GroupName,
    to: Annotated[str, typer.Option("--to", help="The site that becomes the primary.")],
    config: ConfigOption = DEFAULT_PATH,
    dry_run: DryRunOption = False,
) -> None:
    """Planned switchover: ship the final cut to the site, then demote this host (unmount
    the gates first). An ssh site's host then takes over; for other sites, run
    `dmrepl promote GROUP --site SITE` there."""
    require_root()
    loaded = config_for_kernel(config, group)
    if dry_run:
        planned = failback.switchover_preview(Runner(), loaded, group, to)
        render_preview(planned.cycle)
        line(f"then: check that site {to} holds that cut and nothing was written after it,")
        line(
            f"record the demotion ({StateDir(loaded.state_dir).demoted(group)}), remove the stack:"
        )
        print_plan(planned.down, True)
        if planned.site_takes_over:
            line(f"then ask site {to}'s host to take over (`promote` there)")
        else:
            line(f"then, at site {to}: dmrepl promote {group} --site {to}")
        return
    done = failback.switchover(Runner(), loaded, group, to, say)
    out.print(
        f"site {to} holds the final cut {done.cut}; group {group} is demoted on this host "
        f"(record: {done.record})",
        markup=False,
    )
    if done.promoted is not None:
        out.print(
            f"site {to} took over at cut {done.promoted}: the switchover took "
            f"{done.seconds:.1f} s from the final cycle's start",
            markup=False,
        )
        return
    if done.problem is not None:
        out.print(f"site {to} did not take over: {done.problem}", markup=False)
    out.print(f"next, at site {to}: dmrepl promote {group} --site {to}", markup=False)
    if done.problem is not None:
        raise typer.Exit(int(ExitCode.SITES_BEHIND))


def demote(
    group: GroupName,
    site: Annotated[str, typer.Option("--site", help="The site that became the primary.")],
    config: ConfigOption = DEFAULT_PATH,
    cut: Annotated[
        int | None,
        typer.Option(
            "--cut", help="The cut the site was promoted at (default: the last it applied)."
        ),
    ] = None,
    as_json: JsonOption = False,
    dry_run: DryRunOption = False,
) -> None:
    """On an old primary back after a failover: keep and list what it wrote after the cut
    the new primary holds, record the demotion, and remove the group's stack."""
    require_root()
    loaded = config_for_kernel(config, group)
    if dry_run:
        planned = failback.demote_preview(Runner(), loaded, group, site, cut=cut)
        line(f"dry run of demote {group}: nothing was changed")
        if planned.up is not None:
            line("the stack is down: it would be brought up over its metadata first:")
            print_plan(planned.up, True)
        eras = ", ".join(f"{d} from era {e}" for d, e in planned.since.items())
        line(f"would list what was written after cut {planned.cut} ({eras}) from a cut's")
        line(f"metadata snapshots, keep it as a delta file in {planned.kept_in},")
        line(f"record the demotion in {planned.record} and remove the stack:")
        print_plan(planned.down, True)
        return
    demoted, record = failback.demote(Runner(), loaded, group, site, cut=cut, say=say)
    if as_json:
        print(json.dumps(demoted.to_json() | {"record": str(record)}, indent=2))
        return
    _render_discarded(demoted)
    out.print(f"group {group} is demoted on this host; record: {record}", markup=False)
    out.print(
        f"next, on the new primary: dmrepl reverse {group} --site NAME --from {record.name} "
        "(a copy of the record; NAME: its site for this host)",
        markup=False,
    )


def reverse(
    group: GroupName,
    site: Annotated[str, typer.Option("--site", help="The new primary's site for the old one.")],
    source: Annotated[
        Path, typer.Option("--from", help="The old primary's demotion record (a copy).")
    ],
    config: ConfigOption = DEFAULT_PATH,
    dry_run: DryRunOption = False,
) -> None:
    """On the new primary: place the old primary as SITE at the cut this host was promoted
    at; the next cycle sends it what changed here and what it wrote after that cut."""
    require_root()
    loaded = config_for_kernel(config, group)
    done = failback.reverse(Runner(), loaded, group, site, source, say, dry_run=dry_run)
    if dry_run:
        line(
            f"dry run: site {site} would be placed at cut {done.cut}, owed {done.owed_bytes} "
            "bytes the old primary wrote after it; nothing was changed"
        )
        return
    out.print(
        f"site {site} placed at cut {done.cut}, owed {done.owed_bytes} bytes the old primary "
        f"wrote after it; `dmrepl sync {group}` sends them with what changed here",
        markup=False,
    )


def _render_discarded(demoted: Demotion) -> None:
    if not demoted.discarded:
        out.print(f"nothing was written here after cut {demoted.cut}: nothing is discarded")
        return
    out.print(
        f"DISCARDED: {demoted.discarded_bytes} bytes written here after cut {demoted.cut} "
        f"never reached site {demoted.site}; their data is kept in {demoted.saved}",
        markup=False,
    )
    shown = 0
    for device, extents in demoted.discarded.items():
        for extent in extents:
            if shown < SHOWN_RANGES:
                out.print(
                    f"  {device}: sectors [{extent.begin}, {extent.end}) "
                    f"({extent.length * 512} bytes)",
                    markup=False,
                )
            shown += 1
    if shown > SHOWN_RANGES:
        out.print(f"  ... and {shown - SHOWN_RANGES} more ranges (all in the record)")


def role(
    group: GroupName,
    config: ConfigOption = DEFAULT_PATH,
    as_json: JsonOption = False,
) -> None:
    """This host's role for GROUP: primary, promoted, demoted or receiver, with its stack and
    last cut (what a DR host's `promote` asks its old primary, over ssh)."""
    require_root()
    loaded = load_config(config)
    require_device_mapper()
    answer = roles.report(Runner(), loaded, group)
    if as_json:
        print(json.dumps(roles.to_json(answer)))
        return
    out.print(f"{group} on {answer.host}: {answer.describe()}", markup=False)
