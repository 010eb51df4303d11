"""Operation values are pure: the planners that build them import nothing that runs commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl.ops import Op, command, probe

ROOT = Path(__file__).resolve().parents[2]


def test_builders_convert_arguments_and_mark_probes_read_only() -> None:
    assert command("dmsetup", "message", "d", 0, "x") == Op(("dmsetup", "message", "d", "0", "x"))
    assert probe("dmsetup", "status", "d").mutating is False
    assert command("dmsetup", "create", "d", stdin="0 8 zero\n").render() == (
        "dmsetup create d <<'EOF'\n0 8 zero\nEOF"
    )


@pytest.mark.parametrize("module", ["dmrepl.ops", "dmrepl.plan", "dmrepl.dm", "dmrepl.stack"])
def test_pure_modules_do_not_load_the_gateway(module: str) -> None:
    check = (
        f"import sys, {module}; "
        "loaded = {'dmrepl.executor', 'sh', 'subprocess'} & set(sys.modules); "
        "print(sorted(loaded))"
    )
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"
