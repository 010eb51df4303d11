"""The test guests (user-mode Linux, qemu) and the test command's refusal to go green idly."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dmrepl import vm
from dmrepl.errors import VmFailed
from dmrepl.executor import Runner
from tests import run

HAVE_UML = vm.UML_KERNEL.is_file() and os.geteuid() == 0


def test_uml_init_finds_tools_in_the_venv_and_keeps_host_paths(tmp_path: Path) -> None:
    script = vm.uml_init_script(
        "pytest -q",
        cwd=Path("/tmp/clone"),
        keep=["/tmp/clone", "/tmp/results"],
        modules=Path("/usr/lib/uml/modules/6.1.176"),
        status_file=Path("/tmp/ctl/status"),
    )
    path_line = next(line for line in script.splitlines() if line.startswith("PATH="))
    assert path_line.startswith(f"PATH='{vm.tool_dir()}:") or path_line.startswith(
        f"PATH={vm.tool_dir()}:"
    )
    assert "DM_DISABLE_UDEV=1" in script
    assert "mount -t hostfs none /tmp/clone -o /tmp/clone" in script
    assert "mount -t hostfs none /tmp/results -o /tmp/results" in script
    # Host paths are mounted back only after the fresh tmpfs, and the command runs last.
    assert script.index("tmpfs /tmp") < script.index("hostfs none /tmp/clone")
    assert script.index("modprobe -a loop dm-era") < script.index("\n(\npytest -q\n)\n")
    assert "echo $? > /tmp/ctl/status" in script
    assert "NO_COLOR=1" in script


def test_only_outermost_host_paths_under_guest_scratch_are_kept() -> None:
    kept = vm.host_paths_to_keep(
        [Path("/tmp/clone"), Path("/tmp/clone/.venv"), Path("/work/main"), Path("/tmp/r/")]
    )
    assert kept == ["/tmp/clone", "/tmp/r"]
    with pytest.raises(VmFailed, match="mounts its own /tmp"):  # its output would be lost
        vm.host_paths_to_keep([Path("/tmp/")])


def test_a_command_ending_in_a_comment_still_reports_its_status(tmp_path: Path) -> None:
    script = vm.uml_init_script(
        "exit 3  # a note",
        cwd=tmp_path,
        keep=[],
        modules=Path("/m/6.1"),
        status_file=tmp_path / "status",
    )
    body = script[script.index("\n(\n") :]  # the command and the status line only
    done = subprocess.run(["sh", "-c", body.replace("poweroff -f", "true")], check=False)
    assert done.returncode == 0
    assert (tmp_path / "status").read_text().strip() == "3"


def test_uml_plan_names_programs_by_absolute_path_with_a_fixed_path(tmp_path: Path) -> None:
    op = vm.plan_uml_run(Path("/usr/bin/linux.uml"), tmp_path / "init", "3G")
    assert op.argv[0] == "/usr/bin/linux.uml"
    assert f"init={tmp_path / 'init'}" in op.argv
    assert "rootfstype=hostfs" in op.argv and f"uml_dir={tmp_path}" in op.argv
    env = dict(op.env)
    assert env["PATH"].split(":")[0] == str(vm.tool_dir())


def test_qemu_plan_uses_software_emulation_by_default(tmp_path: Path) -> None:
    op = vm.plan_vm_run("pytest", kernel=Path("/boot/vmlinuz-6.1"), cwd=tmp_path, rwdirs=[tmp_path])
    argv = op.argv
    assert Path(argv[0]).name == "vng"
    assert argv[argv.index("--run") + 1] == "/boot/vmlinuz-6.1"
    assert "--disable-kvm" in argv
    assert f"--rwdir={tmp_path}" in argv
    script = argv[argv.index("--exec") + 1]
    assert script.startswith("modprobe -a loop dm-era dm-snapshot dm-mirror")
    assert script.endswith(f"cd {tmp_path} && pytest")
    assert (
        vm.plan_vm_run("true", kernel=Path("/k"), cwd=tmp_path, kvm=True).argv.count(
            "--disable-kvm"
        )
        == 0
    )


def test_qemu_tools_started_by_name_are_found_without_the_callers_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vng starts `virtme-run` by name: the venv's bin must be on its PATH (issue 11)."""
    venv_bin = tmp_path / "venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    (venv_bin / "vng").write_text('#!/bin/sh\nexec virtme-run "$@"\n')
    (venv_bin / "virtme-run").write_text("#!/bin/sh\necho virtme-run-ran\nexit 7\n")
    for tool in ("vng", "virtme-run"):
        (venv_bin / tool).chmod(0o755)
    kernel = tmp_path / "vmlinuz"
    kernel.touch()
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")  # as for `.venv/bin/dmrepl`
    monkeypatch.setenv("DMREPL_VM", "qemu")
    monkeypatch.setenv("DMREPL_VM_KERNEL", str(kernel))
    monkeypatch.setattr(vm, "QEMU_LOCK", tmp_path / "lock")
    lines: list[str] = []
    assert vm.run_in_vm("true", runner=Runner(), sink=lines.append) == 7
    assert "virtme-run-ran\n" in lines


def test_unknown_guest_kind_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DMREPL_VM", "kvm")
    with pytest.raises(VmFailed, match="DMREPL_VM=kvm"):
        vm.backend()


def test_find_guest_kernel_prefers_newest_with_dm_era(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DMREPL_VM_KERNEL", raising=False)
    boot, modules = tmp_path / "boot", tmp_path / "modules"
    boot.mkdir()
    for version, has_era in [("6.1.0-9-amd64", True), ("6.1.0-56-amd64", True), ("6.12.0", False)]:
        (boot / f"vmlinuz-{version}").touch()
        md = modules / version / "kernel/drivers/md"
        md.mkdir(parents=True)
        if has_era:
            (md / "dm-era.ko.xz").touch()
    assert vm.find_guest_kernel(boot, modules) == boot / "vmlinuz-6.1.0-56-amd64"
    with pytest.raises(VmFailed) as caught:
        vm.find_guest_kernel(tmp_path, tmp_path)
    assert "DMREPL_VM=qemu" in (caught.value.hint or "")


def test_find_uml_modules_picks_the_newest_tree(tmp_path: Path) -> None:
    for version in ("6.1.9", "6.1.176", "6.2.0-empty"):
        (tmp_path / version).mkdir()
    (tmp_path / "6.1.9" / "modules.dep").touch()
    (tmp_path / "6.1.176" / "modules.dep").touch()
    assert vm.find_uml_modules(tmp_path) == tmp_path / "6.1.176"
    with pytest.raises(VmFailed, match="no user-mode Linux modules"):
        vm.find_uml_modules(tmp_path / "6.2.0-empty")


def test_junit_counts(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>'
    )
    assert run.read_junit(report) == run.Tally(passed=3, failed=2, skipped=2)
    assert run.read_junit(tmp_path / "missing.xml") == run.Tally()


def test_junit_durations_map_back_to_node_ids(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        "<testsuites><testsuite>"
        '<testcase classname="tests.kernel.test_cut" name="test_a[x-1]" time="12.5"/>'
        '<testcase classname="tests.unit.test_config.TestThing" name="test_b" time="0.2"/>'
        "</testsuite></testsuites>"
    )
    assert run.junit_durations(report) == {
        "tests/kernel/test_cut.py::test_a[x-1]": 12.5,
        "tests/unit/test_config.py::TestThing::test_b": 0.2,
    }


def test_shards_balance_recorded_time() -> None:
    durations = {"a": 100.0, "b": 60.0, "c": 50.0, "d": 10.0}
    shards = run.plan_shards(["a", "b", "c", "d", "new"], durations, 2)
    assert shards == [["a", "c"], ["b", "new", "d"]]  # "new" weighs the median (60 s)
    assert run.plan_shards(["a"], durations, 4) == [["a"]]  # no empty guests
    assert sorted(test for shard in run.plan_shards(list("xyz"), {}, 2) for test in shard) == [
        "x",
        "y",
        "z",
    ]


@pytest.mark.parametrize(
    ("code", "tally", "problem"),
    [
        (0, run.Tally(passed=3), None),
        (1, run.Tally(passed=2, failed=1), None),  # failures are counted, not a extra problem
        (0, run.Tally(skipped=5), "executed no test"),
        (5, run.Tally(), "executed no test"),
        (255, run.Tally(passed=4), "reported no failure"),
    ],
)
def test_check_tier(code: int, tally: run.Tally, problem: str | None) -> None:
    _, problems = run.check_tier("kernel", code, tally)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


def test_guest_that_cannot_boot_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A "kernel" that exits at once: the test command must go red, saying why."""
    broken = tmp_path / "linux.uml"
    broken.write_text("#!/bin/sh\necho 'cannot map memory' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("DMREPL_VM", "uml")
    monkeypatch.setenv("DMREPL_UML_KERNEL", str(broken))
    monkeypatch.setattr(vm, "find_uml_modules", lambda: Path("/nonexistent/6.1"))
    monkeypatch.setattr(run.loop, "kernel_has_device_mapper", lambda: False)
    assert run.main(["--kernel-only"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: the kernel tier could not start the VM: user-mode Linux exited with code 1" in out
    assert "cannot map memory" in out
    assert out.rstrip().endswith("total: 0 passed, 0 failed, 0 skipped")


def test_missing_guest_kernel_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DMREPL_VM", "uml")
    monkeypatch.setenv("DMREPL_UML_KERNEL", "/nonexistent/linux.uml")
    monkeypatch.setattr(run.loop, "kernel_has_device_mapper", lambda: False)
    assert run.main(["--kernel-only"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: the kernel tier could not start the VM: no user-mode Linux kernel" in out


@pytest.mark.skipif(not HAVE_UML, reason="needs root and user-mode-linux (bin/setup installs it)")
def test_uml_guest_runs_a_command_and_returns_its_exit_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real boot: the guest has device-mapper, sees the host path it writes to, exits 3."""
    monkeypatch.setenv("DMREPL_VM", "uml")
    monkeypatch.delenv("DMREPL_UML_KERNEL", raising=False)
    out = Path(os.path.realpath("/tmp")) / f"dmrepl-unit-{os.getpid()}"
    out.mkdir()
    try:
        lines: list[str] = []
        command = f"dmsetup targets > {out}/targets; test -b /dev/loop0 || exit 9; exit 3"
        assert vm.run_in_vm(command, rwdirs=[out], sink=lines.append) == 3
        assert "era" in (out / "targets").read_text().split()
    finally:
        shutil.rmtree(out)
