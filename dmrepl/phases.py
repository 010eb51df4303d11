"""Named points of a replication cycle, so fault-injection tests can `kill -9` at each.

Production code calls `reached(name)`; nothing happens unless a test installed
a hook (tests/kernel/crashrun.py kills its own process at a chosen phase).
"""

from __future__ import annotations

from collections.abc import Callable

PHASES = ("capture", "captured", "journal-write", "journal-committed", "apply", "applied", "cursor")
# Reached only by `dmrepl serve` (the receiver of a remote site), which also reaches the
# journal phases above when it journals and applies a delta.
SERVE_PHASES = ("hello",)
# Reached only by an `s3` site: a part of a multipart upload sent, the manifest about to be
# written (dmrepl.sites.s3).
S3_PHASES = ("s3-part", "s3-manifest")

_hook: Callable[[str], None] | None = None


def reached(phase: str) -> None:
    if _hook is not None:
        _hook(phase)


def set_hook(hook: Callable[[str], None] | None) -> None:
    global _hook
    _hook = hook
