"""Marks every test under tests/kernel with the `kernel` marker; keeps `apply`'s records of
unfinished runs (dmrepl.applylog) in a scratch directory, for this process and its children."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault(
    "DMREPL_APPLY_RECORDS", tempfile.mkdtemp(prefix="dmrepl-apply-records-", dir="/tmp")
)

KERNEL_DIR = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.kernel)
