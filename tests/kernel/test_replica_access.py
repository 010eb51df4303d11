"""Replicas handed to users are never torn: `replica open` and `replay` finish a committed
journal first, a receiver's `status` says "replay pending", and no delivery changes an open
replica under its readers."""

from __future__ import annotations

import json
from pathlib import Path

from dmrepl import dm
from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed
from tests.kernel.test_replicate import digest, gate_digests, site_digests, sync, write_raw


def as_receiver(config: Path, *args: str) -> str:
    """`dmrepl ARGS --config CONFIG` (Bed.cli always passes the bed's own config)."""
    code, stdout, stderr = run_cli_here(*args, "--config", str(config))
    assert code == 0, stdout + stderr
    return stdout


def receiver_config(bed: Bed) -> Path:
    """This host as a receiver of the bed's site `dr` (its journal in the bed's state dir)."""
    replicas = bed.sites["dr"]["replica"]
    assert isinstance(replicas, dict)
    lines = ["[dmrepl]", f'state_dir = "{bed.state_dir}"', f"[receive.{bed.group}.replica]"]
    lines += [f'{device} = "{path}"' for device, path in replicas.items()]
    config = bed.workdir / "receiver.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def test_an_apply_killed_midway_is_finished_before_a_replica_is_opened(bed: Bed) -> None:
    bed.add_device("ra")
    bed.add_device("rb")
    bed.add_site("dr")
    bed.cli("up")
    sync(bed)
    write_raw("/dev/mapper/ra", [1, 7, 100, 200])
    write_raw("/dev/mapper/rb", [3, 9])
    cut = gate_digests(bed)  # nothing writes until the cut is taken: it is this
    bed.killed_at("apply", "sync", bed.group)  # the replicas are between two cuts now
    assert site_digests(bed, "dr") != cut
    receiver = receiver_config(bed)
    status = json.loads(as_receiver(receiver, "status", "--json"))
    (pending,) = status["received"]
    assert (pending["state"], pending["pending"]) == ("replay pending", 2), pending
    opened = bed.cli("replica", "open", bed.group, "--site", "dr")
    assert "cut 2, read-only" in opened.stdout, opened.stdout
    views = {d: f"/dev/mapper/dmrepl-replica-{bed.group}.dr.{d}" for d in ("ra", "rb")}
    assert {d: digest(path) for d, path in views.items()} == cut
    try:
        with open(views["ra"], "r+b") as view:
            view.write(b"x")
            view.flush()
        raise AssertionError("a read-only view took a write")
    except OSError:
        pass
    write_raw("/dev/mapper/ra", [5])
    refused = sync(bed, check=False)
    assert refused.returncode == 17 and "is open for reading" in refused.stdout, refused.stdout
    assert {d: digest(path) for d, path in views.items()} == cut  # unchanged under its reader
    again = bed.cli("replica", "open", bed.group, "--site", "dr", check=False)
    assert again.returncode == 10 and "open already" in again.stderr
    bed.cli("replica", "close", bed.group, "--site", "dr")
    assert not [n for n in dm.observe(bed.runner).names if n.startswith("dmrepl-replica-")]
    assert "site dr: in sync" in sync(bed).stdout


def test_a_receiver_host_replays_pending_journals_at_boot(bed: Bed) -> None:
    bed.add_device("rc")
    bed.add_site("dr")
    bed.cli("up")
    sync(bed)
    write_raw("/dev/mapper/rc", [2, 4, 6])
    cut = gate_digests(bed)
    bed.killed_at("apply", "sync", bed.group)
    receiver = receiver_config(bed)
    replayed = as_receiver(receiver, "replay")
    assert f"{bed.group} at site dr: replayed; the replicas hold cut 2" in replayed
    assert site_digests(bed, "dr") == cut
    status = as_receiver(receiver, "status")
    assert f"received {bed.group} for site dr: holds cut 2" in status, status
    assert "no journal is waiting to be applied" in as_receiver(receiver, "replay")
