"""Holding writers back while a site drains (the `stall` policy, fall-behind limits and a
synchronous site's join).

Writers are held by suspending every gate of the group (which also flushes what is in
flight); the era, `-orig` and mirror layers stay active, so a cut, its capture and a
local apply work underneath. The hold never outlives its bound: a timer resumes the
gates when `bound_s` has passed, whatever the cycle is doing, and says so. SIGINT,
SIGTERM and SIGHUP release the writers too (once every gate is suspended, so that no
suspend can follow the release) and stop the cycle at its next check.
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
    """Gates suspended until `release` (or the bound); they are resumed at most once."""

    def __init__(self, runner: Runner, stacks: tuple[StackSpec, ...], bound_s: float, say: Say):
        self.runner, self.stacks, self.bound_s, self.say = runner, stacks, bound_s, say
        self.started = time.monotonic()
        self.expired = False  # the bound passed before the cycle released the writers
        self.held_s = 0.0
        self.signals: list[int] = []  # SIGINT/SIGTERM/SIGHUP received while held
        self._lock = threading.Lock()
        self._suspended: list[str] = []  # the gates this hold suspended, in order
        self._started = False
        self._released = False
        self._timer = threading.Timer(bound_s, self._expire)
        self._timer.daemon = True

    def suspend_all(self) -> None:
        """Suspend every gate, then start the bound; on failure resume those suspended."""
        try:
            for stack in self.stacks:
                gate = stack.require(Layer.GATE).name
                self.runner.run(dm.suspend(gate))
                with self._lock:
                    self._suspended.append(gate)
        except BaseException:
            self.release()
            raise
        with self._lock:
            self._started = True
            self.started = time.monotonic()
            early = bool(self.signals)
        if early:  # a signal came while the gates were being suspended
            self.release()
        else:
            self._timer.start()

    def on_signal(self, signum: int, _frame: FrameType | None) -> None:
        """Remember the signal; release the writers from a thread (the lock may be held by
        the cut in progress, which then finishes first), once all gates are suspended."""
        self.signals.append(signum)
        if self._started:
            threading.Thread(target=self.release, daemon=True).start()

    def check(self) -> None:
        """Raise Interrupted if a signal came (the writers are released already)."""
        if self.signals:
            self.release()
            name = signal.Signals(self.signals[0]).name
            raise Interrupted(f"stopped by {name} while writers were held; they were released")

    @property
    def active(self) -> bool:
        """Writers are still held (neither released nor expired)."""
        with self._lock:
            return not self._released

    def release(self) -> bool:
        """Resume the gates; False if they were released already."""
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
        """Resume the gates this hold suspended (the caller holds the lock)."""
        for gate in reversed(self._suspended):
            self.runner.run_best_effort(dm.resume(gate))
        self._released = True
        self.held_s = time.monotonic() - self.started


@contextmanager
def writers_held(
    runner: Runner, stacks: tuple[StackSpec, ...], bound_s: float, say: Say
) -> Iterator[WriterHold]:
    """Suspend every gate of the group; resume them on the way out, on any error, on
    SIGINT/SIGTERM/SIGHUP, or when `bound_s` has passed (whichever comes first). A signal
    raises `Interrupted` when the block ends."""
    hold = WriterHold(runner, stacks, bound_s, say)
    previous = {sig: signal.signal(sig, hold.on_signal) for sig in SignalLatch.SIGNALS}
    try:
        hold.suspend_all()
        try:
            hold.check()  # a signal while the gates were being suspended
            yield hold
        finally:
            hold.release()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    hold.check()
