"""The command gateway: success, failure with whole stderr, timeout, dry-run."""

from __future__ import annotations

import pytest

from dmrepl.executor import CommandFailed, CommandNotFound, CommandTimedOut, DryRunRunner, Runner
from dmrepl.ops import Op, command, probe


def test_success_returns_stdout_and_exit_code() -> None:
    result = Runner().run(probe("printf", "%s\\n", "hello"))
    assert result.exit_code == 0
    assert result.stdout == "hello\n"
    assert result.stderr == ""
    assert result.duration_s >= 0


def test_stdin_is_passed() -> None:
    result = Runner().run(probe("cat", stdin="0 8 zero\n"))
    assert result.stdout == "0 8 zero\n"


def test_locale_is_forced_to_c() -> None:
    result = Runner().run(probe("sh", "-c", "echo $LC_ALL $LANG"))
    assert result.stdout.split() == ["C", "C"]


def test_no_pty_for_output() -> None:
    # `test -t 1` is true only when stdout is a terminal.
    result = Runner().run(probe("sh", "-c", "test -t 1 && echo tty || echo pipe"))
    assert result.stdout.strip() == "pipe"


def test_failure_keeps_whole_stderr_and_stdout() -> None:
    long_err = "E" * 50_000
    script = f"echo partial; printf '%s' {long_err} >&2; exit 3"
    with pytest.raises(CommandFailed) as caught:
        Runner().run(probe("sh", "-c", script))
    err = caught.value
    assert err.returncode == 3
    assert err.argv == ("sh", "-c", script)
    assert err.stderr == long_err  # not truncated
    assert err.stdout == "partial\n"
    assert "exit code 3" in err.message


def test_ok_codes_accept_other_exit_codes() -> None:
    result = Runner().run(probe("sh", "-c", "exit 1"), ok_codes=(0, 1))
    assert result.exit_code == 1


def test_timeout_kills_and_keeps_output() -> None:
    op = Op(("sh", "-c", "echo started; sleep 30"), mutating=False, timeout_s=3)
    with pytest.raises(CommandTimedOut) as caught:
        Runner().run(op)
    assert caught.value.timeout_s == 3
    assert "timed out after 3 s" in caught.value.message
    assert caught.value.stdout == "started\n"


def test_missing_program_is_a_clear_error() -> None:
    with pytest.raises(CommandNotFound, match="no-such-program-xyz"):
        Runner().run(probe("no-such-program-xyz"))


def test_dry_run_prints_mutating_ops_and_runs_nothing(tmp_path) -> None:
    marker = tmp_path / "created"
    printed: list[str] = []
    runner = DryRunRunner(sink=printed.append)
    result = runner.run(command("touch", marker))
    assert result.exit_code == 0
    assert not marker.exists()
    assert printed == [f"touch {marker}"]
    assert runner.printed == [command("touch", marker)]


def test_dry_run_still_runs_probes() -> None:
    printed: list[str] = []
    result = DryRunRunner(sink=printed.append).run(probe("echo", "observed"))
    assert result.stdout == "observed\n"
    assert printed == []


def test_render_quotes_and_shows_stdin() -> None:
    op = command("dmsetup", "create", "a b", stdin="0 8 zero\n")
    assert op.render() == "dmsetup create 'a b' <<'EOF'\n0 8 zero\nEOF"


def test_stream_passes_lines_and_returns_exit_code() -> None:
    lines: list[str] = []
    code = Runner().stream(probe("sh", "-c", "echo one; echo two >&2; exit 4"), lines.append)
    assert code == 4
    assert "".join(lines) == "one\ntwo\n"
