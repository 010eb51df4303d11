"""Signals during multi-step operations: remembered, then acted on at a safe point.

SIGINT, SIGTERM and SIGHUP do not kill dmrepl half way through a step (a dmsetup
command cut in half could leave a device behind our back); the latch records
them and `check()` raises `Interrupted` between steps, so undo stacks unwind.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from dmrepl.errors import Interrupted

Say = Callable[[str], object]  # where progress lines go


class SignalLatch:
    """Remembers SIGINT/SIGTERM/SIGHUP instead of dying; `check()` raises at a safe point."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def check(self) -> None:
        if self.received is not None:
            name = signal.Signals(self.received).name
            raise Interrupted(f"stopped by {name}; undoing what this run did")


@contextmanager
def deferred_signals() -> Iterator[SignalLatch]:
    latch = SignalLatch()
    previous = {sig: signal.signal(sig, latch._handle) for sig in SignalLatch.SIGNALS}
    try:
        yield latch
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
