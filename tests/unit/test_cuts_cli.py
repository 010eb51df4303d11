"""`dmrepl cuts GROUP --site S [--json]`: the cuts a `dir` site can restore, from its
directory (before and after pruning), and the one cut another site holds."""

from __future__ import annotations

import json
from pathlib import Path

from dmrepl import compact, retention
from dmrepl.errors import ExitCode
from tests.clirun import run_cli_here
from tests.unit.test_compact import chain

CONFIG = """
[dmrepl]
state_dir = "{root}/state"

[group.g.device.a]
origin = "/dev/vdb"
metadata = "/dev/vdc"

[group.g.device.b]
origin = "/dev/vdd"
metadata = "/dev/vdc"
metadata_offset = "8MiB"

[group.g.site.vault]
transport = "dir"
path = "{root}/vault"
keep = "10s:3"

[group.g.site.dr]
transport = "blockdev"
[group.g.site.dr.replica]
a = "/dev/vdx"
b = "/dev/vdy"
"""


def setup(tmp_path: Path) -> Path:
    (tmp_path / "vault").mkdir()
    config = tmp_path / "dmrepl.toml"
    config.write_text(CONFIG.format(root=tmp_path))
    return config


def test_cuts_lists_every_restorable_cut_of_a_dir_site(tmp_path: Path) -> None:
    config = setup(tmp_path)
    chain(tmp_path / "vault", [0.0, 10.0, 15.0, 25.0])
    code, stdout, _ = run_cli_here("cuts", "g", "--site", "vault", "--config", str(config))
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == "site vault of g (dir, keep 10s:3): 4 cuts to restore"
    assert lines[1].startswith("  cut 1  ") and "full image g.0000000001.full.delta" in lines[1]
    assert lines[4].endswith("g.0000000004.0000000003.delta (4 files from g.0000000001.full.delta)")
    compact.prune(tmp_path / "vault", "g", retention.parse_grid("10s:3"), lambda _: None)
    code, stdout, _ = run_cli_here(
        "cuts", "g", "--site", "vault", "--config", str(config), "--json"
    )
    assert code == 0
    doc = json.loads(stdout)
    assert (doc["held"], doc["keep"], doc["transport"]) == (4, "10s:3", "dir")
    assert [(c["seq"], c["created"], c["full"]) for c in doc["cuts"]] == [
        (1, 0.0, True),
        (3, 15.0, False),
        (4, 25.0, False),
    ]
    assert doc["cuts"][1]["files"] == ["g.0000000001.full.delta", "g.0000000003.0000000001.delta"]


def test_cuts_of_another_site_says_the_cut_it_holds(tmp_path: Path) -> None:
    config = setup(tmp_path)
    code, stdout, _ = run_cli_here("cuts", "g", "--site", "dr", "--config", str(config))
    assert (code, stdout) == (0, "site dr of g (blockdev): holds no whole cut\n")
    code, stdout, _ = run_cli_here("cuts", "g", "--site", "dr", "--config", str(config), "--json")
    assert json.loads(stdout)["held"] is None and json.loads(stdout)["cuts"] is None


def test_cuts_refuses_an_unknown_site_or_a_missing_directory(tmp_path: Path) -> None:
    config = setup(tmp_path)
    code, _, stderr = run_cli_here("cuts", "g", "--site", "nope", "--config", str(config))
    assert code == ExitCode.INVALID_INPUT and "group g has no site 'nope'" in stderr
    (tmp_path / "vault").rmdir()
    code, _, stderr = run_cli_here("cuts", "g", "--site", "vault", "--config", str(config))
    assert code == ExitCode.INVALID_INPUT and "is not a directory" in stderr
    assert not (tmp_path / "state").exists()  # it creates nothing
