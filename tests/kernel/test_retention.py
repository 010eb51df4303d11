"""A `dir` site with a `keep` grid on the real kernel: cycles with writes between them, the
site compacts after each delivery, and `dmrepl apply --cut K` restores the newest and an
older kept cut byte for byte as the gate held them."""

from __future__ import annotations

import json
import time
from pathlib import Path

from dmrepl import delta, deltafiles, retention
from dmrepl.errors import ExitCode
from dmrepl.rebuild import describe_cuts
from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed
from tests.kernel.test_replicate import MiB, digest, write_raw

GRID = "10s:2"


def next_interval(seconds: int, after: float | None = None) -> None:
    """Sleep until just after the multiple of `seconds` of Unix time that follows `after`
    (default: now); no sleep if that moment has passed already."""
    moment = time.time() if after is None else after
    time.sleep(max(0.0, moment - moment % seconds + seconds + 0.2 - time.time()))


def test_a_keep_grid_compacts_and_kept_cuts_restore(bed: Bed, workdir: Path) -> None:
    bed.add_device("da")
    archive = workdir / "archive"
    archive.mkdir()
    bed.add_site("vault", transport="dir", path=str(archive), keep=GRID)
    bed.cli("up")
    gate = "/dev/mapper/da"
    at_cut: dict[int, str] = {}  # the gate's digest at each cut
    created: dict[int, float] = {}  # each cut's creation time, from its delta header
    said = []
    # Three cycles in one 10 s interval, then two from the interval after the third cut's:
    # cuts 1, 2 and 4 are dropped when every cycle takes under 3 s; slower cycles move the
    # cuts, and the expectation below follows their real times.
    next_interval(10)
    for cycle in range(5):
        if cycle == 3:
            next_interval(10, after=created[max(created)])
        write_raw(gate, [cycle, 10 + 3 * cycle, 40])
        said.append(bed.cli("sync", bed.group).stderr)
        newest = deltafiles.list_files(archive, bed.group)[-1]
        created[newest.seq] = delta.open_verified(newest.path).created
        at_cut[newest.seq] = digest(gate)
    kept = sorted(retention.kept_cuts(created, retention.parse_grid(GRID)))
    listed = json.loads(bed.cli("cuts", bed.group, "--site", "vault", "--json").stdout)
    assert [cut["seq"] for cut in listed["cuts"]] == kept
    files = deltafiles.list_files(archive, bed.group)
    assert len(files) == len(kept)  # nothing left over
    # Five cuts, a grid of two 10 s intervals: two are kept however the cycles fall.
    assert max(created) in kept and len(kept) == 2, (created, kept)
    assert "site vault: merged " in "".join(said)
    target = bed.make_loop("da-restored", 32 * MiB)
    for cut in (kept[-1], kept[0]):
        code, stdout, stderr = run_cli_here(
            "apply", str(archive), "--group", bed.group, "--to", f"da={target}",
            "--cut", str(cut),
        )  # fmt: skip
        assert code == 0, stdout + stderr
        assert digest(target) == at_cut[cut], f"cut {cut}"
    dropped = sorted(set(created) - set(kept))
    code, _, stderr = run_cli_here(
        "apply", str(archive), "--group", bed.group, "--to", f"da={target}",
        "--cut", str(dropped[0]),
    )  # fmt: skip
    assert code == ExitCode.INVALID_INPUT, stderr
    assert f"hint: cuts it can restore: {describe_cuts(kept)}" in stderr
