"""`dmrepl config ...`: the configuration file itself (a commented starting point)."""

from __future__ import annotations

import sys

import typer

from dmrepl.config import example_text

config_app = typer.Typer(help="The configuration file: a commented example.", no_args_is_help=True)


@config_app.command("example")
def example() -> None:
    """Print a commented configuration that sets every key (docs/configuration.md)."""
    sys.stdout.write(example_text())
