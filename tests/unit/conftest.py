"""Unit tests never reach the kernel: a device-mapper ioctl fails the test that issues it."""

from __future__ import annotations

import pytest

from dmrepl import dmioctl


@pytest.fixture(autouse=True)
def no_dm_ioctls(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: dmioctl.Request) -> dmioctl.Reply:
        raise AssertionError(f"a unit test issued {request.command.name} on {request.name}")

    monkeypatch.setattr(dmioctl, "issue", refuse)
