"""Shared helpers of the bad-input suites (cases of ../shared/reports/bad-input-2026-12.md).

A case runs one `dmrepl` command against a scratch tree `$W` (configs, fake devices that are
sparse regular files, a dir site, a fake `dmsetup`) and is checked for its exit code, a message
that names the problem, no traceback, and every file under `$W` unchanged (a hash of each).
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dmrepl import loop, probe
from dmrepl.delta import DeltaDevice, DeltaHeader, DeltaWriter
from dmrepl.errors import ExitCode
from dmrepl.executor import Runner
from tests.clirun import run_cli_here

ROOT = Path(__file__).resolve().parents[2]

# The report's fake-dmsetup: answers `info`/`table` with "No devices found", refuses the rest.
FAKE_DMSETUP = '#!/bin/sh\ncase "$1" in info|table) echo "No devices found";; *) exit 1;; esac\n'

NOBODY = 65534


def tree_digest(root: Path) -> dict[str, str]:
    """Every file, directory and link under `root`: a hash of its content and its mode."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        mode = oct(path.lstat().st_mode)
        if path.is_symlink():
            found[rel] = f"link {os.readlink(path)}"
        elif path.is_file():
            found[rel] = f"{mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
        else:
            found[rel] = f"{mode} dir"
    return found


def make_scratch(w: Path) -> Path:
    """The report's `$W`: dev/{origin,metadata,replica} (sparse files), dev/adir, vault/, cfg/,
    fakebin/dmsetup. No state dir: a case that creates one has touched something."""
    (w / "dev/adir").mkdir(parents=True)
    for name, size in (("origin", 1 << 20), ("metadata", 1 << 20), ("replica", 1 << 20)):
        with open(w / "dev" / name, "wb") as f:
            f.truncate(size)
    (w / "vault").mkdir()
    (w / "cfg").mkdir()
    (w / "fakebin").mkdir()
    dmsetup = w / "fakebin/dmsetup"
    dmsetup.write_text(FAKE_DMSETUP)
    dmsetup.chmod(0o755)
    write_full_delta(w / "deltas")
    nb = w / "nb"  # a directory and an image file of nobody's own (N11)
    nb.mkdir()
    with open(nb / "t", "wb") as f:
        f.truncate(DELTA_SECTORS * 512)
    for path in (w, *w.rglob("*")):  # whatever the umask: `nobody` may read it all
        path.chmod(0o755 if path.is_dir() else path.stat().st_mode & 0o700 | 0o644)
    for path in (nb, nb / "t"):
        os.chown(path, NOBODY, NOBODY)
    return w


DELTA_SECTORS = 2048


def write_full_delta(directory: Path) -> Path:
    """A valid full image of group db (device data, 1 MiB, one 4 KiB record) as a dir site
    holds it: directory/db.0000000001.full.delta."""
    directory.mkdir()
    device = DeltaDevice("data", DELTA_SECTORS, None, 1)
    header = DeltaHeader("db", seq=1, base_seq=None, devices=(device,), created=1.7e9)
    path = directory / "db.0000000001.full.delta"
    with open(path, "wb") as out:
        writer = DeltaWriter(out, header)
        writer.add(0, 8, b"\x05" * 4096)
        writer.finish()
    return path


# Byte surgery on a delta (docs/delta-format.md), for the report's corruptions that must get past
# a checksum to reach the check they aim at.
_U32 = struct.Struct("<I")
_RECORD_FIELDS = struct.Struct("<HIQ")  # device index, length, offset: what a record's CRC covers


def header_end(blob: bytes) -> int:
    """Where the header ends and record 0 (or the trailer) starts."""
    json_length: int = _U32.unpack_from(blob, 10)[0]
    return 14 + json_length + 4


def with_header_json(blob: bytes, body: bytes) -> bytes:
    """`blob` with its header JSON replaced by `body` and the header checksum made right again
    (the stream checksum is not: the reader stops at the header first)."""
    head = blob[:10] + _U32.pack(len(body)) + body
    return head + _U32.pack(zlib.crc32(head)) + blob[header_end(blob) :]


def with_header_crc_fixed(blob: bytes) -> bytes:
    """`blob` (its preamble or JSON changed in place) with a header checksum that matches."""
    end = header_end(blob) - 4
    return blob[:end] + _U32.pack(zlib.crc32(blob[:end])) + blob[end + 4 :]


def with_record_fields(
    blob: bytes, start: int, *, device: int | None = None, length: int | None = None,
    offset: int | None = None, fix_crc: bool = True,
) -> bytes:  # fmt: skip
    """The record at byte `start` with some of its fields replaced and (by default) a record
    checksum that matches them, so the reader gets to its bounds checks."""
    old_device, old_length, old_offset = _RECORD_FIELDS.unpack_from(blob, start)
    fields = _RECORD_FIELDS.pack(
        old_device if device is None else device,
        old_length if length is None else length,
        old_offset if offset is None else offset,
    )
    (crc,) = _U32.unpack_from(blob, start + _RECORD_FIELDS.size)
    if fix_crc:
        data_start = start + _RECORD_FIELDS.size + 4
        crc = zlib.crc32(blob[data_start : data_start + old_length], zlib.crc32(fields))
    return blob[:start] + fields + _U32.pack(crc) + blob[start + _RECORD_FIELDS.size + 4 :]


def good_config(
    *, top: str = "", group: str = "", device: str = "", sites: str | None = None
) -> str:
    """The report's good.toml (with `$W` left in): group db, device data, a blockdev site dr
    and a dir site vault; extra TOML lines go into [dmrepl], [group.db], the device."""
    if sites is None:
        sites = SITE_DR + SITE_VAULT
    group_table = f"[group.db]\n{group}\n" if group else ""
    return (
        f'[dmrepl]\nstate_dir = "$W/state"\n{top}\n'
        f"{group_table}"
        '[group.db.device.data]\norigin = "$W/dev/origin"\nmetadata = "$W/dev/metadata"\n'
        f"{device}\n{sites}"
    )


SITE_DR = (
    '[group.db.site.dr]\ntransport = "blockdev"\n'
    '[group.db.site.dr.replica]\ndata = "$W/dev/replica"\n'
)
SITE_VAULT = '[group.db.site.vault]\ntransport = "dir"\npath = "$W/vault"\n'


@dataclass(frozen=True)
class Case:
    """One report case. `$W` in `args`, `config` and `env` is the scratch tree; `--config` is
    added (pointing at `config`, written to $W/cfg/<id>.toml) when `config` is given."""

    id: str
    args: tuple[str, ...]
    code: ExitCode | int
    message: str  # must appear in stderr or stdout
    config: str | None = None
    euid: int = 0  # 0: root; else simulated in-process (os.geteuid) unless `runuser`
    dm: str = "none"  # "none": a kernel without device-mapper; "fake": the fake dmsetup on PATH
    env: dict[str, str] = field(default_factory=dict)
    runuser: bool = False  # run as a real `nobody` in a subprocess (file permissions matter)
    why: str = ""  # why this behaviour is right (the report's verdict, or ours)
    writes: tuple[str, ...] = ()  # files under $W a successful case is meant to change
    creates: tuple[str, ...] = ()  # fnmatch patterns of what the case is meant to create
    forbid: tuple[str, ...] = ()  # must not appear in stdout or stderr
    probes: bool = False  # the scratch devices under $W/dev pass the probe as block devices


def _subst(text: str, w: Path) -> str:
    return text.replace("$W", str(w))


def case_args(case: Case, w: Path) -> list[str]:
    args = [_subst(a, w) for a in case.args]
    if case.config is not None:
        path = w / "cfg" / f"{case.id}.toml"
        path.write_text(_subst(case.config, w))
        path.chmod(0o644)  # readable by `nobody` whatever the umask (main sets 077)
        args += ["--config", str(path)]
    return args


def run_case(
    case: Case, w: Path, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> tuple[int, str, str]:
    """Run the case's command (`args` from case_args); returns (exit code, stdout, stderr)."""
    monkeypatch.delenv("DMREPL_CONFIG", raising=False)
    env = {k: _subst(v, w) for k, v in case.env.items()}
    if case.dm == "fake":
        env["PATH"] = f"{w / 'fakebin'}:{os.environ['PATH']}"
    if case.runuser:
        return run_as_nobody(args, env, cwd=w)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(w)  # relative paths resolve in $W, and anything created there is seen
    monkeypatch.setattr(os, "geteuid", lambda: case.euid)  # what cli.require_root asks
    monkeypatch.setattr(loop, "kernel_has_device_mapper", lambda: case.dm == "fake")
    if case.dm == "fake":  # the fake dmsetup stands in for the kernel's answers too
        monkeypatch.setattr(Runner, "ioctls", False)
    if case.probes:
        pretend_block_devices(w / "dev", monkeypatch)
    return run_cli_here(*args)


def pretend_block_devices(directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regular files in `directory` probe as whole disks of their size (no holders, not
    mounted), so a command gets past the device checks to the lock and the state store."""
    real = probe.probe_block_device

    def fake(path: str, *, role: str) -> probe.BlockDevice:
        found = Path(path)
        if found.parent != directory or not found.is_file():
            return real(path, role=role)
        dev_id = f"7:{found.stat().st_ino % 1000}"
        size = found.stat().st_size // 512
        return probe.BlockDevice(path, dev_id, size, (), (), dev_id, 0)

    monkeypatch.setattr(probe, "probe_block_device", fake)


def run_as_nobody(args: list[str], env: dict[str, str], *, cwd: Path) -> tuple[int, str, str]:
    """`runuser -u nobody -- python -m dmrepl ARGS` (a real non-root process)."""
    if shutil.which("runuser") is None or os.geteuid() != 0:
        pytest.skip("needs root and runuser to run a command as nobody")
    done = subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-m", "dmrepl", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def check_case(case: Case, w: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Exit code, message, no traceback, and nothing under $W created, changed or removed
    (but `case.writes`, which must change); returns the output (stdout, then stderr)."""
    args = case_args(case, w)
    before = tree_digest(w)
    code, stdout, stderr = run_case(case, w, args, monkeypatch)
    output = stdout + stderr
    assert code == case.code, output
    assert _subst(case.message, w) in output, output
    assert "Traceback" not in output, output
    for text in case.forbid:
        assert _subst(text, w) not in output, output
    # A device with a problem of its own is not also "not a device of this group" (finding 12).
    if "not a device of this group" not in case.message:
        assert "not a device of this group" not in output, output
    after = tree_digest(w)
    for rel in case.writes:
        assert after.pop(rel) != before.pop(rel), f"{rel} was not written"
    created = sorted(set(after) - set(before))
    for pattern in case.creates:
        assert fnmatch.filter(created, pattern), f"nothing like {pattern} created: {created}"
    for rel in created:
        assert any(fnmatch.fnmatchcase(rel, p) for p in case.creates), f"{rel} was created"
        del after[rel]
    assert after == before
    return output


@contextlib.contextmanager
def public_scratch() -> Iterator[Path]:
    """$W under /tmp, readable by `nobody` (pytest's tmp_path is root-only); removed after."""
    w = Path(tempfile.mkdtemp(prefix="dmrepl-bad-"))
    w.chmod(0o755)
    try:
        yield make_scratch(w)
    finally:
        shutil.rmtree(w)
