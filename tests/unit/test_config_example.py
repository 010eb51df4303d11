"""`dmrepl config example`: it parses, sets every key the parser takes, and docs/configuration.md
lists exactly those keys ("Every key")."""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from dmrepl import config
from dmrepl.config import example_text, parse_config
from dmrepl.sites.registry import TRANSPORTS
from tests.clirun import run_cli_here

DOC = Path(__file__).resolve().parents[2] / "docs/configuration.md"
GROUP, DEVICE, SITE = "[group.G]", "[group.G.device.D]", "[group.G.site.S]"
_ROW = re.compile(r"^\| `(\[[^]]+\])` \| `([a-z_.]+)` \|")


def accepted() -> set[tuple[str, str]]:
    """(table, key) of every key the parser reads; fall_behind's as `fall_behind.KEY`."""
    site_keys = config._SITE_KEYS.union(*(t.spec.KEYS for t in TRANSPORTS.values()))
    return (
        {("[dmrepl]", key) for key in config._DMREPL_KEYS}
        # `device` and `site` hold the tables below, not values
        | {(GROUP, key) for key in config._GROUP_KEYS - {"device", "site"}}
        | {(DEVICE, key) for key in config._DEVICE_KEYS}
        | {(SITE, key) for key in site_keys - {"fall_behind"}}
        | {(SITE, f"fall_behind.{key}") for key in config._FALL_BEHIND_KEYS}
        | {("[receive.G]", key) for key in config._RECEIVE_KEYS}
    )


def site_keys(site: dict[str, Any]) -> set[str]:
    keys = set(site) - {"fall_behind"}
    return keys | {f"fall_behind.{key}" for key in site.get("fall_behind", {})}


def example_keys() -> set[tuple[str, str]]:
    """(table, key) of every key the example sets."""
    raw = tomllib.loads(example_text())
    found = {("[dmrepl]", key) for key in raw["dmrepl"]}
    for group in raw["group"].values():
        found |= {(GROUP, key) for key in group if key not in ("device", "site")}
        for device in group["device"].values():
            found |= {(DEVICE, key) for key in device}
        for site in group["site"].values():
            found |= {(SITE, key) for key in site_keys(site)}
    for grant in raw["receive"].values():
        found |= {("[receive.G]", key) for key in grant}
    return found


def documented() -> set[tuple[str, str]]:
    """(table, key) of every row of docs/configuration.md's "Every key" table."""
    return {m.group(1, 2) for line in DOC.read_text().splitlines() if (m := _ROW.match(line))}


def test_example_parses() -> None:
    parsed = parse_config(example_text(), Path("example.toml"))
    assert set(parsed.groups) == {"db"} and set(parsed.receive) == {"web"}
    assert {site.transport for site in parsed.groups["db"].sites} == set(TRANSPORTS)


def test_example_passes_check_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dmrepl.toml"
    path.write_text(example_text())
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # parse only: no device is looked at
    code, stdout, stderr = run_cli_here("check-config", "--config", str(path))
    assert code == 0, stderr
    assert "1 group(s), 2 device(s)" in stdout


def test_example_sets_every_key() -> None:
    assert example_keys() == accepted()


def test_example_sets_every_key_of_each_transport() -> None:
    sites = tomllib.loads(example_text())["group"]["db"]["site"].values()
    for transport in TRANSPORTS.values():
        used = [site_keys(s) for s in sites if s["transport"] == transport.name]
        assert used, f"no {transport.name} site in the example"
        assert set().union(*used) >= transport.spec.KEYS, transport.name


def test_docs_list_exactly_the_keys() -> None:
    doc = documented()
    assert doc, f"no key table found in {DOC}"
    assert sorted(accepted() - doc) == [], "keys the docs do not list"
    assert sorted(doc - accepted()) == [], "keys the docs list that the parser does not take"


def test_command_prints_the_example() -> None:
    code, stdout, _ = run_cli_here("config", "example")
    assert code == 0
    assert stdout == example_text()
    assert stdout.startswith("# dmrepl configuration")
