"""The host side every benchmark shares: run its guest half in the test VM, collect the JSON."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmrepl import vm


@dataclass(frozen=True)
class GuestRun:
    code: int  # the guest command's exit code
    payload: dict[str, Any] | None  # what the guest wrote (None: nothing)
    seconds: float  # wall time, including any wait for another VM


def run_guest_half(
    module: str, options: str, results_file: str, json_copy: Path | None
) -> GuestRun:
    """Run `python -m MODULE OPTIONS --guest DIR` in the VM and read DIR/RESULTS_FILE.

    Prints why when the guest wrote nothing; copies the results to `json_copy` if given.
    """
    out = Path(tempfile.mkdtemp(prefix="dmrepl-bench-", dir="/tmp"))
    command = f"{sys.executable} -m {module}{options} --guest {out}"
    started = time.monotonic()
    code = vm.run_in_vm(command, rwdirs=[out])
    seconds = time.monotonic() - started
    results = out / results_file
    if not results.exists():
        print(f"the VM wrote no results (exit code {code})", file=sys.stderr)
        return GuestRun(code, None, seconds)
    payload = json.loads(results.read_text())
    if json_copy is not None:
        json_copy.write_text(json.dumps(payload, indent=1))
    return GuestRun(code, payload, seconds)
