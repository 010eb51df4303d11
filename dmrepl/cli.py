"""The `dmrepl` command line: parse options, make one library call, render the result.

Errors are rendered once (message, context, hint) with the exit code of their
type (dmrepl.errors.ExitCode); `--debug` re-raises them with the traceback.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dmrepl import __version__, loop, vm
from dmrepl.demo import DemoResult, load_modules, run_demo
from dmrepl.errors import DmreplError, NoDeviceMapper, NotRoot
from dmrepl.executor import Runner
from dmrepl.units import format_bytes, sectors_to_bytes

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
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


def require_root() -> None:
    if os.geteuid() != 0:
        raise NotRoot("dmrepl must run as root to drive device-mapper", hint="run it with sudo")


@app.command()
def demo(
    no_vm: Annotated[
        bool,
        typer.Option("--no-vm", help="Fail instead of booting a VM when this kernel lacks dm."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Build an era device on loop devices, write to it, show the changed ranges, tear down."""
    require_root()
    if not loop.kernel_has_device_mapper():
        if no_vm:
            raise NoDeviceMapper(
                "this kernel has no device-mapper",
                hint="drop --no-vm to run the demo in a VM booting Debian's kernel",
            )
        err.print("This kernel has no device-mapper: booting Debian's kernel in a VM (virtme-ng).")
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
    table = Table(title=f"Written since era {result.era_before} (era_invalidate, {result.kernel})")
    for column in ("era blocks", "sectors", "bytes", "size"):
        table.add_column(column, justify="right")
    for blocks, sectors in zip(result.changed_blocks, result.changed_sectors, strict=True):
        table.add_row(
            f"[{blocks.begin}, {blocks.end})",
            f"[{sectors.begin}, {sectors.end})",
            f"{sectors_to_bytes(sectors.begin)}+{sectors_to_bytes(sectors.length)}",
            format_bytes(sectors_to_bytes(sectors.length)),
        )
    out.print(table)
    total = sum(e.length for e in result.changed_sectors)
    out.print(
        f"{len(result.changed_blocks)} ranges, {format_bytes(sectors_to_bytes(total))} to ship "
        f"of a {format_bytes(sectors_to_bytes(result.origin_sectors))} device."
    )


def render_error(error: DmreplError) -> None:
    err.print(f"[bold red]error:[/] {error.message}", markup=True)
    if error.context:
        err.print(error.context, markup=False)
    if error.hint:
        err.print(f"[yellow]hint:[/] {error.hint}", markup=True)


def main() -> None:
    """Console-script entry point. Usage errors are click's (exit 2); ours are rendered here."""
    try:
        app()
    except DmreplError as error:
        if Options.debug:
            raise
        render_error(error)
        sys.exit(int(error.exit_code))
