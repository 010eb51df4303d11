"""After `promote`, the receiver takes no delivery of that group; a promotion needs the group
configured over the replicas."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl import wire
from dmrepl.config import parse_config
from dmrepl.errors import InvalidInput
from dmrepl.executor import Runner
from dmrepl.promote import promote
from dmrepl.serve import Refused, _accept
from dmrepl.statedir import StateDir


def receiver(tmp_path: Path, *, group: bool) -> Path:
    lines = ["[dmrepl]", f'state_dir = "{tmp_path / "state"}"', "[receive.db.replica]",
             'data = "/dev/vdx"']  # fmt: skip
    if group:
        lines += ["[group.db.device.data]", 'origin = "/dev/vdy"', 'metadata = "/dev/vdz"']
    path = tmp_path / "receiver.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def hello() -> dict[str, object]:
    return {"op": "hello", "protocol": wire.PROTOCOL, "group": "db", "site": "dr",
            "devices": [["data", 2048]]}  # fmt: skip


def test_a_promoted_group_takes_no_delivery(tmp_path: Path) -> None:
    path = receiver(tmp_path, group=False)
    config = parse_config(path.read_text(), path)
    assert _accept(hello(), config, ("db",)).name == "dr"
    marker = StateDir(config.state_dir).promoted("db")
    marker.parent.mkdir(parents=True)
    marker.write_text('{"cut": 4}')
    with pytest.raises(Refused, match="was promoted on this host"):
        _accept(hello(), config, ("db",))


def test_promotion_needs_the_group_over_the_replicas(tmp_path: Path) -> None:
    path = receiver(tmp_path, group=False)
    config = parse_config(path.read_text(), path)
    with pytest.raises(InvalidInput, match=r"has no \[group.db\] to promote"):
        promote(Runner(), config, "db", "dr", force=True)
    path = receiver(tmp_path, group=True)
    config = parse_config(path.read_text(), path)
    with pytest.raises(InvalidInput, match="must be its replicas"):
        promote(Runner(), config, "db", "dr", force=True)
    assert not StateDir(config.state_dir).promoted("db").exists()  # nothing was recorded
