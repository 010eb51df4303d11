"""Running the CLI in this process, for tests (importing it costs ~10 s a process in the VM)."""

from __future__ import annotations

import contextlib
import io
import sys


def run_cli_here(*args: str) -> tuple[int, str, str]:
    """Run `dmrepl ARGS` here; returns (exit code, stdout, stderr)."""
    from dmrepl import cli

    stdout, stderr = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["dmrepl", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as done:
        code = int(done.code or 0)
    finally:
        sys.argv = saved
    return code, stdout.getvalue(), stderr.getvalue()
