"""The stack builder on the real kernel: up, down, rebuild on existing metadata, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dmrepl import era
from dmrepl.demo import write_random
from dmrepl.state import StateStore
from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed, dm_names, read_bytes

MiB = 2**20
GOLDEN = Path(__file__).parent.parent / "data" / "golden"


def status_json(bed: Bed) -> list[dict[str, object]]:
    result: list[dict[str, object]] = json.loads(bed.cli("status", "--json").stdout)["devices"]
    return result


def test_up_write_down_up_keeps_data_and_tracking(bed: Bed) -> None:
    bed.add_device("a")
    first = bed.cli("up")
    assert "new metadata" in first.stdout
    assert bed.owned() == ["a", "a-access", "a-era", "a-meta", "a-orig"]
    gate = "/dev/mapper/a"
    write_random(gate, 5 * MiB, 128 * 1024)
    written = read_bytes(gate, 5 * MiB, 128 * 1024)
    (before,) = status_json(bed)
    assert all(layer["present"] and layer["matches"] for layer in before["layers"])  # type: ignore[index,union-attr]
    era_before = before["era"]["current_era"]  # type: ignore[index]

    bed.cli("down")
    assert bed.owned() == []
    again = bed.cli("up")
    assert "reusing existing metadata" in again.stdout
    store = StateStore(bed.workdir / "state")
    kinds = [(e.kind, e.detail.split(" (")[0]) for e in reversed(store.events(bed.group))]
    store.close()
    assert kinds == [
        ("metadata", "a: new metadata"),
        ("up", "stack built"),
        ("metadata", "a: reusing existing metadata"),
        ("up", "stack built"),
    ]

    assert read_bytes(gate, 5 * MiB, 128 * 1024) == written
    (after,) = status_json(bed)
    assert after["era"]["current_era"] >= era_before  # type: ignore[index]
    assert all(layer["present"] and layer["matches"] for layer in after["layers"])  # type: ignore[index,union-attr]
    # Tracking survived the rebuild: era 1 onwards still lists the blocks written before down.
    with era.metadata_snapshot(bed.runner, "a-era"):
        changed = era.written_since(bed.runner, "/dev/mapper/a-access", 1)
    block = 64 * 1024
    assert [(e.begin, e.end) for e in changed] == [
        (5 * MiB // block, (5 * MiB + 128 * 1024) // block)
    ]


def test_up_is_idempotent_and_refuses_a_differing_stack(bed: Bed) -> None:
    bed.add_device("b")
    bed.cli("up")
    again = bed.cli("up")
    assert "nothing to do" in again.stdout and "already as configured" in again.stdout
    bed.devices["b"]["block_size"] = "128KiB"
    bed.write()
    names = dm_names(bed.runner)
    differs = bed.cli("up", check=False)
    assert differs.returncode == 15
    assert "b-era differs from the configuration" in differs.stderr
    assert "running:" in differs.stderr and "wanted:" in differs.stderr
    assert dm_names(bed.runner) == names


def test_down_refuses_open_gate_unless_forced(bed: Bed) -> None:
    bed.add_device("c")
    bed.cli("up")
    holder = open("/dev/mapper/c", "rb")  # noqa: SIM115 - held open across the calls below
    try:
        refused = bed.cli("down", check=False)
        assert refused.returncode == 15
        assert "is open" in refused.stderr
        assert "c" in bed.owned()
        forced = bed.cli("down", "--force")
        assert "deferred" in forced.stdout
    finally:
        holder.close()
    deadline = time.monotonic() + 60  # the kernel removes deferred devices once closed
    while bed.owned() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert bed.owned() == []


def test_dry_run_is_stable_and_creates_nothing(bed: Bed) -> None:
    device = bed.add_device("d")
    names = dm_names(bed.runner)
    done = bed.cli("up", "--dry-run")
    assert dm_names(bed.runner) == names
    text = (
        done.stdout.replace(str(device["origin"]), "ORIGIN")
        .replace(str(device["metadata"]), "METADATA")
        .replace(bed.group, "GROUP")
    )
    golden = (GOLDEN / "up-dry-run.txt").read_text()
    assert text == golden, f"dry-run output changed:\n{text}"


def fail_leg(bed: Bed, name: str, sectors: int) -> None:
    """Swap a leg's table for `error`, as a dying disk would look."""
    for args in (["suspend", name], ["reload", name], ["resume", name]):
        stdin = f"0 {sectors} error\n" if args[0] == "reload" else None
        subprocess.run(["dmsetup", *args], input=stdin, text=True, check=True)


def test_mirror_legs_get_every_write_and_a_failed_leg_shows(bed: Bed) -> None:
    sectors = 16 * MiB // 512
    legs = []
    for index in (1, 2):
        loop_dev = bed.make_loop(f"leg{index}", 16 * MiB)
        name = f"{bed.group}-leg{index}"
        subprocess.run(
            ["dmsetup", "create", name, "--uuid", f"KT-{name}"],
            input=f"0 {sectors} linear {loop_dev} 0\n",
            text=True,
            check=True,
        )
        legs.append(name)
    try:
        device = bed.add_device(
            "m", origin_mib=16, mirror_legs=[f"/dev/mapper/{leg}" for leg in legs]
        )
        bed.cli("up")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            mirror = status_json(bed)[0]["mirror"]
            if mirror and mirror["in_sync"] == mirror["regions"]:  # type: ignore[index]
                break
            time.sleep(0.5)
        assert mirror["legs"] == ["A", "A", "A"]  # type: ignore[index]
        write_random("/dev/mapper/m", 3 * MiB, 256 * 1024)
        expected = read_bytes("/dev/mapper/m", 3 * MiB, 256 * 1024)
        for path in [str(device["origin"])] + [f"/dev/mapper/{leg}" for leg in legs]:
            assert read_bytes(path, 3 * MiB, 256 * 1024) == expected, path

        fail_leg(bed, legs[1], sectors)
        write_random("/dev/mapper/m", 7 * MiB, 64 * 1024)  # completes on the surviving legs
        health = status_json(bed)[0]["mirror"]["legs"]  # type: ignore[index]
        assert health == ["A", "A", "D"]
        shown = bed.cli("status").stdout
        assert "D" in shown and "failed" in shown
    finally:
        bed.teardown()
        for leg in legs:
            subprocess.run(["dmsetup", "remove", leg], check=False)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing origin", 11, "does not exist"),
        ("origin not a block device", 11, "is not a block device"),
        ("origin mounted", 12, "is mounted on"),
        ("origin held by another device", 12, "is in use by dm-"),
        ("metadata on the origin", 13, "metadata area overlaps the origin"),
        ("metadata areas overlap", 13, "metadata areas overlap"),
        ("metadata too small", 14, "below the minimum"),
        ("bad era block size", 3, "not a multiple of 8"),
        ("duplicate names", 3, "also used by"),
        ("name taken by a foreign dm device", 15, "is not dmrepl's"),
        ("foreign data in the metadata area", 15, "not dm-era metadata"),
    ],
)
def test_bad_input_is_refused_and_nothing_is_created(
    bed: Bed, workdir: Path, case: str, code: int, message: str
) -> None:
    device = bed.add_device("e")
    undo: list[list[str]] = []
    if case == "missing origin":
        device["origin"] = "/dev/nonexistent-disk"
    elif case == "origin not a block device":
        regular = workdir / "plain-file"
        regular.write_bytes(b"x" * 4096)
        device["origin"] = str(regular)
    elif case == "origin mounted":
        subprocess.run(["mkfs.ext4", "-q", str(device["origin"])], check=True)
        mountpoint = workdir / "mnt"
        mountpoint.mkdir()
        subprocess.run(["mount", str(device["origin"]), str(mountpoint)], check=True)
        undo.append(["umount", str(mountpoint)])
    elif case == "origin held by another device":
        holder = f"{bed.group}-holder"
        subprocess.run(
            ["dmsetup", "create", holder], input=f"0 8 linear {device['origin']} 0\n", text=True,
            check=True,
        )  # fmt: skip
        undo.append(["dmsetup", "remove", holder])
    elif case == "metadata on the origin":
        # Through a link: the same path twice is already a configuration error (exit 3); the
        # safety check must see that two paths name one device.
        alias = workdir / "origin-alias"
        alias.symlink_to(str(device["origin"]))
        device["metadata"] = str(alias)
    elif case == "metadata areas overlap":
        other = bed.add_device("f")
        other["metadata"] = device["metadata"]
        other["metadata_offset"] = "512KiB"  # inside e's 1 MiB area
    elif case == "metadata too small":
        device["metadata_size"] = "64KiB"
    elif case == "bad era block size":
        device["block_size"] = "12s"
    elif case == "name taken by a foreign dm device":
        subprocess.run(["dmsetup", "create", "e-era"], input="0 8 zero\n", text=True, check=True)
        undo.append(["dmsetup", "remove", "e-era"])
    elif case == "foreign data in the metadata area":
        with open(str(device["metadata"]), "r+b") as disk:
            disk.write(b"not dm-era metadata" * 100)
            disk.flush()
            os.fsync(disk.fileno())
    bed.write()
    if case == "duplicate names":
        with bed.config.open("a") as extra:
            extra.write('[group.other.device.e]\norigin = "/dev/x"\nmetadata = "/dev/y"\n')
    names = dm_names(bed.runner)
    try:
        got, _out, err = run_cli_here("up", "--config", str(bed.config))
        assert got == code, err
        assert message in err
        assert "hint" in err
        assert dm_names(bed.runner) == names
    finally:
        for argv in undo:
            subprocess.run(argv, check=False)


def wrapped_dmsetup(workdir: Path, delay_s: float) -> dict[str, str]:
    """An environment whose `dmsetup` sleeps before every create, to stop `up` half way."""
    bindir = workdir / "slowbin"
    bindir.mkdir(exist_ok=True)
    real = subprocess.run(["which", "dmsetup"], capture_output=True, text=True).stdout.strip()
    wrapper = bindir / "dmsetup"
    wrapper.write_text(
        f'#!/bin/sh\nif [ "$1" = create ]; then sleep {delay_s}; fi\nexec {real} "$@"\n'
    )
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def start_up(bed: Bed, env: dict[str, str]) -> subprocess.Popen[str]:
    """`dmrepl up` in a process group of its own (so a crash can take its commands with it)."""
    return subprocess.Popen(
        [sys.executable, "-m", "dmrepl", "up", "--config", str(bed.config)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def wait_for_layers(bed: Bed, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while len(bed.owned()) < count:
        assert process.poll() is None, "up finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_half_way_leaves_nothing(bed: Bed, workdir: Path) -> None:
    bed.add_device("g")
    process = start_up(bed, wrapped_dmsetup(workdir, 0.7))
    wait_for_layers(bed, 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "SIGTERM" in err
    assert bed.owned() == []


@pytest.mark.parametrize("repair", ["up", "down"])
def test_kill_9_half_way_is_repaired_by_the_next_run(bed: Bed, workdir: Path, repair: str) -> None:
    bed.add_device("h")
    process = start_up(bed, wrapped_dmsetup(workdir, 0.7))
    wait_for_layers(bed, 3, process)
    # A crash: dmrepl and the dmsetup it is running die together. Killing dmrepl alone
    # would leave that dmsetup to create a device after the repair has run.
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    half = bed.owned()
    assert 3 <= len(half) < 5, half
    bed.cli(repair)
    if repair == "down":
        assert bed.owned() == []
    else:
        assert bed.owned() == ["h", "h-access", "h-era", "h-meta", "h-orig"]
        (state,) = status_json(bed)
        assert all(layer["matches"] for layer in state["layers"])  # type: ignore[index,union-attr]
