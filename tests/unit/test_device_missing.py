"""A configured device whose path does not probe stops sync/seed/changes before anything is
touched (report finding 1: F09, F13). No kernel needed: the refusal comes before any command."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from dmrepl import builder, executor, loop
from dmrepl.ops import Op, Result
from tests.clirun import run_cli_here


def write_config(tmp_path: Path, origin: str) -> Path:
    metadata = tmp_path / "meta.img"  # a regular file: not a block device either
    metadata.write_bytes(b"\0" * 4096)
    replica = tmp_path / "replica.img"
    replica.write_bytes(b"\0" * 4096)
    (tmp_path / "vault").mkdir()
    config = tmp_path / "dmrepl.toml"
    config.write_text(
        f"""
[dmrepl]
state_dir = "{tmp_path / "state"}"
[group.db.device.data]
origin = "{origin}"
metadata = "{metadata}"
[group.db.site.dr]
transport = "blockdev"
[group.db.site.dr.replica]
data = "{replica}"
[group.db.site.vault]
transport = "dir"
path = "{tmp_path / "vault"}"
"""
    )
    return config


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` with a hash of its bytes (directories as 'dir')."""
    found = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@pytest.fixture(autouse=True)
def no_kernel_contact(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: executor.Runner, op: Op, **_: object) -> Result:
        raise AssertionError(f"ran {op.render()} before refusing")

    monkeypatch.setattr(executor.Runner, "run", refuse)
    # These tests model a host with device-mapper (on one without, the answer is exit 6 first).
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: True)


@pytest.mark.parametrize(
    "args",
    [("sync", "db"), ("seed", "db", "--site", "dr"), ("changes", "db"), ("sync",)],
    ids=["sync", "seed", "changes", "sync-all-groups"],
)
def test_a_device_path_that_does_not_exist_refuses_with_exit_11_and_touches_nothing(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    config = write_config(tmp_path, "/dev/disk/by-id/dmrepl-typo")
    before = tree_digest(tmp_path)
    code, out, err = run_cli_here(*args, "--config", str(config))
    assert code == 11, out + err
    assert "group.db.device.data: origin /dev/disk/by-id/dmrepl-typo does not exist" in err
    assert f"metadata device {tmp_path / 'meta.img'} is not a block device" in err
    assert "nothing was changed" in err and f"fix the path in {config}" in err
    assert "cut" not in out
    assert tree_digest(tmp_path) == before  # no state dir, lock, journal, spool or delta file


def test_an_existing_state_is_left_as_it_was(tmp_path: Path) -> None:
    config = write_config(tmp_path, str(tmp_path / "not-a-disk"))
    (tmp_path / "not-a-disk").write_bytes(b"x")
    state = tmp_path / "state"
    (state / "journal").mkdir(parents=True)
    (state / "journal" / "db.dr.journal").write_bytes(b"J" * 8192)
    (state / "state.db").write_bytes(b"kept as it is")
    before = tree_digest(tmp_path)
    code, _out, err = run_cli_here("sync", "db", "--config", str(config))
    assert code == 11
    assert f"origin {tmp_path / 'not-a-disk'} is not a block device" in err
    assert tree_digest(tmp_path) == before


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_status_names_a_device_that_does_not_probe_and_exits_11(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    """F14: status used to exit 0 and leave the device out without a word."""
    monkeypatch.setattr(builder, "status", lambda *_args: [])  # the kernel part: no stacks up
    config = write_config(tmp_path, "/dev/disk/by-id/dmrepl-typo")
    args = ("status", "--json") if as_json else ("status",)
    code, out, err = run_cli_here(*args, "--config", str(config))
    assert code == 11, out + err
    assert "group.db.device.data: origin /dev/disk/by-id/dmrepl-typo does not exist" in err
    assert "sync, seed and changes refuse to run" in err
    if as_json:
        shown = json.loads(out)
        assert shown["missing_devices"][0].startswith("group.db.device.data: origin ")
        assert [site["site"] for site in shown["sites"]] == ["dr", "vault"]
    else:
        assert "site db/dr" in out  # what status can show is still shown
