"""Unit tests never reach the kernel: a device-mapper or loop ioctl fails the test that
issues it."""

from __future__ import annotations

from typing import NoReturn

import pytest

from dmrepl import dmioctl, loopioctl


@pytest.fixture(autouse=True)
def no_kernel_ioctls(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(request: dmioctl.Request) -> dmioctl.Reply:
        raise AssertionError(f"a unit test issued {request.command.name} on {request.name}")

    def refuse_loop(*args: object) -> NoReturn:
        raise AssertionError(f"a unit test attached or detached a loop device: {args}")

    monkeypatch.setattr(dmioctl, "issue", refuse)
    monkeypatch.setattr(loopioctl, "attach", refuse_loop)
    monkeypatch.setattr(loopioctl, "detach", refuse_loop)
