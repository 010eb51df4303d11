"""`dmrepl demo` on the real kernel: the README's main command shows real era_invalidate ranges."""

from __future__ import annotations

import json
import subprocess
import sys

from dmrepl import dm
from dmrepl.executor import Runner


def test_demo_json_reports_exactly_the_written_blocks(runner: Runner) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dmrepl", "demo", "--no-vm", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    result = json.loads(done.stdout)
    # 64 KiB era blocks: 4 KiB at 1 MiB -> block 16; 1 MiB at 64 MiB -> blocks 1024..1039;
    # 512 B at 67 MiB -> block 1072; the last sector of 256 MiB -> block 4095.
    assert result["changed_blocks"] == [[16, 17], [1024, 1040], [1072, 1073], [4095, 4096]]
    assert result["changed_sectors"][0] == [2048, 2176]
    assert result["era_after_snapshot"] == result["era_before"] + 1
    # It tore down everything it made.
    assert [n for n, _ in dm.list_owned(runner) if n.startswith("dmrepl-demo")] == []
