"""`dmrepl verify`'s pure parts: pieces to hash, and the ranges that differ."""

from __future__ import annotations

import configparser
from pathlib import Path

from dmrepl import wire
from dmrepl.deltafiles import file_name
from dmrepl.ranges import Extent
from dmrepl.replication.verify import (
    Mismatch,
    VerifyResult,
    differing,
    pieces_of,
    verify_chain,
)
from tests.unit.factories import dir_site, one_device_delta


def test_extents_are_cut_into_pieces_of_at_most_the_piece_size() -> None:
    pieces = pieces_of({"a": [Extent(0, 5000)], "b": [Extent(100, 228), Extent(4096, 4100)]}, 2048)
    assert pieces == [
        ("a", 0, 2048), ("a", 2048, 2048), ("a", 4096, 904),
        ("b", 100, 128), ("b", 4096, 4),
    ]  # fmt: skip


def test_adjacent_differing_pieces_make_one_range_per_device() -> None:
    pieces = [("a", 0, 8), ("a", 8, 8), ("a", 16, 8), ("b", 24, 8), ("b", 40, 8)]
    mine = [b"1", b"2", b"3", b"4", b"5"]
    theirs = [b"x", b"y", b"3", b"z", b"w"]
    assert differing(pieces, mine, theirs) == [
        Mismatch("a", 0, 16),
        Mismatch("b", 24, 8),
        Mismatch("b", 40, 8),
    ]
    assert differing(pieces, mine, mine) == []


def test_a_repair_counts_only_when_it_leaves_nothing_differing() -> None:
    found = [Mismatch("a", 0, 8)]
    assert not VerifyResult("g", "dr", 3, "full", 4096, found).ok
    assert VerifyResult("g", "dr", 3, "full", 4096, found, repaired_bytes=4096).ok
    assert not VerifyResult("g", "dr", 3, "full", 4096, found, 4096, found).ok
    assert VerifyResult("g", "dr", 3, "full", 4096).ok


def test_pieces_cross_the_wire_packed() -> None:
    pieces = [(0, 0, 2048), (1, 2**40, 7)]
    (payload,) = wire.pack_pieces(pieces)
    assert wire.unpack_pieces(payload) == pieces


def test_a_dir_sites_chain_is_whole_until_a_file_is_damaged_or_missing(tmp_path: Path) -> None:
    site = dir_site(tmp_path, group="g")
    for seq, base in ((1, None), (2, 1), (3, 2)):
        data = one_device_delta("g", "d", 2048, seq, base, [(8 * seq, bytes([seq]) * 4096)])
        (tmp_path / file_name("g", seq, base)).write_bytes(data)
    whole = verify_chain("g", site)
    assert (whole.ok, whole.cut, whole.problems) == (True, 3, [])
    second = tmp_path / file_name("g", 2, 1)
    damaged = bytearray(second.read_bytes())
    damaged[-100] ^= 0xFF
    second.write_bytes(bytes(damaged))
    broken = verify_chain("g", site)
    assert not broken.ok and broken.problems[0].startswith(second.name)
    second.unlink()
    gap = verify_chain("g", site)
    assert gap.problems == [
        "no full image is followed by deltas up to cut 3: `dmrepl apply` cannot rebuild it "
        "(a missing or misnamed file)"
    ]


def test_the_replay_unit_runs_dmrepl_replay_once_at_boot() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(Path(__file__).resolve().parents[2] / "contrib/systemd/dmrepl-replay.service")
    service = unit["Service"]
    assert service["Type"] == "oneshot" and service["RemainAfterExit"] == "yes"
    assert service["ExecStart"].split()[1:3] == ["replay", "--config"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
