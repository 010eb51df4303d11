"""External commands as values: what to run, and what it returned.

Pure data with no way to run anything, so planners (`plan`, `dm`'s builders,
`stack`) depend on it without depending on the gateway. `dmrepl.executor`
runs `Op`s and returns `Result`s.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One external command. Pure data: safe to print, compare and test."""

    argv: tuple[str, ...]
    stdin: str | None = None
    mutating: bool = True
    timeout_s: float | None = None  # None: the runner's default
    env: tuple[tuple[str, str], ...] = ()  # set or override these variables for this command

    def render(self) -> str:
        """The shell-quoted command line, plus stdin if any (for dry-run and logs)."""
        line = shlex.join(self.argv)
        if self.stdin is not None:
            line += " <<'EOF'\n" + self.stdin.rstrip("\n") + "\nEOF"
        return line


def command(*argv: str | int, stdin: str | None = None, mutating: bool = True) -> Op:
    """Build an `Op` from arguments (ints are converted to strings)."""
    return Op(tuple(str(a) for a in argv), stdin=stdin, mutating=mutating)


def probe(*argv: str | int, stdin: str | None = None) -> Op:
    """Build a read-only `Op`: it runs even under `--dry-run`."""
    return command(*argv, stdin=stdin, mutating=False)


@dataclass(frozen=True)
class Result:
    """What a finished command returned."""

    argv: tuple[str, ...]
    exit_code: int
    stdout: str
    stderr: str
    duration_s: float
