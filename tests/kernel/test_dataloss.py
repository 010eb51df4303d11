"""Issue 13's data-loss findings on the real kernel: a device whose path does not probe never
drops out of a cycle, and a cycle killed at any phase leaves nothing of dmrepl's behind."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from dmrepl import era, phases
from dmrepl.stack import Layer, layer_name
from dmrepl.statedir import StateDir
from tests.kernel.stacks import Bed, dm_names
from tests.kernel.test_replicate import digest, site_digests, write_raw


def tree(root: Path, *, contents: bool = True) -> dict[str, str]:
    """Every path under `root`, with a hash of each file's bytes when `contents`."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_dir() or not contents:
            found[key] = "dir" if path.is_dir() else "file"
        else:
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def site_cursors(bed: Bed) -> list[dict[str, object]]:
    """What `status --json` says each site holds (without what moves with the clock or with
    the writes the test makes: ages and outstanding writes)."""
    moving = {"lag_s", "outstanding_ios", "outstanding_sectors", "outstanding_age_s"}
    sites = json.loads(bed.cli("status", "--json").stdout)["sites"]
    return [{k: v for k, v in site.items() if k not in moving} for site in sites]


def eras(bed: Bed) -> dict[str, int]:
    return {
        device: era.read_status(bed.runner, layer_name(device, Layer.ERA)).current_era
        for device in bed.devices
    }


def test_a_device_whose_path_is_wrong_stops_sync_with_exit_11_and_moves_no_cursor(
    bed: Bed, workdir: Path
) -> None:
    bed.add_device("pa")
    bed.add_device("pb")
    bed.add_site("dr")
    vault = workdir / "vault"
    vault.mkdir()
    bed.add_site("vault", transport="dir", path=str(vault))
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_raw("/dev/mapper/pa", [2, 9])
    write_raw("/dev/mapper/pb", [4])
    bed.cli("sync", bed.group)
    write_raw("/dev/mapper/pa", [11])  # a cycle now would ship this and move the cursors
    cursors, kernel = site_cursors(bed), eras(bed)
    state, archive = tree(bed.state_dir), tree(vault)
    replicas = site_digests(bed, "dr")
    good = dict(bed.devices["pb"])
    bed.devices["pb"]["origin"] = "/dev/disk/by-id/dmrepl-typo"
    bed.write()
    for args in (("sync", bed.group), ("seed", bed.group, "--site", "dr"), ("changes", bed.group)):
        result = bed.cli(*args, check=False)
        assert result.returncode == 11, result.stdout + result.stderr
        assert (
            f"group.{bed.group}.device.pb: origin /dev/disk/by-id/dmrepl-typo does not exist"
            in (result.stderr)
        )
        assert "nothing was changed" in result.stderr
    shown = bed.cli("status", check=False)  # shows what it can, names the device, exits 11
    assert shown.returncode == 11, shown.stdout + shown.stderr
    assert "origin /dev/disk/by-id/dmrepl-typo does not exist" in shown.stderr
    assert "/dev/mapper/pa" in shown.stdout
    assert tree(bed.state_dir) == state  # no cut recorded, no journal written, nothing spooled
    assert tree(vault) == archive
    assert eras(bed) == kernel  # no cut was taken
    assert site_digests(bed, "dr") == replicas
    bed.devices["pb"] = good
    bed.write()
    assert site_cursors(bed) == cursors
    result = bed.cli("sync", bed.group)  # with the path fixed, the group catches up whole
    assert "site dr: in sync, holds cut 3" in result.stdout, result.stdout


def loops() -> set[str]:
    return set(
        subprocess.run(
            ["losetup", "-a"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    )


@pytest.mark.parametrize("phase", phases.PHASES)
def test_sync_killed_at_each_phase_then_a_clean_sync_leaves_nothing_behind(
    bed: Bed, phase: str
) -> None:
    bed.add_device("pa")
    bed.add_device("pb")
    bed.add_site("dr")
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_raw("/dev/mapper/pa", [1, 7])
    bed.cli("sync", bed.group)  # the reference: a cycle never killed
    reference = tree(bed.state_dir, contents=False)
    own_loops, devices = loops(), dm_names(bed.runner)
    write_raw("/dev/mapper/pa", [3, 100])
    write_raw("/dev/mapper/pb", [5])
    bed.killed_at(phase, "sync", bed.group)
    result = bed.cli("sync", bed.group)
    assert "site dr: in sync" in result.stdout, result.stdout + result.stderr
    assert loops() == own_loops  # no COW loop left attached (to a deleted file or not)
    assert dm_names(bed.runner) == devices  # no -pit
    for device in bed.devices:
        assert not era.read_status(bed.runner, layer_name(device, Layer.ERA)).snapshot_held
    assert tree(bed.state_dir, contents=False) == reference  # no COW file, no partial
    assert site_digests(bed, "dr") == {d: digest(f"/dev/mapper/{d}") for d in bed.devices}


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_lost_or_corrupt_state_store_is_rebuilt_and_no_site_loses_its_place(
    bed: Bed, workdir: Path, damage: str
) -> None:
    bed.add_device("pa")
    bed.add_site("dr")
    vault = workdir / "vault"
    vault.mkdir()
    bed.add_site("vault", transport="dir", path=str(vault))
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_raw("/dev/mapper/pa", [2, 9])
    bed.cli("sync", bed.group)  # both sites hold cut 2
    write_raw("/dev/mapper/pa", [4, 30])
    db = StateDir(bed.state_dir).db
    if damage == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"\x5a" * 20000)
    result = bed.cli("sync", bed.group)  # no AssertionError, no traceback: exit 0
    said = result.stdout + result.stderr
    for site in ("dr", "vault"):
        assert f"site {site}: holds cut 2, which the state store does not know" in said, said
        assert f"site {site}: in sync, holds cut 3" in result.stdout, said
    assert "site dr: in sync, holds cut 3; seeded" in result.stdout  # by compare
    if damage == "garbage":
        (aside,) = bed.state_dir.glob("state.db.corrupt-*")
        assert aside.read_bytes() == b"\x5a" * 20000
        assert f"warning: {db} is corrupt" in result.stderr
    assert site_digests(bed, "dr") == {"pa": digest("/dev/mapper/pa")}
    assert (vault / f"{bed.group}.0000000003.full.delta").exists()
    write_raw("/dev/mapper/pa", [5])
    result = bed.cli("sync", bed.group)  # back to deltas from the rebuilt store
    assert "seeded" not in result.stdout, result.stdout
    assert "site dr: in sync, holds cut 4; applied cuts 4" in result.stdout, result.stdout
    assert site_digests(bed, "dr") == {"pa": digest("/dev/mapper/pa")}
    cursors = {s["site"]: s["cursor"] for s in site_cursors(bed)}
    assert cursors == {"dr": 4, "vault": 4}


def test_a_resync_killed_after_its_commit_is_replayed_though_its_spool_file_is_removed(
    bed: Bed,
) -> None:
    """The journal refers to the spool file it applies (linked as its payload). A resync
    delta lives in the spool's `resync/` only until delivered, and the next run removes
    every undelivered one before the sites recover: the commit must still be finished."""
    bed.group_fields["spool_size"] = "64KiB"  # any delta passes the cap: sites resync
    bed.add_device("pa")
    bed.add_site("dr")
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_raw("/dev/mapper/pa", [3, 9, 20])
    bed.killed_at("journal-committed", "sync", bed.group)
    resync = StateDir(bed.state_dir).resync(bed.group)
    assert [p.name for p in resync.iterdir()], "the killed cycle delivered a resync delta"
    result = bed.cli("sync", bed.group)
    said = result.stdout + result.stderr
    assert "capture of a cut never recorded" in said, said  # the resync file went first
    assert "site dr: finished applying cut 2 from its journal" in said, said
    assert "site dr: in sync" in result.stdout, said
    assert site_digests(bed, "dr") == {"pa": digest("/dev/mapper/pa")}
    assert not list(StateDir(bed.state_dir).journals.glob("*.payload"))
