"""Switchover, failover and failback on the real kernel, with ext4: two "hosts" on one
kernel (the bed's config as the primary, a second config over the replicas as the DR host),
each direction shipping only what changed, and an old primary's late writes listed and kept;
and a switchover over ssh (tests/kernel/netlab.py), whose DR host takes over by itself.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dmrepl.config import load_config
from dmrepl.executor import Runner
from dmrepl.replication.cycle import sync
from tests.clirun import run_cli_here
from tests.kernel.netlab import DR_IP, NetLab
from tests.kernel.stacks import Bed
from tests.kernel.test_promote import dr_config, write_files
from tests.kernel.test_replica_access import as_receiver
from tests.kernel.test_replicate import digest
from tests.kernel.test_ssh_site import ROOT, remote

MiB = 2**20
GATE = "/dev/mapper/fo"


def dr_host(bed: Bed, replica: str, metadata: str, old_origin: str) -> Path:
    """The DR host (`dr_config`), with a site `back` whose replica is the old primary's
    device (to fail back)."""
    back = f"[group.{bed.group}.site.back]"
    return dr_config(
        bed,
        replica,
        metadata,
        back,
        'transport = "blockdev"',
        f"{back[:-1]}.replica]",
        f'fo = "{old_origin}"',
    )


def ext4_seeded(bed: Bed, workdir: Path) -> tuple[str, str, Path, dict[str, bytes]]:
    """Device `fo` with ext4 and files on it, seeded to a blockdev site `dr`; (the origin,
    the replica, a mount point, the files)."""
    bed.add_device("fo", origin_mib=48)
    origin = str(bed.devices["fo"]["origin"])
    replica = bed.add_site("dr")["fo"]
    bed.cli("up")
    subprocess.run(["mkfs.ext4", "-q", GATE], check=True)
    mnt = workdir / "mnt"
    with mounted(GATE, mnt):
        files = write_files(mnt, "a")
    bed.cli("sync", bed.group)  # cut 1, the seed
    return origin, replica, mnt, files


def old_primary_as_receiver(bed: Bed, origin: str) -> Path:
    """The old primary's config plus a grant of the DR host's site `back` (its own device),
    so that it can be promoted again."""
    journal = bed.workdir / "dr-state" / "journal" / f"{bed.group}.back.journal"
    config = bed.workdir / "primary-again.toml"
    config.write_text(
        bed.config.read_text()
        + f'\n[receive.{bed.group}]\njournal = "{journal}"\n'
        + f'[receive.{bed.group}.replica]\nfo = "{origin}"\n'
    )
    return config


def shipped(config: Path, group: str, site: str) -> int:
    """One cycle through the library; the data bytes `site` applied."""
    result = sync(Runner(), load_config(config), group, say=lambda _line: None)
    (report,) = [s for s in result.sites if s.site == site]
    assert report.cursor == result.cut.seq, report
    return sum(d.data_bytes for d in report.delivered)


@contextmanager
def mounted(device: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", *options, device, str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def fsck_clean(device: str) -> None:
    fsck = subprocess.run(["fsck.ext4", "-fn", device], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_switchover_and_back_ships_only_what_changed_and_loses_no_file(
    bed: Bed, workdir: Path, make_loop: Callable[[str, int], str]
) -> None:
    origin, replica, mnt, files = ext4_seeded(bed, workdir)
    with mounted(GATE, mnt):
        written = write_files(mnt, "b")
    files |= written
    there = shipped(bed.config, bed.group, "dr")
    print(
        f"failback: primary -> dr shipped {there} bytes for "
        f"{sum(map(len, written.values()))} of files"
    )
    assert sum(map(len, written.values())) <= there < 4 * MiB, there
    with mounted(GATE, mnt):  # a switchover needs the gates closed
        code, _, stderr = run_cli_here(
            "switchover", bed.group, "--to", "dr", "--config", str(bed.config)
        )
        assert code == 12 and "unmount it" in stderr, stderr
    switched = bed.cli("switchover", bed.group, "--to", "dr").stdout
    assert "site dr holds the final cut 3" in switched, switched
    assert not bed.owned()  # demoted: the gates are gone
    refused = bed.cli("sync", bed.group, check=False)
    assert refused.returncode == 20 and "demoted on this host" in refused.stderr, refused.stderr
    assert bed.cli("up", check=False).returncode == 20

    dr = dr_host(bed, replica, make_loop("dr-meta", 4 * MiB), origin)
    promoted = as_receiver(dr, "promote", bed.group, "--site", "dr")
    assert f"group {bed.group} promoted at cut 3" in promoted, promoted
    with mounted(GATE, mnt):
        assert {name: (mnt / name).read_bytes() for name in files} == files
        written = write_files(mnt, "c")
    files |= written
    record = bed.state_dir / "demoted" / f"{bed.group}.json"
    reversed_in = as_receiver(dr, "reverse", bed.group, "--site", "back", "--from", str(record))
    assert "site back placed at cut 3, owed 0 bytes" in reversed_in, reversed_in
    back = shipped(dr, bed.group, "back")  # only what changed since the promotion
    print(
        f"failback: dr -> back shipped {back} bytes for {sum(map(len, written.values()))} of files"
    )
    assert sum(map(len, written.values())) <= back < 4 * MiB, back
    switched = as_receiver(dr, "switchover", bed.group, "--to", "back")
    assert "site back holds the final cut 5" in switched, switched
    assert digest(origin) == digest(replica)  # the two "hosts" equal, byte for byte

    again = old_primary_as_receiver(bed, origin)
    promoted = as_receiver(again, "promote", bed.group, "--site", "back")
    assert f"group {bed.group} promoted at cut 5" in promoted, promoted
    fsck_clean(GATE)
    with mounted(GATE, mnt):
        assert {name: (mnt / name).read_bytes() for name in files} == files


def test_unplanned_failover_then_failback_lists_and_keeps_the_late_writes(
    bed: Bed, workdir: Path, make_loop: Callable[[str, int], str]
) -> None:
    origin, replica, mnt, kept = ext4_seeded(bed, workdir)  # cut 1 reaches the site
    with mounted(GATE, mnt):
        late = write_files(mnt, "b")
    bed.killed_at("journal-write", "sync", bed.group)  # cut 2 never does
    with mounted(GATE, mnt):
        late |= write_files(mnt, "c")  # and these were never cut
    bed.cli("down")  # the primary is lost

    dr = dr_host(bed, replica, make_loop("dr-meta", 4 * MiB), origin)
    promoted = as_receiver(dr, "promote", bed.group, "--site", "dr", "--force")
    assert f"group {bed.group} promoted at cut 1" in promoted, promoted
    fsck_clean(GATE)
    with mounted(GATE, mnt):
        assert {name: (mnt / name).read_bytes() for name in kept} == kept
        assert not [name for name in late if (mnt / name).exists()]
        new = write_files(mnt, "d")

    # Both "hosts" share one kernel, so their stacks' dm names would collide: the new
    # primary's stack is down while the old primary's comes up to list its late writes.
    as_receiver(dr, "down", bed.group)
    demoted = json.loads(bed.cli("demote", bed.group, "--site", "dr", "--json").stdout)
    assert demoted["cut"] == 1 and demoted["reason"] == "failover", demoted
    assert demoted["discarded_bytes"] >= sum(map(len, late.values())), demoted
    assert not bed.owned()
    saved = list(Path(demoted["saved"]).iterdir())
    assert len(saved) == 1 and saved[0].stat().st_size > demoted["discarded_bytes"], saved
    listed = bed.cli("demote", bed.group, "--site", "dr", check=False)
    assert listed.returncode == 10 and "demoted on this host already" in listed.stderr

    as_receiver(dr, "up", bed.group)
    record = Path(demoted["record"])
    reversed_in = as_receiver(dr, "reverse", bed.group, "--site", "back", "--from", str(record))
    assert f"owed {demoted['discarded_bytes']} bytes" in reversed_in, reversed_in
    back = shipped(dr, bed.group, "back")
    print(
        f"failback: {sum(map(len, late.values()))} bytes of late files, "
        f"{demoted['discarded_bytes']} bytes discarded, reverse shipped {back} bytes"
    )
    assert demoted["discarded_bytes"] <= back < 8 * MiB, back  # not the 48 MiB device
    verified = as_receiver(dr, "verify", bed.group, "--site", "back", "--full")
    assert "differs" not in verified, verified  # and it exited 0
    as_receiver(dr, "down", bed.group)
    assert digest(origin) == digest(replica)
    fsck_clean(origin)
    with mounted(origin, mnt, "-o", "ro,noload"):
        assert {name: (mnt / name).read_bytes() for name in kept | new} == kept | new
        assert not [name for name in late if (mnt / name).exists()]


def dmrepl_command(*args: str) -> str:
    """A forced command running this checkout's dmrepl (udev is not running in the guest)."""
    argv = [sys.executable, "-m", "dmrepl", *args]
    return f"cd {shlex.quote(str(ROOT))} && DM_DISABLE_UDEV=1 exec {shlex.join(argv)}"


def test_switchover_over_ssh_promotes_the_dr_host_whose_own_promote_asks_the_old_primary(
    bed: Bed, netlab: NetLab, workdir: Path, make_loop: Callable[[str, int], str]
) -> None:
    dr = remote(bed, netlab, make_loop, {"fo": 48})
    serving = dr.sshd.authorize(
        dmrepl_command("serve", "--stdio", "--group", bed.group, "--config", str(dr.config))
    )
    dr.use(serving)
    asking = dr.sshd.authorize(
        dmrepl_command("role", "--json", bed.group, "--config", str(bed.config))
    )
    with dr.config.open("a") as config:  # the DR host can promote, and ask its old primary
        config.write(
            "\n".join([
                f"[group.{bed.group}.device.fo]", f'origin = "{dr.replicas["fo"]}"',
                f'metadata = "{make_loop("dr-meta", 4 * MiB)}"', 'block_size = "64KiB"',
                f"[receive.{bed.group}.primary]", f'host = "{DR_IP}"', 'user = "root"',
                f"ssh_options = {json.dumps(asking.options)}",
            ]) + "\n"
        )  # fmt: skip
    subprocess.run(["mkfs.ext4", "-q", GATE], check=True)
    mnt = workdir / "mnt"
    with mounted(GATE, mnt):
        files = write_files(mnt, "a")
    bed.cli("sync", bed.group)  # the seed, over ssh
    with mounted(GATE, mnt):
        files |= write_files(mnt, "b")

    code, _, stderr = run_cli_here("promote", bed.group, "--site", "dr", "--config", str(dr.config))
    assert code == 7 and "answered: primary, stack up, last cut 1" in stderr, stderr
    assert "it still holds group" in stderr

    switched = bed.cli("switchover", bed.group, "--to", "dr").stdout
    assert "site dr took over at cut 2" in switched, switched
    print("switchover:", switched.strip().splitlines()[-1])
    assert json.loads(bed.cli("role", bed.group, "--json").stdout)["role"] == "demoted"
    fsck_clean(GATE)  # the DR host's gate now, over its replica
    with mounted(GATE, mnt):
        assert {name: (mnt / name).read_bytes() for name in files} == files
    answer = json.loads(run_cli_here("role", bed.group, "--json", "--config", str(dr.config))[1])
    assert (answer["role"], answer["cut"], answer["stack_up"]) == ("promoted", 2, True), answer
    as_receiver(dr.config, "down", bed.group)
