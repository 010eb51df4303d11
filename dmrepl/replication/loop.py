"""The run loop: one replication cycle every interval until a signal says stop.

SIGTERM or SIGINT ends the loop once the cycle in progress is done (at once
during the wait). While a cut is held, the cut's own signal latch turns them into
`Interrupted`, which ends the loop too. Any other error of a cycle is reported,
and the next cycle runs as planned.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from dmrepl.errors import DmreplError, Interrupted, InvalidInput

MIN_INTERVAL_S = 1.0  # shorter would run cycles back to back: a busy loop of cuts
MAX_INTERVAL_S = 7 * 86400.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def parse_interval(text: str) -> float:
    """`run --interval`: seconds between cycles, from 1 s to 7 days."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise InvalidInput(f"interval {text!r} is not like 30s, 5m or 1h") from None
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:  # also false for nan
        raise InvalidInput(
            f"interval {text!r} is out of range",
            hint="give 1s to 7 days between cycles, like 30s, 5m or 1h",
        )
    return seconds


def run_cycles(
    cycle: Callable[[], int],
    interval_s: float,
    *,
    on_error: Callable[[DmreplError], int] | None,
    stop: threading.Event | None = None,
    due: Callable[[], bool] | None = None,
    poll_s: float = 0.5,
) -> int:
    """Call `cycle` every `interval_s` seconds until `stop` is set; the last cycle's exit code.

    `due` is asked every `poll_s` seconds while waiting: True starts the next cycle at once
    (a site over its fall-behind limit is driven by cycles back to back).

    SIGTERM and SIGINT set `stop` while the loop runs (call it from the main thread).
    A cycle's `DmreplError` goes to `on_error`, whose return value is that cycle's exit
    code, and the loop goes on; `Interrupted` ends the loop. With `on_error` None, every
    error, `Interrupted` included, propagates and ends the loop.
    """
    stop = stop if stop is not None else threading.Event()
    code = 0
    with _stop_on_signals(stop):
        while not stop.is_set():
            try:
                code = cycle()
            except DmreplError as error:
                if on_error is None:
                    raise
                if isinstance(error, Interrupted):
                    break
                code = on_error(error)
            _wait(stop, interval_s, due, poll_s)
    return code


def _wait(
    stop: threading.Event, interval_s: float, due: Callable[[], bool] | None, poll_s: float
) -> None:
    """Until the interval has passed, `stop` is set, or `due()` says a cycle is needed."""
    if due is None:
        stop.wait(interval_s)
        return
    deadline = time.monotonic() + interval_s
    while not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0 or stop.wait(min(poll_s, left)):
            return
        try:
            if due():
                return
        except (DmreplError, OSError):
            pass  # the cycle itself reports what is wrong


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` inside the block; the previous handlers come back after."""
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
