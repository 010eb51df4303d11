"""Holding writers back while a site drains (the `stall` policy, fall-behind limits and a
synchronous site's rejoin).

Writers are held by suspending every gate of the group (which also flushes what is in
flight); the era, `-orig` and mirror layers stay active, so a cut, its capture and a
local apply work underneath. The hold never outlives its bound: a timer resumes the
gates when `bound_s` has passed, whatever the cycle is doing, and says so.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from dmrepl import dm
from dmrepl.errors import Interrupted
from dmrepl.executor import Runner
from dmrepl.signals import Say, SignalLatch
from dmrepl.stack import Layer, StackSpec


class WriterHold:
    """Gates suspended until `release` (or the bound); `release` runs at most once."""

    def __init__(self, runner: Runner, stacks: tuple[StackSpec, ...], bound_s: float, say: Say):
        self.runner, self.stacks, self.bound_s, self.say = runner, stacks, bound_s, say
        self.started = time.monotonic()
        self.expired = False  # the bound passed before the cycle released the writers
        self.held_s = 0.0
        self.signals: list[int] = []  # SIGINT/SIGTERM/SIGHUP received while held
        self._lock = threading.Lock()
        self._released = False
        self._timer = threading.Timer(bound_s, self._expire)
        self._timer.daemon = True

    def check(self) -> None:
        """Raise Interrupted if a signal came (the writers are released already)."""
        if self.signals:
            name = signal.Signals(self.signals[0]).name
            raise Interrupted(f"stopped by {name} while writers were held; they were released")

    def start(self) -> None:
        """Writers are held from now: start the bound."""
        self.started = time.monotonic()
        self._timer.start()

    @property
    def active(self) -> bool:
        """Writers are still held (neither released nor expired)."""
        with self._lock:
            return not self._released

    def release(self) -> bool:
        """Resume the gates; False if the bound had already released them."""
        self._timer.cancel()
        with self._lock:
            if self._released:
                return False
            self._resume()
            return True

    @contextmanager
    def while_held(self) -> Iterator[bool]:
        """The body runs only while writers are still held (True), with the bound
        unable to release them meanwhile; False if it already has."""
        with self._lock:
            yield not self._released

    def _expire(self) -> None:
        with self._lock:
            if self._released:
                return
            self.expired = True
            self._resume()
        self.say(f"writers were held for the configured bound ({self.bound_s:g} s): resumed them")

    def _resume(self) -> None:
        for stack in reversed(self.stacks):
            self.runner.run_best_effort(dm.resume(stack.require(Layer.GATE).name))
        self._released = True
        self.held_s = time.monotonic() - self.started


@contextmanager
def writers_held(
    runner: Runner, stacks: tuple[StackSpec, ...], bound_s: float, say: Say
) -> Iterator[WriterHold]:
    """Suspend every gate of the group; resume them on the way out, on any error, on
    SIGINT/SIGTERM/SIGHUP, or when `bound_s` has passed (whichever comes first).

    A signal releases the writers at once (from a thread: the bound's lock may be held
    by a cut in progress, which then finishes first) and raises `Interrupted` when the
    block ends."""
    hold = WriterHold(runner, stacks, bound_s, say)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        hold.signals.append(signum)
        threading.Thread(target=hold.release, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in SignalLatch.SIGNALS}
    try:
        suspended: list[str] = []
        try:
            for stack in stacks:
                gate = stack.require(Layer.GATE).name
                runner.run(dm.suspend(gate))
                suspended.append(gate)
        except BaseException:
            for gate in reversed(suspended):
                runner.run_best_effort(dm.resume(gate))
            raise
        hold.start()
        try:
            yield hold
        finally:
            hold.release()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    hold.check()
