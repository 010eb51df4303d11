"""`--dry-run` on every mutating command changes nothing: every dm table and status, every
file under the state directories and sites, and every origin, replica and target, byte for
byte, are the same before and after, on the primary and on a DR host around a failover."""

from __future__ import annotations

import difflib
import hashlib
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.clirun import run_cli_here
from tests.kernel.stacks import Bed
from tests.kernel.test_failback import dr_host
from tests.kernel.test_replicate import MiB, digest, write_raw

# "<name>: <start> <length> era <metadata block sectors> <used>/<total> <era> <held root>"
ERA_METADATA_USED = re.compile(r"^((?:\S+: )?\d+ \d+ era \d+ )\d+(?=/)", re.MULTILINE)

GATE = "/dev/mapper/fo"


@dataclass(frozen=True)
class World:
    """What a dry run must leave as it found it."""

    dm: str  # every device's table, status, suspended state and open count
    files: dict[str, str]  # every file and directory under the watched directories
    devices: dict[str, str]  # device -> sha256

    @classmethod
    def of(cls, directories: list[Path], devices: list[str]) -> World:
        def dmsetup(*args: str) -> str:
            return subprocess.run(["dmsetup", *args], capture_output=True, text=True).stdout

        files: dict[str, str] = {}
        for top in directories:
            files[str(top)] = "exists" if top.exists() else "absent"
            for path in sorted(top.rglob("*")) if top.is_dir() else []:
                files[str(path)] = (
                    hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
                )
        # dm-era digests archived writesets in the background after a resume, which moves
        # its used-metadata count whenever it likes (not the dry run's doing): that count is
        # left out; the era, the held snapshot and everything else are compared.
        status = ERA_METADATA_USED.sub(r"\1?", dmsetup("status"))
        info = dmsetup("info", "-c", "--noheadings", "-o", "name,suspended,open")
        return cls(
            dmsetup("table") + status + info,
            files,
            {device: digest(device) for device in devices},
        )


def dry_runs_change_nothing(
    config: Path, commands: list[list[str]], directories: list[Path], devices: list[str]
) -> dict[str, str]:
    """Run each command with --dry-run; what each printed, by command name."""
    said = {}
    for command in commands:
        before = World.of(directories, devices)
        reads = [] if command[0] == "apply" else ["--config", str(config)]  # apply reads none
        code, stdout, stderr = run_cli_here(*command, "--dry-run", *reads)
        assert code == 0, f"{command}: exit {code}\n{stdout}{stderr}"
        after = World.of(directories, devices)
        changed = "\n".join(
            difflib.unified_diff(before.dm.splitlines(), after.dm.splitlines(), lineterm="")
        )
        assert after == before, f"dmrepl {' '.join(command)} --dry-run changed: {changed}"
        said[" ".join(command[:2])] = stdout
    return said


def test_every_dry_run_changes_nothing_on_the_primary_and_at_the_dr_host(
    bed: Bed, workdir: Path, make_loop: Callable[[str, int], str]
) -> None:
    bed.add_device("fo", origin_mib=16)
    origin = str(bed.devices["fo"]["origin"])
    replica = bed.add_site("dr")["fo"]
    vault = workdir / "vault"
    vault.mkdir()
    bed.add_site("vault", transport="dir", path=str(vault), keep="1h:24")
    bed.cli("up")
    bed.cli("sync", bed.group)
    write_raw(GATE, [1, 5, 9])  # the next cycle has something to ship
    target = make_loop("restore", 16 * MiB)
    group = bed.group
    watched = [bed.state_dir, vault, workdir / "dr-state"]
    devices = [origin, replica, GATE, target]
    said = dry_runs_change_nothing(bed.config, [
        ["up", group], ["sync", group], ["seed", group, "--site", "dr"], ["run", group],
        ["changes", group], ["verify", group, "--site", "dr", "--repair"],
        ["apply", str(vault), "--group", group, "--to", f"fo={target}"],
        ["replica", "open", group, "--site", "dr"], ["replica", "close", group, "--site", "dr"],
        ["replay"], ["switchover", group, "--to", "dr"], ["demote", group, "--site", "dr"],
        ["down", group],
    ], watched, devices)  # fmt: skip
    assert "dmsetup message fo-era 0 take_metadata_snap" in said[f"sync {group}"]
    assert "the targets would hold cut 1" in said[f"apply {vault}"]
    assert "record the demotion" in said[f"switchover {group}"]
    assert "dmsetup remove --retry fo-era" in said[f"switchover {group}"]
    assert "would list what was written after cut 1" in said[f"demote {group}"]

    bed.cli("down")  # the primary is lost; the DR host takes over
    dr = dr_host(bed, replica, make_loop("dr-meta", 4 * MiB), origin)
    said = dry_runs_change_nothing(
        dr, [["promote", group, "--site", "dr"]], watched, [origin, replica]
    )
    assert "would record the promotion at cut 1" in said[f"promote {group}"]
    code, stdout, stderr = run_cli_here("promote", group, "--site", "dr", "--config", str(dr))
    assert code == 0, stdout + stderr
    # One kernel holds both "hosts": the DR host's stack (same dm names) goes down while
    # the old primary's dry runs look at its own.
    assert run_cli_here("down", group, "--config", str(dr))[0] == 0
    dry_runs_change_nothing(bed.config, [["demote", group, "--site", "dr"]], watched, [origin])
    assert bed.cli("demote", group, "--site", "dr").returncode == 0
    assert run_cli_here("up", group, "--config", str(dr))[0] == 0
    record = bed.state_dir / "demoted" / f"{group}.json"
    said = dry_runs_change_nothing(
        dr, [["reverse", group, "--site", "back", "--from", str(record)], ["sync", group]],
        watched, [origin, replica, GATE],
    )  # fmt: skip
    assert "site back would be placed at cut 1" in said[f"reverse {group}"]
    assert run_cli_here("down", group, "--config", str(dr))[0] == 0
