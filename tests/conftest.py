"""Marks every test under tests/kernel with the `kernel` marker."""

from __future__ import annotations

from pathlib import Path

import pytest

KERNEL_DIR = Path(__file__).parent / "kernel"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if KERNEL_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.kernel)
