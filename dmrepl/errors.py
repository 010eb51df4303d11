"""Error types and the exit codes the CLI maps them to.

Every error carries a message (what went wrong), optional context (the evidence)
and a hint (what to do). The CLI renders them once; `--debug` re-raises.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes; documented in docs/cli.md."""

    OK = 0
    FAILURE = 1  # unexpected internal error
    USAGE = 2  # bad arguments (typer also uses 2)
    CONFIG = 3  # configuration file invalid
    COMMAND_FAILED = 4  # an external command failed
    NOT_ROOT = 5
    NO_DEVICE_MAPPER = 6  # kernel lacks device-mapper or a needed target
    BUSY = 7  # another run holds the lock
    UNSAFE = 8  # a safety check refused to touch a device
    VM_FAILED = 9  # the test VM could not run or ran no tests
    INVALID_INPUT = 10  # a value (size, block size, ...) is out of range
    DEVICE_MISSING = 11  # a configured device does not exist or is not a block device
    DEVICE_IN_USE = 12  # mounted, held by another device, swap, or used by another stack
    DEVICE_OVERLAP = 13  # metadata area overlaps the origin, a leg or another metadata area
    METADATA_TOO_SMALL = 14  # metadata area below dmrepl's computed minimum
    STACK_MISMATCH = 15  # a running stack differs from the configuration
    CORRUPT = 16  # a delta (spool file, site journal, transfer) failed its checks
    SITES_BEHIND = 17  # the cycle completed, but a site is down, behind or misconfigured
    NOT_RUNNING = 18  # the group's stacks are not running (run `dmrepl up`)
    MISMATCH = 19  # `verify`: a site's replicas differ from the cut they hold
    NOT_PRIMARY = 20  # the group was demoted on this host: it is a site of the new primary
    METADATA_FULL = 21  # dm-era has not digested earlier eras: a cut now could fill its metadata
    INTERRUPTED = 130  # SIGINT/SIGTERM: what was done has been undone


class DmreplError(Exception):
    """Base class for errors shown to the user."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None, context: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.context = context


class InvalidInput(DmreplError):
    """A user-supplied value is malformed or out of range."""

    exit_code = ExitCode.INVALID_INPUT


class Interrupted(DmreplError):
    """A signal stopped the operation; its partial work was undone."""

    exit_code = ExitCode.INTERRUPTED


class NotRoot(DmreplError):
    exit_code = ExitCode.NOT_ROOT


class NoDeviceMapper(DmreplError):
    exit_code = ExitCode.NO_DEVICE_MAPPER


class VmFailed(DmreplError):
    exit_code = ExitCode.VM_FAILED


class ParseError(DmreplError):
    """Output of the kernel or a tool had a shape we do not understand."""

    def __init__(self, what: str, raw: str):
        super().__init__(
            f"cannot parse {what}",
            context=raw if len(raw) <= 2000 else raw[:2000] + f"... ({len(raw)} chars)",
            hint="this kernel or tool version may print something new; please report it",
        )
        self.what = what
        self.raw = raw
