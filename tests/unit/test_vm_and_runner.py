"""The test VM planner and the test command's refusal to go green without kernel tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmrepl import vm
from dmrepl.errors import VmFailed
from tests import run


def test_plan_uses_software_emulation_by_default(tmp_path: Path) -> None:
    op = vm.plan_vm_run("pytest", kernel=Path("/boot/vmlinuz-6.1"), cwd=tmp_path, rwdirs=[tmp_path])
    argv = op.argv
    assert Path(argv[0]).name == "vng"
    assert argv[argv.index("--run") + 1] == "/boot/vmlinuz-6.1"
    assert argv[argv.index("--user") + 1] == "root"
    assert "--disable-kvm" in argv
    assert f"--rwdir={tmp_path}" in argv
    script = argv[argv.index("--exec") + 1]
    assert script.startswith("modprobe -a loop dm-era dm-snapshot dm-mirror")
    assert script.endswith(f"cd {tmp_path} && pytest")


def test_plan_with_kvm_opt_in(tmp_path: Path) -> None:
    op = vm.plan_vm_run("true", kernel=Path("/k"), cwd=tmp_path, kvm=True)
    assert "--disable-kvm" not in op.argv


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


def test_find_guest_kernel_without_any_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DMREPL_VM_KERNEL", raising=False)
    with pytest.raises(VmFailed) as caught:
        vm.find_guest_kernel(tmp_path, tmp_path)
    assert "linux-image-amd64" in (caught.value.hint or "")


def test_junit_counts(tmp_path: Path) -> None:
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>'
    )
    assert run.read_junit(report) == run.Tally(passed=3, failed=2, skipped=2)
    assert run.read_junit(tmp_path / "missing.xml") == run.Tally()


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


def test_vm_that_cannot_boot_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real vng run with a kernel image qemu cannot load: the test command must go red."""
    bogus = tmp_path / "vmlinuz-broken"
    bogus.write_bytes(b"")
    monkeypatch.setenv("DMREPL_VM_KERNEL", str(bogus))
    monkeypatch.setattr(run.loop, "kernel_has_device_mapper", lambda: False)
    assert run.main(["--kernel-only"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: the kernel tier executed no test" in out
    assert out.rstrip().endswith("total: 0 passed, 0 failed, 0 skipped")


def test_vm_runner_missing_kernel_fails_loudly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DMREPL_VM_KERNEL", "/nonexistent/vmlinuz")
    monkeypatch.setattr(run.loop, "kernel_has_device_mapper", lambda: False)
    assert run.main(["--kernel-only"]) == 1
    assert "FAIL: the kernel tier could not start the VM" in capsys.readouterr().out
