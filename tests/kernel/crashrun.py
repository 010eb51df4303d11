"""Run the dmrepl CLI and `kill -9` itself when the cycle reaches a named phase.

    python -m tests.kernel.crashrun PHASE dmrepl-args...

Used by the fault-injection tests: the process dies exactly as a crash would
(no cleanup handlers run), at a known point of the protocol. As the forced command of a
key (`crashrun hello serve --stdio ...`) it is a receiver that dies at a phase.
"""

from __future__ import annotations

import os
import signal
import sys

from dmrepl import phases
from dmrepl.cli import main


def _kill_at(target: str) -> None:
    def hook(phase: str) -> None:
        if phase == target:
            os.kill(os.getpid(), signal.SIGKILL)

    phases.set_hook(hook)


if __name__ == "__main__":
    known = (*phases.PHASES, *phases.SERVE_PHASES, *phases.S3_PHASES)
    if len(sys.argv) < 2 or sys.argv[1] not in known:
        sys.exit(f"usage: crashrun PHASE ARGS... (PHASE one of {', '.join(known)})")
    _kill_at(sys.argv[1])
    sys.argv = ["dmrepl", *sys.argv[2:]]
    main()
