"""Commands at the site that holds replicas: open them read-only for a drill or a restore,
close them, and replay pending journals (at boot on a receiver host)."""

from __future__ import annotations

from typing import Annotated

import typer

from dmrepl import dm, replica
from dmrepl.cli.app import ConfigOption, DryRunOption, require_device_mapper, require_root
from dmrepl.cli.render import line, out, print_plan, say
from dmrepl.config import DEFAULT_PATH, load_config
from dmrepl.executor import Runner
from dmrepl.promote import preview, promote

replica_app = typer.Typer(
    help="Replicas at the site that holds them: open read-only, close.", no_args_is_help=True
)
GroupName = Annotated[str, typer.Argument(help="Group name.")]
SiteName = Annotated[
    str, typer.Option("--site", help="The site (on a DR host: the name the primary gives it).")
]


@replica_app.command("open")
def open_command(
    group: GroupName, site: SiteName, config: ConfigOption = DEFAULT_PATH,
    dry_run: DryRunOption = False,
) -> None:  # fmt: skip
    """Finish a committed journal, then expose the replicas as read-only dm devices (never
    mount a raw replica: it may be between two cuts while a delivery is applied)."""
    require_root()
    replicas = replica.find(load_config(config), group, site)
    require_device_mapper()
    if dry_run:
        journal = replica.journal_state(replicas)
        line(f"dry run: the journal of site {site}: {journal.state}" + (
            f" ({journal.detail})" if journal.detail else ""))  # fmt: skip
        if journal.pending is not None:
            line(f"would finish applying cut {journal.pending} from the journal first")
        for op in replica.read_only_views(replicas).values():
            line(op.render())
        return
    held, paths = replica.open_replicas(Runner(), replicas)
    out.print(f"replicas of {group} at site {site}: cut {held}, read-only:", markup=False)
    for device, path in paths.items():
        out.print(f"  {device}: {path}", markup=False)
    out.print(
        f"deliveries to the site wait until `dmrepl replica close {group} --site {site}`",
        markup=False,
    )


@replica_app.command("close")
def close_command(
    group: GroupName, site: SiteName, config: ConfigOption = DEFAULT_PATH,
    dry_run: DryRunOption = False,
) -> None:  # fmt: skip
    """Remove the read-only views; deliveries to the site go on."""
    require_root()
    replicas = replica.find(load_config(config), group, site)
    require_device_mapper()
    if dry_run:
        opened = replica.opened_views(Runner(), replicas)
        for name in opened:
            line(dm.remove(name).render())
        line("dry run: " + ("nothing is open" if not opened else "nothing was removed"))
        return
    removed = replica.close_replicas(Runner(), replicas)
    out.print(f"removed {', '.join(removed)}" if removed else "nothing was open", markup=False)


def replay(config: ConfigOption = DEFAULT_PATH, dry_run: DryRunOption = False) -> None:
    """Finish every committed journal of this host's receive grants (run at boot on
    a receiver host, before anything reads a replica)."""
    require_root()
    if dry_run:
        pending = [r for r in replica.received(load_config(config)) if r.pending is not None]
        for state in pending:
            line(f"would finish applying cut {state.pending} of {state.group} at site "
                 f"{state.site} (it holds cut {state.held})")  # fmt: skip
        line("dry run: " + ("no journal is waiting" if not pending else "nothing was applied"))
        return
    done = replica.replay_all(load_config(config))
    failed = False
    for outcome in done:
        where = f"{outcome.group} at site {outcome.site}"
        if outcome.problem:
            failed = True
            out.print(f"{where}: cannot replay: {outcome.problem}", markup=False)
        else:
            out.print(f"{where}: replayed; the replicas hold cut {outcome.held}", markup=False)
    if not done:
        out.print("no journal is waiting to be applied", markup=False)
    raise typer.Exit(1 if failed else 0)


def promote_command(
    group: GroupName,
    site: SiteName,
    config: ConfigOption = DEFAULT_PATH,
    force: Annotated[
        bool,
        typer.Option("--force", help="The old primary is lost: stop a delivery still running."),
    ] = False,
    dry_run: DryRunOption = False,
) -> None:
    """At a DR host: this host's replicas of GROUP become its devices (failover), at the last
    cut they hold whole; change tracking starts at once (the group's stack is built)."""
    require_root()
    loaded = load_config(config)
    require_device_mapper()
    if dry_run:
        planned = preview(Runner(), loaded, group, site, force=force)
        line(planned.asked)
        if planned.pending is not None:
            line(f"would finish applying cut {planned.pending} from the journal")
        line(f"would record the promotion at cut {planned.cut} and build the stack:")
        print_plan(planned.up, True)
        line(f"then take a cut to start the group's history here at cut {planned.cut}")
        line("dry run: nothing was changed")
        return
    done = promote(Runner(), loaded, group, site, force=force, say=say)
    if done.replayed is not None:
        out.print(f"finished applying cut {done.replayed.seq} from the journal", markup=False)
    for pid in done.stopped:
        out.print(f"stopped the receiver session still delivering (pid {pid})", markup=False)
    out.print(done.asked, markup=False)
    out.print(f"group {group} promoted at cut {done.cut}: this host is its primary", markup=False)
    for device, gate in done.gates.items():
        out.print(f"  {device}: {gate}", markup=False)
