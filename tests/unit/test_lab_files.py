"""The Vagrant lab's files and every shell script in the repository: `shellcheck` passes on
each script, `vagrant validate` on the Vagrantfile (vagrant-libvirt checks its libvirt part),
and the dmrepl configuration the provisioning writes for each node parses.

shellcheck, vagrant and vagrant-libvirt come from bin/setup (bin/install-deps, role `test`):
a missing tool fails here, it is never skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from dmrepl.config import parse_config
from dmrepl.sites.remote import SshSiteSpec

ROOT = Path(__file__).resolve().parents[2]
LAB = ROOT / "vagrant"
# Not the project's own files: tools' caches, the virtualenv, what the lab makes on a host.
SKIP_DIRS = {".git", ".venv", ".vagrant", ".keys", ".disks", "__pycache__", ".mypy_cache",
             ".ruff_cache", ".pytest_cache", ".hypothesis", "build", ".vm-results"}  # fmt: skip
SHELL = re.compile(rb"^#!\s*(/usr)?/bin/(env\s+)?(ba|da)?sh\b")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: bash bin/setup installs it (bin/install-deps test)")
    return path


def shell_scripts() -> list[Path]:
    """Every file named *.sh or starting with a sh/bash shebang, outside SKIP_DIRS."""
    found = []
    for here, dirs, files in os.walk(ROOT):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(here) / name
            if path.is_symlink():
                continue
            if name.endswith(".sh"):
                found.append(path)
                continue
            with path.open("rb") as f:
                if SHELL.match(f.readline(200)):
                    found.append(path)
    return found


def test_the_script_list_holds_the_scripts_ci_and_the_lab_run() -> None:
    names = {str(p.relative_to(ROOT)) for p in shell_scripts()}
    expected = {"bin/setup", "bin/install-deps", "bin/demo", "bin/test", ".ci/run",
                "vagrant/provision.sh", "vagrant/keys.sh", "vagrant/lab-config.sh",
                "vagrant/scenarios/lib.sh", "vagrant/scenarios/seed.sh"}  # fmt: skip
    assert expected <= names, sorted(expected - names)


def test_every_shell_script_passes_shellcheck() -> None:
    scripts = [str(p.relative_to(ROOT)) for p in shell_scripts()]
    # The repository's .shellcheckrc lets the scenarios' `source lib.sh` be followed.
    done = subprocess.run(
        [tool("shellcheck"), *scripts], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, f"shellcheck {' '.join(scripts)}:\n{done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    ("extra", "args"),
    [({}, []), ({"DMREPL_LAB_DR2": "1"}, []),
     ({"DMREPL_LAB_DR2": "1", "VAGRANT_DEFAULT_PROVIDER": "virtualbox"}, ["--ignore-provider"])],
    ids=["primary and dr, libvirt", "with dr2, libvirt", "with dr2, any provider"],
)  # fmt: skip
def test_the_vagrantfile_validates(tmp_path: Path, extra: dict[str, str], args: list[str]) -> None:
    """With the libvirt provider the plugin checks its block (disks, driver); VirtualBox's
    block can be checked only where VirtualBox is installed, so the last case ignores the
    providers' blocks and checks the rest with VirtualBox as the default."""
    vagrant = tool("vagrant")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VAGRANT_", "DMREPL_LAB"))},
        "VAGRANT_CWD": str(LAB),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),  # not vagrant/.vagrant in the tree
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
        **extra,
    }
    done = subprocess.run(
        [vagrant, "validate", *args], env=env, capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    if "vagrant-libvirt" in output and "plugin" in output and not args:
        pytest.fail(f"vagrant-libvirt is missing: bash bin/setup installs it\n{output}")
    assert done.returncode == 0, output
    assert "Vagrantfile validated successfully" in output, output


@pytest.mark.parametrize(
    ("node", "peers", "sites"),
    [("primary", "dr,dr2", ["dr", "dr2"]), ("dr", "primary,dr2", ["back"])],
)
def test_each_node_gets_a_configuration_dmrepl_reads(
    tmp_path: Path, node: str, peers: str, sites: list[str]
) -> None:
    text = subprocess.run(
        ["bash", str(LAB / "lab-config.sh"), node, peers],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    path = tmp_path / "dmrepl.toml"
    path.write_text(text)
    config = parse_config(text, path)
    group = config.groups["lab"]
    assert [d.name for d in group.devices] == ["data", "log"]
    assert [s.name for s in group.sites] == sites
    for site in group.sites:
        assert isinstance(site, SshSiteSpec), site
    # Any node can be promoted: it grants the group's devices to the others.
    assert "[receive.lab.replica]" in text


def test_the_lab_disks_have_sizes_the_udev_rule_can_tell_apart() -> None:
    """provision.sh names the disks by size; vagrant-libvirt makes any raw disk at least
    1 GiB (its default allocation), so a smaller one would not have the size asked for."""
    text = (LAB / "Vagrantfile").read_text()
    block = text[text.index("DISKS = {") : text.index("}", text.index("DISKS = {"))]
    sizes = [int(m) for m in re.findall(r'"\w+" => (\d+),', block)]
    assert len(sizes) == 4 and len(set(sizes)) == 4, block
    assert min(sizes) >= 1024, block
