"""Marks every test under tests/kernel with the `kernel` marker; keeps `apply`'s records of
unfinished runs (dmrepl.applylog) in a scratch directory, for this process and its children."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

if "DMREPL_APPLY_RECORDS" not in os.environ:  # apply's in-progress records, per test run
    _records = tempfile.mkdtemp(prefix="dmrepl-apply-records-", dir="/tmp")
    os.environ["DMREPL_APPLY_RECORDS"] = _records
    atexit.register(shutil.rmtree, _records, ignore_errors=True)

KERNEL_DIR = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.kernel)
