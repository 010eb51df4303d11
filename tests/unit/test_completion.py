"""Shell completion (typer's): the scripts docs/operations.md installs, and what they complete."""

from __future__ import annotations

import pytest

from tests.clirun import run_cli_here


def complete(monkeypatch: pytest.MonkeyPatch, line: str) -> list[str]:
    """What bash completion offers for the last word of `line`."""
    words = line.split(" ")
    monkeypatch.setenv("_DMREPL_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", line)
    monkeypatch.setenv("COMP_CWORD", str(len(words) - 1))
    code, stdout, _ = run_cli_here(*words[1:])
    assert code == 0
    return stdout.split()


def test_completes_commands_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    assert complete(monkeypatch, "dmrepl conf") == ["config"]
    assert complete(monkeypatch, "dmrepl config ex") == ["example"]
    assert "--config" in complete(monkeypatch, "dmrepl sync --c")


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script(shell: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("_DMREPL_COMPLETE", f"source_{shell}")
    code, stdout, _ = run_cli_here()
    assert code == 0
    assert "_DMREPL_COMPLETE" in stdout or "_dmrepl_completion" in stdout


def test_help_offers_completion() -> None:
    code, stdout, _ = run_cli_here("--help")
    assert code == 0
    assert "--install-completion" in stdout and "--show-completion" in stdout
