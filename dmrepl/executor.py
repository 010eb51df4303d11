"""The command gateway: the only module that runs external commands.

Every command is an `Op` value (`dmrepl.ops`: argv, optional stdin, whether it
mutates state). A `Runner` executes it with `LC_ALL=C`, a timeout, no pty, and
logs argv and duration; failures raise `CommandFailed` carrying argv, exit code
and the whole stdout/stderr. Short commands (every dmsetup, losetup,
era_invalidate) start through `subprocess`, which spawns with vfork; long
commands whose output is streamed line by line (the test guests) go through
`sh`. `run_dm` issues a cut's stalled dmsetup ops (suspend, resume, message,
load) as the ioctl that command would make (`dmrepl.dmioctl`), without a process.
`DryRunRunner` prints mutating ops instead of running them, so `--dry-run` shows
exactly what would run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import sh

from dmrepl import dmioctl, kernelops
from dmrepl.errors import DmreplError, ExitCode
from dmrepl.ops import Op, Result

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0


class CommandFailed(DmreplError):
    """An external command exited non-zero. Keeps the whole evidence."""

    exit_code = ExitCode.COMMAND_FAILED

    def __init__(self, argv: tuple[str, ...], returncode: int, stdout: str, stderr: str):
        self.argv = argv
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = stderr.strip() or stdout.strip() or "(no output)"
        super().__init__(
            f"{shlex.join(argv)} failed with exit code {returncode}",
            context=detail,
        )


class CommandTimedOut(CommandFailed):
    """An external command ran past its timeout and was killed (output so far is kept)."""

    def __init__(self, argv: tuple[str, ...], timeout_s: float, stdout: str, stderr: str):
        super().__init__(argv, -9, stdout, stderr)
        self.timeout_s = timeout_s
        self.message = f"{shlex.join(argv)} timed out after {timeout_s:g} s and was killed"
        self.args = (self.message,)
        self.hint = "the device may be suspended or the system overloaded; check `dmsetup info`"


class CommandNotFound(DmreplError):
    """The program is not installed or not on PATH."""

    exit_code = ExitCode.COMMAND_FAILED


def _decode(data: bytes | str | None) -> str:
    if data is None:
        return ""
    if isinstance(data, str):
        return data
    return data.decode("utf-8", errors="replace")


def command_env(extra: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    """The environment for every command: ours, with a fixed C locale, plus `extra`."""
    return {**os.environ, "LC_ALL": "C", "LANG": "C", **dict(extra)}


class Runner:
    """Runs `Op`s for real."""

    # Whether dmsetup and losetup ops are answered with ioctls where they can be (`run_dm`,
    # `dmrepl.kernelops`); a runner that scripts or prints ops sets it False, so every op
    # reaches its `run`.
    ioctls = True

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.timeout_s = timeout_s

    def run_dm(self, op: Op) -> Result:
        """Run a dmsetup op as its ioctl when `dmioctl.request_for` has one, else as `run`.

        A failed ioctl raises `CommandFailed` for the dmsetup command, with exit code 1
        as dmsetup's, and the kernel's error as its stderr. An ioctl's result is not timed
        (`duration_s` 0): in user-mode Linux each clock read is a system call, and the cut
        times its steps itself.
        """
        request = dmioctl.request_for(op) if self.ioctls else None
        if request is None:
            return self.run(op)
        try:
            dmioctl.issue(request)
        except OSError as exc:
            log.debug("ioctl failed: %s (%s)", op.argv, exc)
            raise CommandFailed(op.argv, 1, "", f"device-mapper: {exc.strerror}") from exc
        return Result(op.argv, 0, "", "", 0.0)

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        """Run `op` and return its result; raise `CommandFailed` on an exit code not in ok_codes."""
        answered = kernelops.perform(op) if self.ioctls else None
        if answered is not None:
            log.debug("ioctl: %s: exit %d", op.argv, answered.exit_code)
            if answered.exit_code not in tuple(ok_codes):
                raise CommandFailed(op.argv, answered.exit_code, "", answered.stderr)
            return answered
        timeout = op.timeout_s if op.timeout_s is not None else self.timeout_s
        started = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("run: %s", op.render())
        exit_code, stdout, stderr = _spawn(op, timeout)
        result = Result(
            argv=op.argv,
            exit_code=exit_code,
            stdout=_decode(stdout),
            stderr=_decode(stderr),
            duration_s=time.monotonic() - started,
        )
        log.debug("exit %d after %.3f s: %s", exit_code, result.duration_s, op.argv[0])
        if exit_code not in tuple(ok_codes):
            raise CommandFailed(op.argv, exit_code, result.stdout, result.stderr)
        return result

    def run_best_effort(self, op: Op) -> Result | None:
        """Run `op` for teardown: a failure is logged and swallowed, never raised."""
        try:
            return self.run(op)
        except CommandFailed as exc:
            log.warning("ignored during cleanup: %s (%s)", exc.message, exc.context)
            return None

    def stream(
        self,
        op: Op,
        sink: Callable[[str], object] | None = None,
        *,
        stderr: Callable[[str], object] | None = None,
    ) -> int:
        """Run a long command, passing each output line (stdout and stderr) to `sink`.

        With `stderr`, stderr lines go there instead, and `sink` gets stdout only.
        Returns the exit code without raising: callers such as the test VM
        runner interpret it themselves. No timeout unless the op sets one.
        Both callbacks run on sh's reader threads and must not raise (the reader
        would die and the command block on a full pipe); one that returns True
        gets no further lines, while the rest of the output is still read.
        """
        write = sink or _write_stdout
        errors: dict[str, Any] = {"_err": stderr} if stderr is not None else {"_err_to_out": True}
        started = time.monotonic()
        log.debug("stream: %s", op.render())
        try:
            exit_code = self._execute(op, op.timeout_s, _out=write, **errors)
        except _TimedOut as exc:
            raise CommandTimedOut(op.argv, op.timeout_s or 0.0, "", "") from exc
        log.debug("exit %d after %.1f s", exit_code, time.monotonic() - started)
        return exit_code

    @staticmethod
    def _execute(op: Op, timeout: float | None, **io_args: Any) -> int:
        """Start a streamed `op` through sh without a pty, wait, and return its exit code.

        The timeout is a timer that kills the process, not sh's `_timeout`: sh
        checks that in 0.1 s sleeps and joins the checker at exit, which made
        every command take about 0.1 s (`python -m bench.commands`).
        """
        try:
            program = sh.Command(op.argv[0])
        except sh.CommandNotFound as exc:
            raise CommandNotFound(
                f"command not found: {op.argv[0]}",
                hint="install it; the README's set-up commands install every tool dmrepl uses",
            ) from exc
        process = program(
            *op.argv[1:],
            _in=op.stdin,
            _env=command_env(op.env),
            _tty_in=False,
            _tty_out=False,
            _ok_code=list(range(256)),
            _bg=True,
            _bg_exc=False,
            **io_args,
        )
        killer = _Deadline(process, timeout)
        try:
            process.wait()
        except sh.SignalException:
            if not killer.fired:
                raise
        finally:
            killer.cancel()
        if killer.fired:
            raise _TimedOut()
        return int(process.exit_code)


def _spawn(op: Op, timeout: float | None) -> tuple[int, bytes, bytes]:
    """Run a short command with `subprocess` and collect its output.

    Not through sh: sh forks the whole Python process, which costs 10x a
    `subprocess.run` here and about 8x in user-mode Linux, where every command
    of a cut pays it (`python -m bench.commands`). On timeout the command is
    killed and `CommandTimedOut` keeps what it printed so far.
    """
    env = command_env(op.env)
    program = shutil.which(op.argv[0], path=env.get("PATH"))
    if program is None:
        raise CommandNotFound(
            f"command not found: {op.argv[0]}",
            hint="install it; the README's set-up commands install every tool dmrepl uses",
        )
    with subprocess.Popen(
        [program, *op.argv[1:]],
        stdin=subprocess.DEVNULL if op.stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as process:
        stdin = None if op.stdin is None else op.stdin.encode()
        try:
            stdout, stderr = process.communicate(stdin, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            try:  # what it printed so far; a child that keeps the pipes open is not waited for
                stdout, stderr = process.communicate(timeout=2)
            except subprocess.TimeoutExpired as late:
                stdout, stderr = _as_bytes(late.stdout), _as_bytes(late.stderr)
            raise CommandTimedOut(
                op.argv, timeout or 0.0, _decode(stdout), _decode(stderr)
            ) from None
    return process.returncode, stdout, stderr


def _as_bytes(data: bytes | str | None) -> bytes:
    return data.encode() if isinstance(data, str) else data or b""


class _TimedOut(Exception):
    """Raised by `Runner._execute` when the deadline killed the command."""


class _Deadline:
    """Kills a running sh command with SIGKILL once `seconds` have passed."""

    def __init__(self, process: Any, seconds: float | None):
        self.process, self.fired = process, False
        self.timer = threading.Timer(seconds, self._fire) if seconds else None
        if self.timer is not None:
            self.timer.daemon = True
            self.timer.start()

    def _fire(self) -> None:
        self.fired = True
        with contextlib.suppress(ProcessLookupError):  # it ended just now
            self.process.kill()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()


def _write_stdout(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


class DryRunRunner(Runner):
    """Prints mutating ops instead of running them; read-only probes still run."""

    ioctls = False

    def __init__(self, sink: Callable[[str], object] = print, timeout_s: float = DEFAULT_TIMEOUT_S):
        super().__init__(timeout_s)
        self.sink = sink
        self.printed: list[Op] = []

    def run(self, op: Op, *, ok_codes: Iterable[int] = (0,)) -> Result:
        if not op.mutating:
            return super().run(op, ok_codes=ok_codes)
        self.printed.append(op)
        self.sink(op.render())
        return Result(argv=op.argv, exit_code=0, stdout="", stderr="", duration_s=0.0)
