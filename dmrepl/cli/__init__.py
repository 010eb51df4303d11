"""The `dmrepl` command line: parse options, make one library call, render the result.

`app` (global options, error rendering, `main`) is in `cli.app`; the commands are in
`cli.stacks`, `cli.replication`, `cli.replicas`, `cli.failback` and `cli.metrics`, and what
they print in `cli.render`.
"""

from __future__ import annotations

from dmrepl.cli import failback, metrics, replicas, replication, stacks
from dmrepl.cli.app import app, filesystem_error, main
from dmrepl.cli.configfile import config_app

__all__ = ["app", "filesystem_error", "main"]

# Registered here, in the order `dmrepl --help` lists them.
for _name, _command in (
    ("demo", stacks.demo),
    ("up", stacks.up),
    ("down", stacks.down),
    ("check-config", stacks.check_config),
    ("status", stacks.show_status),
    ("changes", stacks.show_changes),
    ("metrics", metrics.show_metrics),
    ("sync", replication.sync),
    ("seed", replication.seed),
    ("run", replication.run),
    ("verify", replication.verify_command),
    ("apply", replication.apply_deltas),
    ("pull", replication.pull_command),
    ("cuts", replication.cuts_command),
    ("serve", replication.serve_command),
    ("replay", replicas.replay),
    ("promote", replicas.promote_command),
    ("switchover", failback.switchover),
    ("demote", failback.demote),
    ("reverse", failback.reverse),
    ("role", failback.role),
    ("size", stacks.size),
    ("import-table", stacks.import_table),
    ("export-table", stacks.export_table),
):
    app.command(_name)(_command)

app.add_typer(replicas.replica_app, name="replica")
app.add_typer(config_app, name="config")
