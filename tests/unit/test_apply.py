"""`dmrepl apply` refuses a chain that does not hold together, before writing a byte (issue 13).

Cases named D.. are those of shared/reports/bad-input-2026-12.md. Targets are regular files;
every refusal hashes the targets before and after.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from dmrepl import applylog, blockio, delta, rebuild
from dmrepl.deltafiles import file_name as delta_file_name
from dmrepl.errors import DmreplError, ExitCode, InvalidInput
from dmrepl.rebuild import apply_dir
from tests.clirun import run_cli_here

SECTORS = 8192  # 4 MiB devices
DEVICE_BYTES = SECTORS * 512
Eras = tuple[int | None, int]  # (base_era, target_era)


def make_delta(
    seq: int,
    base: int | None,
    writes: Iterable[tuple[int, bytes]] = (),
    *,
    eras: Eras | None = None,
    devices: Sequence[str] = ("d",),
    group: str = "g",
) -> bytes:
    """A valid delta; `eras` default to a chain where cut N ends at era 10 * N."""
    base_era, target_era = eras or (None if base is None else 10 * base + 1, 10 * seq)
    header = delta.DeltaHeader(
        group=group,
        seq=seq,
        base_seq=base,
        devices=tuple(delta.DeltaDevice(n, SECTORS, base_era, target_era) for n in devices),
        created=0.0,
    )
    out = io.BytesIO()
    writer = delta.DeltaWriter(out, header)
    for index in range(len(devices)):
        for offset, data in writes:
            writer.add(index, offset, data)
    writer.finish()
    return out.getvalue()


def put(directory: Path, seq: int, base: int | None, data: bytes) -> Path:
    path = directory / delta_file_name("g", seq, base)
    path.write_bytes(data)
    return path


def digest(*paths: Path) -> list[str | None]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None for p in paths]


@pytest.fixture
def vault(tmp_path: Path) -> Path:
    """A good chain: cut 1 (full image), 2 <- 1, 3 <- 2."""
    directory = tmp_path / "vault"
    directory.mkdir()
    put(directory, 1, None, make_delta(1, None, [(0, b"1" * 4096)]))
    put(directory, 2, 1, make_delta(2, 1, [(8, b"2" * 512)]))
    put(directory, 3, 2, make_delta(3, 2, [(16, b"3" * 512)]))
    return directory


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "target.img"
    path.write_bytes(b"\xaa" * DEVICE_BYTES)  # stale data a rebuild must clear
    return path


def quiet(_: str) -> None:
    pass


def refused(
    error: type[DmreplError], code: ExitCode, match: str, watched: Sequence[Path], **kwargs: object
) -> DmreplError:
    """Run apply_dir(**kwargs), expect `error`, and prove the watched files did not change."""
    before = digest(*watched)
    with pytest.raises(error, match=match) as caught:
        apply_dir(say=quiet, **kwargs)  # type: ignore[arg-type]
    assert caught.value.exit_code == code
    assert digest(*watched) == before
    return caught.value


def test_a_good_chain_rebuilds_the_image(vault: Path, target: Path) -> None:
    result = apply_dir(vault, "g", {"d": str(target)}, say=quiet)
    assert (result.applied, result.cut) == ([1, 2, 3], 3)
    image = target.read_bytes()
    assert image[:4096] == b"1" * 4096
    assert image[4096:8192] == b"2" * 512 + bytes(3584)
    assert image[8192:] == b"3" * 512 + bytes(DEVICE_BYTES - 8704)


def test_d13_an_incremental_named_as_a_full_image_is_refused(tmp_path: Path, target: Path) -> None:
    """It used to be applied without zeroing: 1 MiB of stale 0xAA stayed, exit 0."""
    put(tmp_path, 2, None, make_delta(2, 1, [(0, b"5" * 4096)]))
    error = refused(
        rebuild.ChainMismatch, ExitCode.CORRUPT,
        r"name says cut 2 \(full image\), its header says cut 2 from cut 1", [target],
        directory=tmp_path, group="g", targets={"d": str(target)},
    )  # fmt: skip
    assert str(tmp_path / delta_file_name("g", 2, None)) in error.message
    assert error.hint is not None and "nothing was written" in error.hint


def test_d13b_a_full_image_named_as_an_incremental_is_refused(tmp_path: Path, target: Path) -> None:
    """It used to zero the target in the middle of a roll-forward."""
    put(tmp_path, 2, 1, make_delta(9, None, [(0, b"9" * 4096)]))
    refused(
        rebuild.ChainMismatch, ExitCode.CORRUPT,
        r"name says cut 2 from cut 1, its header says cut 9 \(full image\)", [target],
        directory=tmp_path, group="g", targets={"d": str(target)}, from_cut=1,
    )  # fmt: skip


def test_d14_a_header_that_disagrees_with_the_name_is_refused(vault: Path, target: Path) -> None:
    put(vault, 2, 1, make_delta(7, 6, [(8, b"7" * 512)]))
    refused(
        rebuild.ChainMismatch, ExitCode.CORRUPT, "its header says cut 7 from cut 6", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_eras_that_do_not_link_are_refused(vault: Path, target: Path) -> None:
    """Two generations of files sharing names (a rebuilt state store): eras give them away."""
    put(vault, 3, 2, make_delta(3, 2, [(16, b"x" * 512)], eras=(4, 6)))
    refused(
        rebuild.ChainMismatch, ExitCode.CORRUPT,
        "device d starts at era 4, but .*0000000002.0000000001.delta ends at era 20", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_an_incremental_without_base_eras_is_refused(vault: Path, target: Path) -> None:
    put(vault, 3, 2, make_delta(3, 2, eras=(None, 30)))
    refused(
        rebuild.ChainMismatch, ExitCode.CORRUPT, "an incremental delta, but device d has base era",
        [target], directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_devices_that_change_along_the_chain_are_refused(vault: Path, target: Path) -> None:
    put(vault, 3, 2, make_delta(3, 2, devices=("d", "e")))
    refused(
        rebuild.ChainMismatch, ExitCode.CORRUPT, "differ from those of", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_d15_a_corrupt_delta_later_in_the_chain_leaves_the_target_untouched(
    vault: Path, target: Path
) -> None:
    """It used to write cut 1, then fail on delta 2 saying "nothing was applied"."""
    damaged = bytearray((vault / delta_file_name("g", 3, 2)).read_bytes())
    damaged[-40] ^= 1
    (vault / delta_file_name("g", 3, 2)).write_bytes(bytes(damaged))
    refused(
        delta.CorruptDelta, ExitCode.CORRUPT, "checksum mismatch", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_a_merged_delta_beside_the_two_it_replaces_takes_the_shortest_route(
    vault: Path, target: Path
) -> None:
    """What a prune leaves if it is killed between publishing a merge and deleting its
    inputs: two deltas start at cut 1; each cut still has one route."""
    put(vault, 3, 1, make_delta(3, 1, [(8, b"2" * 512), (16, b"3" * 512)], eras=(11, 30)))
    newest = apply_dir(vault, "g", {"d": str(target)}, say=quiet)
    assert (newest.applied, newest.cut) == ([1, 3], 3)
    image = target.read_bytes()
    older = apply_dir(vault, "g", {"d": str(target)}, to_cut=2, say=quiet)
    assert (older.applied, older.cut) == ([1, 2], 2)
    assert target.read_bytes()[:8192] == image[:8192]
    assert target.read_bytes()[8192:8704] == bytes(512)


def test_a_cut_no_longer_held_is_refused_with_the_cuts_there_are(vault: Path, target: Path) -> None:
    (vault / delta_file_name("g", 2, 1)).unlink()
    (vault / delta_file_name("g", 3, 2)).unlink()
    put(vault, 3, 1, make_delta(3, 1, [(8, b"2" * 512)], eras=(11, 30)))
    put(vault, 4, 3, make_delta(4, 3))
    error = refused(
        rebuild.InvalidInput, ExitCode.INVALID_INPUT, "cannot restore cut 2 of group g", [target],
        directory=vault, group="g", targets={"d": str(target)}, to_cut=2,
    )  # fmt: skip
    assert error.hint == "cuts it can restore: 1, 3-4"


@pytest.mark.parametrize("alias", ["same", "symlink", "hardlink"])
def test_d29_two_devices_on_one_target_are_refused(tmp_path: Path, alias: str) -> None:
    put(tmp_path, 1, None, make_delta(1, None, [(0, b"a" * 512)], devices=("a", "b")))
    first = tmp_path / "t.img"
    first.write_bytes(bytes(DEVICE_BYTES))
    second = {"same": first, "symlink": tmp_path / "link", "hardlink": tmp_path / "hard"}[alias]
    if alias == "symlink":
        second.symlink_to(first)
    elif alias == "hardlink":
        os.link(first, second)
    refused(
        rebuild.InvalidInput, ExitCode.INVALID_INPUT, "the targets of a and b are the same device",
        [first], directory=tmp_path, group="g", targets={"a": str(first), "b": str(second)},
    )  # fmt: skip


def test_d21c_a_device_given_twice_on_the_command_line_is_refused(
    vault: Path, target: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.img"
    other.write_bytes(bytes(DEVICE_BYTES))
    before = digest(target, other)
    code, _, stderr = run_cli_here(
        "apply", str(vault), "--group", "g", "--to", f"d={target}", "--to", f"d={other}"
    )
    assert code == ExitCode.INVALID_INPUT
    assert "--to gives device d twice" in stderr
    assert digest(target, other) == before


@pytest.mark.parametrize(
    ("kind", "problem", "code"),
    [
        ("missing", "does not exist", ExitCode.DEVICE_MISSING),
        ("directory", "is a directory", ExitCode.DEVICE_MISSING),
        ("fifo", "is a FIFO", ExitCode.DEVICE_MISSING),
        ("chardev", "is a character device", ExitCode.DEVICE_MISSING),
    ],
)
@pytest.mark.timeout(20)
def test_d17_odd_targets_are_refused(
    vault: Path, tmp_path: Path, kind: str, problem: str, code: ExitCode
) -> None:
    """They used to end in tracebacks (FileNotFoundError, IsADirectoryError)."""
    path = tmp_path / "odd"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "chardev":
        path = Path("/dev/null")
    refused(
        rebuild.TargetProblem, code, problem, list(vault.iterdir()),
        directory=vault, group="g", targets={"d": str(path)},
    )  # fmt: skip


@pytest.mark.timeout(20)
def test_d19_a_fifo_named_like_a_delta_is_refused_without_hanging(
    vault: Path, target: Path
) -> None:
    (vault / delta_file_name("g", 3, 2)).unlink()
    os.mkfifo(vault / delta_file_name("g", 3, 2))
    refused(
        delta.CorruptDelta, ExitCode.CORRUPT, "is not a regular file .a FIFO.", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_d19b_a_directory_named_like_a_delta_is_refused(vault: Path, target: Path) -> None:
    (vault / delta_file_name("g", 3, 2)).unlink()
    (vault / delta_file_name("g", 3, 2)).mkdir()
    refused(
        delta.CorruptDelta, ExitCode.CORRUPT, "is not a regular file .a directory.", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"from_cut": -5}, "--from-cut -5 is not a cut"),
        ({"to_cut": -1}, "--cut -1 is not a cut"),
        ({"from_cut": 2**70}, f"holds no delta of group g from cut {2**70}"),
        ({"from_cut": 9, "to_cut": 10}, "holds no delta of group g from cut 9"),
    ],
)
def test_d22_cuts_the_directory_cannot_serve_are_refused(
    vault: Path, target: Path, options: dict[str, int], problem: str
) -> None:
    """`--from-cut -5` used to exit 0 with "targets hold cut -5"."""
    refused(
        rebuild.InvalidInput, ExitCode.INVALID_INPUT, problem, [target],
        directory=vault, group="g", targets={"d": str(target)}, **options,
    )  # fmt: skip


def test_d23_a_missing_or_plain_file_directory_is_named_as_such(
    tmp_path: Path, target: Path
) -> None:
    refused(
        rebuild.InvalidInput, ExitCode.INVALID_INPUT, "does not exist", [target],
        directory=tmp_path / "nope", group="g", targets={"d": str(target)},
    )  # fmt: skip
    refused(
        rebuild.InvalidInput, ExitCode.INVALID_INPUT, "is not a directory", [target],
        directory=target, group="g", targets={"d": str(target)},
    )  # fmt: skip


def failing_write_after(
    monkeypatch: pytest.MonkeyPatch, writes: int, failure: BaseException | None
) -> None:
    """Make the target writes fail (or a SIGTERM arrive, with failure None) after `writes`."""
    real = blockio.write_at
    count = 0

    def write_at(fd: int, offset: int, data: bytes | memoryview) -> None:
        nonlocal count
        count += 1
        if count > writes:
            if failure is None:
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise failure
        real(fd, offset, data)

    monkeypatch.setattr(blockio, "write_at", write_at)


def test_s05b_disk_full_half_way_says_what_the_target_holds(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to be a traceback with the target partly written and nothing said."""
    failing_write_after(monkeypatch, 1, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(rebuild.ApplyStopped) as caught:
        apply_dir(vault, "g", {"d": str(target)}, say=quiet)
    message = caught.value.message
    assert "No space left on device" in message
    assert "between cut 1 and cut 2" in message
    assert "--from-cut 1" in (caught.value.hint or "")
    assert caught.value.exit_code == ExitCode.FAILURE


def test_a_failure_in_the_full_image_says_no_cut_is_complete(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_write_after(monkeypatch, 0, OSError(errno.EIO, "Input/output error"))
    with pytest.raises(rebuild.ApplyStopped, match="hold no complete cut"):
        apply_dir(vault, "g", {"d": str(target)}, say=quiet)


def test_sigterm_while_writing_stops_and_says_what_the_target_holds(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put(vault, 3, 2, make_delta(3, 2, [(16, b"3" * 512), (24, b"3" * 512)]))
    failing_write_after(monkeypatch, 2, None)  # during the first record of cut 3
    with pytest.raises(rebuild.ApplyStopped, match="stopped by SIGTERM") as caught:
        apply_dir(vault, "g", {"d": str(target)}, say=quiet)
    assert caught.value.exit_code == ExitCode.INTERRUPTED
    assert "between cut 2 and cut 3" in caught.value.message
    assert "--from-cut 2" in (caught.value.hint or "")


def test_sigterm_between_deltas_stops_at_a_whole_cut(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing_write_after(monkeypatch, 1, None)  # during the only record of cut 2
    with pytest.raises(rebuild.ApplyStopped, match="before cut 3: stopped by SIGTERM") as caught:
        apply_dir(vault, "g", {"d": str(target)}, say=quiet)
    assert caught.value.exit_code == ExitCode.INTERRUPTED
    assert "the targets hold cut 2" in caught.value.message
    assert target.read_bytes()[4096:4608] == b"2" * 512
    assert target.read_bytes()[8192:8704] == bytes(512)  # nothing of cut 3


def test_a_delta_replaced_after_verification_is_not_applied(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = rebuild._verified_chain

    def verify_then_replace(*args: object) -> list[rebuild._Step]:
        steps = real(*args)  # type: ignore[arg-type]
        put(vault, 1, None, make_delta(1, None, [(0, b"X" * 4096)]))
        return steps

    monkeypatch.setattr(rebuild, "_verified_chain", verify_then_replace)
    before = digest(target)
    with pytest.raises(delta.CorruptDelta, match="changed since it was verified; nothing was"):
        apply_dir(vault, "g", {"d": str(target)}, say=quiet)
    assert digest(target) == before


def test_cli_exit_codes_and_messages(vault: Path, target: Path, tmp_path: Path) -> None:
    """Through `dmrepl apply`: D13 exits 16 naming the file; a good chain prints the cut held."""
    d13 = tmp_path / "d13"
    d13.mkdir()
    put(d13, 2, None, make_delta(2, 1, [(0, b"5" * 4096)]))
    before = digest(target)
    code, _, stderr = run_cli_here("apply", str(d13), "--group", "g", "--to", f"d={target}")
    assert code == ExitCode.CORRUPT
    assert "g.0000000002.full.delta: its name says cut 2 (full image)" in " ".join(stderr.split())
    assert digest(target) == before
    code, stdout, _ = run_cli_here("apply", str(vault), "--group", "g", "--to", f"d={target}")
    assert code == 0
    assert "targets hold cut 3 of g (3 deltas" in stdout


def test_an_image_file_attached_to_a_loop_device_is_refused(
    vault: Path, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Writing under a loop device (perhaps mounted) would corrupt what uses it."""
    sys_block = tmp_path / "sys-block"
    (sys_block / "loop7" / "loop").mkdir(parents=True)
    (sys_block / "loop7" / "loop" / "backing_file").write_text(f"{target}\n")
    (sys_block / "loop2" / "loop").mkdir(parents=True)
    (sys_block / "loop2" / "loop" / "backing_file").write_text("/gone/file (deleted)\n")
    monkeypatch.setattr(rebuild, "SYS_BLOCK", sys_block)
    refused(
        rebuild.TargetInUse, ExitCode.DEVICE_IN_USE, "is attached to /dev/loop7", [target],
        directory=vault, group="g", targets={"d": str(target)},
    )  # fmt: skip


def test_a_chain_with_a_missing_delta_says_where_it_stops(vault: Path, target: Path) -> None:
    """Exit 0 at the newest reachable cut (as documented), but not silently."""
    (vault / delta_file_name("g", 3, 2)).unlink()
    put(vault, 4, 3, make_delta(4, 3, [(0, b"4" * 512)]))
    said: list[str] = []
    result = apply_dir(vault, "g", {"d": str(target)}, say=said.append)
    assert result.cut == 2
    assert any(
        "the chain stops at cut 2" in line and "g.0000000004.0000000003.delta (cut 4)" in line
        for line in said
    ), said


class _Killed(BaseException):
    """Stands for SIGKILL: nothing of apply's own runs after it (no except, no finally of
    apply's reaches the record)."""


def test_a_killed_apply_is_reported_by_the_next_one(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 between cut 1 and cut 2: the next apply says what the target holds and refuses
    a --from-cut it does not hold; a finished apply drops the record."""
    targets = {"d": str(target)}
    failing_write_after(monkeypatch, 1, _Killed())  # cut 1 is one write; killed in cut 2
    with pytest.raises(_Killed):
        apply_dir(vault, "g", targets, say=quiet)
    monkeypatch.undo()
    record = applylog.read(targets)
    assert record is not None and (record.held, record.writing) == (1, 2)
    assert "between cut 1 and cut 2" in record.describe()

    error = refused(
        InvalidInput, ExitCode.INVALID_INPUT, "they do not hold cut 2", [target],
        directory=vault, group="g", targets=targets, from_cut=2,
    )  # fmt: skip
    assert "between cut 1 and cut 2" in error.message
    assert error.hint == "give --from-cut 1, or apply from the full image"
    # Review finding: --from-cut 1 --cut 1 plans nothing, which would leave them half-written.
    refused(
        InvalidInput, ExitCode.INVALID_INPUT, "applying nothing would leave them so", [target],
        directory=vault, group="g", targets=targets, from_cut=1, to_cut=1,
    )  # fmt: skip

    said: list[str] = []
    result = apply_dir(vault, "g", targets, from_cut=1, say=said.append)
    assert result.cut == 3
    assert any("did not finish: the targets are between cut 1 and cut 2" in s for s in said)
    assert applylog.read(targets) is None
    assert not applylog.record_path(targets).exists()


def test_a_killed_full_image_refuses_every_from_cut(
    vault: Path, target: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    targets = {"d": str(target)}
    failing_write_after(monkeypatch, 0, _Killed())
    with pytest.raises(_Killed):
        apply_dir(vault, "g", targets, say=quiet)
    monkeypatch.undo()
    refused(
        InvalidInput, ExitCode.INVALID_INPUT, "hold no complete cut", [target],
        directory=vault, group="g", targets=targets, from_cut=1,
    )  # fmt: skip
    assert apply_dir(vault, "g", targets, say=quiet).cut == 3  # from the full image: fine
    assert applylog.read(targets) is None


def test_the_record_names_targets_by_their_real_paths(tmp_path: Path) -> None:
    target = tmp_path / "t.img"
    target.touch()
    (tmp_path / "link").symlink_to(target)
    assert applylog.record_path({"d": str(target)}) == applylog.record_path(
        {"d": str(tmp_path / "link")}
    )
    assert applylog.record_path({"d": str(target)}) != applylog.record_path({"e": str(target)})


def test_apply_goes_on_with_a_warning_where_no_record_can_be_kept(
    vault: Path, target: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is an aid, not a lock (e.g. a user without access to the records)."""
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    monkeypatch.setenv("DMREPL_APPLY_RECORDS", str(blocked / "apply"))
    said: list[str] = []
    assert apply_dir(vault, "g", {"d": str(target)}, say=said.append).cut == 3
    warnings = [s for s in said if s.startswith("warning: cannot keep a record of this apply")]
    assert len(warnings) == 1  # once, not once per delta


def test_a_block_device_target_is_named_by_the_path_given_not_its_kernel_name() -> None:
    """/dev/dm-N and /dev/sdX change across reboots; the path given (a by-id or LV link) or,
    for a dm device, its dm UUID do not."""
    plain = [d for d in sorted(Path("/sys/block").iterdir()) if not (d / "dm").exists()]
    node = next((Path("/dev") / d.name for d in plain if (Path("/dev") / d.name).exists()), None)
    assert node is not None and node.is_block_device()
    assert applylog.target_identity(str(node)) == f"path:{node}"
