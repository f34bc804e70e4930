"""Parity tests print the largest difference each check saw, at the end of the run."""

from __future__ import annotations

import pytest

_LINES: list[str] = []


@pytest.fixture
def report():
    return _LINES.append


def pytest_terminal_summary(terminalreporter):
    if _LINES:
        terminalreporter.section("parity: largest differences seen")
        for line in _LINES:
            terminalreporter.write_line(line)
