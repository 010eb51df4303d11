"""The typer app: global options, preconditions every command shares, error rendering, main.

Errors are rendered once (message, context, hint) with the exit code of their
type (dmrepl.errors.ExitCode); `--debug` re-raises them with the traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer

from dmrepl import __version__, loop, safefile
from dmrepl.cli.render import err
from dmrepl.config import Config, load_config
from dmrepl.errors import DmreplError, NoDeviceMapper, NotRoot

app = typer.Typer(
    name="dmrepl",
    help="Replicate block devices to remote sites with mainline device-mapper targets.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


class Options:
    """Global options of this invocation."""

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
    """Refuse unless running as root (exit 5)."""
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


def render_error(error: DmreplError) -> None:
    """Print an error: message, context, hint."""
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
        app(prog_name="dmrepl")  # also as `python -m dmrepl`: completion asks for this name
    except USER_ERRORS as caught:
        error = as_user_error(caught)
        if error is None or Options.debug:
            raise
        render_error(error)
        sys.exit(int(error.exit_code))
