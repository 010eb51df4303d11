"""Compaction at a `dir` site (dmrepl.compact): merging two deltas, pruning to a `keep` grid,
a crash between publishing a merge and deleting its inputs, and the `keep` key."""

from __future__ import annotations

import io
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmrepl import compact, delta, deltafiles, retention
from dmrepl.config import ConfigError, parse_config
from dmrepl.deltafiles import DeltaFile
from dmrepl.rebuild import apply_dir
from dmrepl.signals import Say
from dmrepl.sites import SiteContext
from dmrepl.sites.archive import ArchiveSite, DirSiteSpec
from dmrepl.statedir import StateDir
from tests.unit.factories import receiver

SECTORS = 64  # 32 KiB devices
DEVICES = ("a", "b")
Write = tuple[int, int, int, int]  # device index, offset (sectors), length (sectors), byte


def make(
    seq: int, base: int | None, writes: Sequence[Write], created: float = 0.0, group: str = "g"
) -> bytes:
    """A delta of devices a and b (cut N ends at era 10 * N) holding `writes`."""
    base_era = None if base is None else 10 * base + 1
    header = delta.DeltaHeader(
        group=group,
        seq=seq,
        base_seq=base,
        devices=tuple(delta.DeltaDevice(n, SECTORS, base_era, 10 * seq) for n in DEVICES),
        created=created,
    )
    out = io.BytesIO()
    writer = delta.DeltaWriter(out, header)
    for device, offset, length, byte in writes:
        writer.add(device, offset, bytes([byte]) * length * 512)
    writer.finish()
    return out.getvalue()


def put(directory: Path, seq: int, base: int | None, data: bytes) -> DeltaFile:
    path = directory / deltafiles.file_name("g", seq, base)
    path.write_bytes(data)
    return DeltaFile(seq, base, path, len(data))


def applied(paths: Sequence[Path]) -> list[bytearray]:
    """The devices after applying the delta files in turn, in memory (a full image zeroes)."""
    images = [bytearray(SECTORS * 512) for _ in DEVICES]
    for path in paths:
        with path.open("rb") as stream:
            header = delta.read_header(stream, str(path))
            if header.base_seq is None:
                images = [bytearray(SECTORS * 512) for _ in DEVICES]
            for record in delta.records(stream, header, str(path)):
                start = record.offset * 512
                images[record.device][start : start + len(record.data)] = record.data
    return images


writes = st.lists(
    st.tuples(
        st.integers(0, 1), st.integers(0, SECTORS - 1), st.integers(1, 16), st.integers(1, 255)
    ).map(lambda w: (w[0], w[1], min(w[2], SECTORS - w[1]), w[3])),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(first=writes, second=writes, full=st.booleans())
def test_a_merged_delta_does_what_the_two_did_in_turn(
    first: list[Write], second: list[Write], full: bool
) -> None:
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        base = None if full else 1
        one = put(directory, 2, base, make(2, base, first, created=5.0))
        two = put(directory, 3, 2, make(3, 2, second, created=9.0))
        merged = compact.merge(directory, one, two)
        assert (merged.seq, merged.base_seq) == (3, base)
        assert applied([merged.path]) == applied([one.path, two.path])
        with merged.path.open("rb") as stream:
            header, summary = delta.verify(stream, "merged")
        assert header.created == 9.0
        eras = [(d.base_era, d.target_era) for d in header.devices]
        assert eras == [(None if full else 11, 30)] * 2
        # Of the first delta, only what the second does not overwrite is carried over.
        overwritten = {(d, o + i) for d, o, n, _ in second for i in range(n)}
        kept = sum((d, o + i) not in overwritten for d, o, n, _ in first for i in range(n))
        assert summary.data_bytes == (kept + sum(n for _, _, n, _ in second)) * 512


def test_a_corrupt_input_stops_the_merge_and_leaves_no_file(tmp_path: Path) -> None:
    one = put(tmp_path, 2, 1, make(2, 1, [(0, 0, 4, 1)]))
    bad = bytearray(make(3, 2, [(0, 2, 4, 2)]))
    bad[-30] ^= 1
    two = put(tmp_path, 3, 2, bytes(bad))
    with pytest.raises(delta.CorruptDelta):
        compact.merge(tmp_path, one, two)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([one.path.name, two.path.name])


def test_deltas_that_do_not_follow_each_other_are_not_merged(tmp_path: Path) -> None:
    one = put(tmp_path, 2, 1, make(2, 1, []))
    three = tmp_path / "other"
    three.mkdir()
    gap = put(three, 4, 3, make(4, 3, []))
    with pytest.raises(compact.MergeMismatch, match="starts at cut 3, not at cut 2"):
        compact.merge(tmp_path, one, gap)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == [one.path.name]


def chain(directory: Path, times: Sequence[float]) -> list[list[bytearray]]:
    """Cuts 1..n (a full image, then deltas, each writing its own sectors and sector 0);
    the devices at each cut."""
    states = []
    for seq, created in enumerate(times, start=1):
        base = None if seq == 1 else seq - 1
        put(directory, seq, base, make(seq, base, [(0, 0, 1, seq), (1, seq, 2, seq)], created))
        states.append(applied([f.path for f in deltafiles.routes(files(directory)).to(seq) or []]))
    return states


def files(directory: Path) -> list[DeltaFile]:
    return deltafiles.list_files(directory, "g")


def restore(directory: Path, cut: int, tmp_path: Path) -> list[bytes]:
    """Cut `cut` applied onto image files by `dmrepl apply`'s own code."""
    targets = {}
    for name in DEVICES:
        target = tmp_path / f"{name}.img"
        target.write_bytes(b"\xee" * SECTORS * 512)
        targets[name] = str(target)
    result = apply_dir(directory, "g", targets, to_cut=cut, say=lambda _: None)
    assert result.cut == cut
    return [Path(targets[name]).read_bytes() for name in DEVICES]


def test_prune_keeps_exactly_the_grid_and_each_kept_cut_restores(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    times = [0.0, 10.0, 15.0, 25.0, 31.0, 38.0]  # 10 s intervals 0, 1, 1, 2, 3, 3
    states = chain(vault, times)
    said: list[str] = []
    grid = retention.parse_grid("10s:3")
    done = compact.prune(vault, "g", grid, said.append)
    kept = [3, 4, 6]  # the newest of intervals 1, 2 and 3
    assert deltafiles.routes(files(vault)).cuts == kept
    assert [(f.seq, f.base_seq) for f in files(vault)] == [(3, None), (4, 3), (6, 4)]
    for cut in kept:
        assert restore(vault, cut, tmp_path) == [bytes(image) for image in states[cut - 1]]
    assert len(done.merged) == 3 and len(done.deleted) == 6
    assert any(line.startswith("merged g.0000000005.0000000004.delta and") for line in said)
    assert "deleted g.0000000001.full.delta (no kept cut needs it)" in said
    assert compact.prune(vault, "g", grid, said.append) == compact.Pruned()  # settled


class Killed(BaseException):
    """Stands for a crash: nothing of prune's own runs after it."""


def test_a_crash_after_a_merge_is_published_loses_no_kept_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    states = chain(vault, [0.0, 10.0, 11.0])  # 10 s intervals 0, 1, 1: cut 2 is dropped

    def crash(path: Path) -> None:
        raise Killed

    grid = retention.parse_grid("10s:2")
    with monkeypatch.context() as patch:
        patch.setattr(compact, "delete", crash)
        with pytest.raises(Killed):
            compact.prune(vault, "g", grid, lambda _: None)
    # The merged delta is published; both deltas it replaces are still there.
    names = {(f.seq, f.base_seq) for f in files(vault)}
    assert names == {(1, None), (2, 1), (3, 2), (3, 1)}
    assert not [p for p in vault.iterdir() if p.name.startswith(".")]
    for cut in (1, 3):
        assert restore(vault, cut, tmp_path) == [bytes(image) for image in states[cut - 1]]
    said: list[str] = []
    compact.prune(vault, "g", grid, said.append)
    assert said == [
        "deleted g.0000000003.0000000002.delta (no kept cut needs it)",
        "deleted g.0000000002.0000000001.delta (no kept cut needs it)",
    ]
    assert restore(vault, 3, tmp_path) == [bytes(image) for image in states[2]]


def test_a_dir_site_with_keep_prunes_after_each_delivery(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    said: list[str] = []
    spec = DirSiteSpec(
        "g", "vault", "dir", "asynchronous", str(vault), retention.parse_grid("10s:2")
    )
    site = ArchiveSite(spec, _context(tmp_path, said.append))
    for seq, created in enumerate([0.0, 12.0, 14.0, 16.0], start=1):
        base = None if seq == 1 else seq - 1
        site.receive(io.BytesIO(make(seq, base, [(0, seq, 1, seq)], created)))
        assert site.held() == seq
    assert [(f.seq, f.base_seq) for f in files(vault)] == [(1, None), (4, 1)]
    assert any(line.startswith("site vault: merged ") for line in said)


def test_a_failed_prune_is_said_and_the_delivery_stands(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    bad = bytearray(make(1, None, [(0, 0, 1, 1)], 0.0))
    bad[-30] ^= 1  # the full image is damaged: it cannot be merged
    (vault / deltafiles.file_name("g", 1, None)).write_bytes(bytes(bad))
    said: list[str] = []
    spec = DirSiteSpec(
        "g", "vault", "dir", "asynchronous", str(vault), retention.parse_grid("1s:1")
    )
    site = ArchiveSite(spec, _context(tmp_path, said.append))
    delivery = site.receive(io.BytesIO(make(2, 1, [(0, 2, 1, 2)], 5.0)))
    assert delivery.seq == 2 and site.held() == 2
    assert len(files(vault)) == 2
    assert any("warning: pruning" in line and "corrupt delta" in line for line in said), said


def _context(tmp_path: Path, say: Say) -> SiteContext:
    return SiteContext({n: SECTORS for n in DEVICES}, StateDir(tmp_path / "state"), say)


def test_without_keep_a_dir_site_keeps_every_file(tmp_path: Path) -> None:
    vault = tmp_path / "vault"
    vault.mkdir()
    site = receiver(DirSiteSpec("g", "vault", "dir", "asynchronous", str(vault)), tmp_path)
    for seq in (1, 2, 3):
        site.receive(io.BytesIO(make(seq, None if seq == 1 else seq - 1, [], float(seq))))
    assert len(files(vault)) == 3


SITE = """
[group.db.device.data]
origin = "/dev/vdb"
metadata = "/dev/vdc"

[group.db.site.vault]
transport = "dir"
path = "/srv/vault"
"""


def test_keep_is_read_from_the_configuration() -> None:
    config = parse_config(SITE + 'keep = "1h:24, 1d:7"\n', Path("/x.toml"))
    spec = config.groups["db"].site("vault")
    assert isinstance(spec, DirSiteSpec)
    assert spec.keep == (retention.KeepRule(3600, 24), retention.KeepRule(86400, 7))
    plain = parse_config(SITE, Path("/x.toml")).groups["db"].site("vault")
    assert isinstance(plain, DirSiteSpec) and plain.keep == ()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ('"1x:3"', "group.db.site.vault.keep: interval '1x' in '1x:3': unit x is not one of"),
        ('"1h:0"', "group.db.site.vault.keep: count 0 in '1h:0' keeps nothing"),
        ('"1h:2, 3600s:4"', "group.db.site.vault.keep: '3600s:4' repeats the interval"),
        ("24", "group.db.site.vault.keep: must be a string of INTERVAL:COUNT entries"),
    ],
)
def test_a_bad_keep_is_a_configuration_problem(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(SITE + f"keep = {value}\n", Path("/x.toml"))
    assert [p for p in caught.value.problems if p.startswith(problem)], caught.value.problems


def test_keep_belongs_to_dir_sites_only() -> None:
    text = SITE.replace('transport = "dir"\npath = "/srv/vault"', 'transport = "blockdev"')
    with pytest.raises(ConfigError) as caught:
        parse_config(
            text + 'keep = "1h:2"\n[group.db.site.vault.replica]\ndata = "/dev/x"\n', Path("/x")
        )
    assert (
        'group.db.site.vault.keep: only used with transport = "dir" or transport = "s3"'
        in caught.value.problems
    )
