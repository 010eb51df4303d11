"""Failover on the real kernel: `promote` at the DR host turns its replicas into the group's
devices at the last cut they received whole, with ext4 on them clean."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed
from tests.kernel.test_replica_access import as_receiver
from tests.kernel.test_replicate import digest, write_raw

MiB = 2**20
GATE = "/dev/mapper/fo"


def dr_config(bed: Bed, replica: str, metadata: str, *more: str) -> Path:
    """The DR host: a grant of the bed's site `dr` (its journal where the primary's blockdev
    site keeps it) and the group configured over the replica, for promotion; `more` lines
    are added (another site of the group there, say)."""
    journal = bed.state_dir / "journal" / f"{bed.group}.dr.journal"
    config = bed.workdir / "dr.toml"
    config.write_text(
        "\n".join([
            "[dmrepl]", f'state_dir = "{bed.workdir / "dr-state"}"',
            f"[receive.{bed.group}]", f'journal = "{journal}"',
            f"[receive.{bed.group}.replica]", f'fo = "{replica}"',
            f"[group.{bed.group}.device.fo]", f'origin = "{replica}"',
            f'metadata = "{metadata}"', 'block_size = "64KiB"', *more,
        ]) + "\n"
    )  # fmt: skip
    return config


def write_files(directory: Path, prefix: str) -> dict[str, bytes]:
    files = {f"{prefix}{i}": os.urandom(150_000 + i) for i in range(4)}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    os.sync()
    return files


def test_unplanned_failover_promotes_the_last_whole_cut_and_ext4_is_clean(
    bed: Bed, workdir: Path, make_loop: Callable[[str, int], str]
) -> None:
    bed.add_device("fo", origin_mib=48)
    replica = bed.add_site("dr")["fo"]
    bed.cli("up")
    gate = "/dev/mapper/fo"
    subprocess.run(["mkfs.ext4", "-q", gate], check=True)
    mnt = workdir / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", gate, str(mnt)], check=True)
    try:
        kept = write_files(mnt, "a")
        bed.cli("sync", bed.group)  # cut 1 (the seed) holds the a-files
        lost = write_files(mnt, "b")
        bed.killed_at("journal-write", "sync", bed.group)  # cut 2 never reaches the site
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    bed.cli("down")  # the primary is lost
    config = dr_config(bed, replica, make_loop("dr-meta", 4 * MiB))
    promoted = as_receiver(config, "promote", bed.group, "--site", "dr", "--force")
    assert f"group {bed.group} promoted at cut 1" in promoted, promoted
    fsck = subprocess.run(["fsck.ext4", "-fn", gate], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    subprocess.run(["mount", gate, str(mnt)], check=True)
    try:
        for name, data in kept.items():
            assert (mnt / name).read_bytes() == data, name
        assert not [name for name in lost if (mnt / name).exists()]  # cut 2 was not whole
        (mnt / "after").write_bytes(b"written on the new primary")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    status = as_receiver(config, "status", bed.group)
    assert "era" in status  # the promoted stack runs: changes are tracked from now on
    code, _, stderr = run_cli_here("promote", bed.group, "--site", "dr", "--config", str(config))
    assert code == 10 and "promoted on this host already" in stderr, stderr


def test_promote_finishes_an_apply_killed_midway_and_exposes_exactly_the_cut(
    bed: Bed, make_loop: Callable[[str, int], str]
) -> None:
    bed.add_device("fo", origin_mib=16)
    replica = bed.add_site("dr")["fo"]
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_raw(GATE, [1, 7, 100, 200])
    cut = digest(GATE)  # nothing writes until the cut is taken: it is this
    bed.killed_at("apply", "sync", bed.group)  # the replica is between two cuts now
    assert digest(replica) != cut
    bed.cli("down")
    config = dr_config(bed, replica, make_loop("dr-meta", 4 * MiB))
    promoted = as_receiver(config, "promote", bed.group, "--site", "dr")
    assert "finished applying cut 2 from the journal" in promoted, promoted
    assert f"group {bed.group} promoted at cut 2" in promoted, promoted
    assert "not asked" in promoted  # no [receive.G.primary]: the lock alone was checked
    assert digest(GATE) == cut
    as_receiver(config, "down", bed.group)
