"""The CLI prints text as it is: no markup, no highlighting, no emoji codes."""

from __future__ import annotations

import pytest

from dmrepl.cli import render


def test_lines_and_progress_keep_colon_words_and_brackets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = "replica /dev/disk/by-id/x:ok:thumbs_up: [bold]kept[/bold]"
    render.line(text)
    render.say(text)
    captured = capsys.readouterr()
    assert captured.out == text + "\n"
    assert captured.err == text + "\n"
