"""NBD sites: replicas that are NBD exports served by `nbd-server` in the lab's DR namespace
(tests/kernel/netlab.py), written over the veth link.

A plain `blockdev` site whose replica is a `/dev/nbdN` the test attached: it replicates like
any blockdev site, and when the server dies the next sync reports the site down (exit 17) at
once; after the device is reconnected the next sync catches up.
"""

from __future__ import annotations

import time
from pathlib import Path

from dmrepl import loop
from tests.kernel.netlab import DR_IP, NBD_PORT, NetLab
from tests.kernel.stacks import Bed
from tests.kernel.test_replicate import digest, pit_digests, sync, write_raw

__all__ = ["pit_digests"]  # a fixture used here

MiB = 2**20
# nbd-client -t: a request unanswered this long fails with EIO. Long enough that a starved
# nbd-server on a loaded host is not taken for a dead one; the waits below allow for it.
NBD_TIMEOUT_S = 15


def export_file(lab: NetLab, name: str, mib: int) -> Path:
    """A sparse file in the lab's scratch directory, to be served as an export."""
    path = lab.workdir / f"{name}.img"
    loop.create_sparse_file(path, mib * MiB)
    return path


def test_a_blockdev_site_on_an_nbd_device_replicates_and_survives_a_server_restart(
    bed: Bed, netlab: NetLab, pit_digests: list[dict[str, str]]
) -> None:
    bed.add_device("na", origin_mib=16)
    exported = export_file(netlab, "na-replica", 16)
    server = netlab.start_nbd_server({"dr-na": exported})
    device = netlab.nbd_connect("dr-na", timeout_s=NBD_TIMEOUT_S)
    bed.add_site("dr", replicas={"na": device.path})
    bed.cli("up")
    write_raw("/dev/mapper/na", [0, 5, 100])
    for cycle in range(2):
        result = sync(bed)
        assert "site dr: in sync" in result.stdout, result.stdout
        # The bytes reached the DR host's file, not only the primary's page cache.
        assert digest(str(exported)) == pit_digests[-1]["na"], cycle
        assert digest(device.path) == pit_digests[-1]["na"], cycle
        write_raw("/dev/mapper/na", [cycle + 1, 40 + cycle])

    server.restart(crash=True)  # SIGKILL: the device's connection is gone; I/O fails with EIO
    started = time.monotonic()
    result = sync(bed, check=False)
    took = time.monotonic() - started
    assert result.returncode == 17, result.stdout + result.stderr
    assert "site dr: down" in result.stdout, result.stdout
    assert "writing the replicas failed: Input/output error" in result.stdout, result.stdout
    assert took < 60, f"sync with a dead NBD server took {took:.1f} s"
    behind = pit_digests[-1]["na"]
    assert digest(str(exported)) != behind  # that cut never got there

    device.reconnect()
    write_raw("/dev/mapper/na", [7])
    result = sync(bed)
    # The cut whose apply failed was committed in the journal: finished first, then the chain.
    assert "site dr: finished applying cut 3 from its journal" in result.stdout, result.stdout
    assert "site dr: in sync" in result.stdout, result.stdout
    assert digest(str(exported)) == pit_digests[-1]["na"]
    assert digest(device.path) == pit_digests[-1]["na"]
    status = bed.cli("status").stdout
    assert f"site {bed.group}/dr (blockdev, asynchronous): in sync; holds cut 4" in status


def nbd_attached() -> list[str]:
    """Every /dev/nbdN attached now (the kernel records the attaching pid while it is)."""
    return sorted(f"/dev/{d.name}" for d in Path("/sys/block").glob("nbd*") if (d / "pid").exists())


def test_an_nbd_site_attaches_its_exports_for_each_sync_and_survives_the_server_and_link(
    bed: Bed, netlab: NetLab, pit_digests: list[dict[str, str]]
) -> None:
    sizes = {"xa": 16, "xb": 8}
    for name, mib in sizes.items():
        bed.add_device(name, origin_mib=mib)
    exported = {name: export_file(netlab, f"{name}-replica", mib) for name, mib in sizes.items()}
    server = netlab.start_nbd_server({f"dr-{name}": path for name, path in exported.items()})
    urls = {name: f"nbd://{DR_IP}:{NBD_PORT}/dr-{name}" for name in sizes}
    bed.add_site("dr", transport="nbd", timeout=str(NBD_TIMEOUT_S), export=urls)
    bed.cli("up")
    before = nbd_attached()
    record = bed.state_dir / "journal" / f"{bed.group}.dr.nbd"

    def replicas_hold_the_last_cut(when: str) -> None:
        for name, path in exported.items():
            assert digest(str(path)) == pit_digests[-1][name], (when, name)
        assert nbd_attached() == before, when  # detached again once the sync is done
        assert not record.exists(), when

    shown = bed.cli("sync", bed.group, "--dry-run").stdout
    assert "dr (nbd): holds none; seed (compare)" in shown, shown
    assert nbd_attached() == before and not record.exists()  # the probe attaches nothing
    write_raw("/dev/mapper/xa", [0, 5, 100])
    for cycle in range(2):
        result = sync(bed)
        assert "site dr: in sync" in result.stdout, result.stdout
        replicas_hold_the_last_cut(f"cycle {cycle}")
        write_raw("/dev/mapper/xb", [cycle, 30 + cycle])

    server.stop(crash=True)
    result = sync(bed, check=False)
    assert result.returncode == 17, result.stdout + result.stderr
    assert "site dr: down" in result.stdout, result.stdout
    refused = f"export {urls['xa']} of xa: cannot reach {DR_IP}:{NBD_PORT}: Connection refused"
    assert refused in result.stdout, result.stdout
    server.start()
    result = sync(bed)
    assert "site dr: in sync" in result.stdout, result.stdout
    replicas_hold_the_last_cut("after the server restarted")

    write_raw("/dev/mapper/xa", [3, 9])
    netlab.cut()  # every packet dropped: the probe waits `timeout` seconds, then gives up
    started = time.monotonic()
    result = sync(bed, check=False)
    took = time.monotonic() - started
    assert result.returncode == 17, result.stdout + result.stderr
    assert "site dr: down" in result.stdout, result.stdout
    assert f"no answer from {DR_IP}:{NBD_PORT} within {NBD_TIMEOUT_S} s" in result.stdout
    assert took < 60, f"sync over a cut link took {took:.1f} s"
    netlab.restore()
    result = sync(bed)
    assert "site dr: in sync" in result.stdout, result.stdout
    replicas_hold_the_last_cut("after the link came back")

    # Killed half way through writing the exports: the journal here has the cut committed,
    # the exports hold a mix, and the device stays attached (nothing ran to detach it).
    write_raw("/dev/mapper/xa", [1, 2, 3])
    write_raw("/dev/mapper/xb", [4])
    bed.killed_at("apply", "sync", bed.group)
    assert len(nbd_attached()) > len(before) and record.exists()
    result = sync(bed)
    assert "finished applying cut 7 from its journal" in result.stdout, result.stdout
    assert "site dr: in sync" in result.stdout, result.stdout
    replicas_hold_the_last_cut("after a run killed mid-apply")
    status = bed.cli("status").stdout
    assert f"site {bed.group}/dr (nbd, asynchronous): in sync; holds cut 8" in status
