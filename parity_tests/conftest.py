"""Parity tests print the largest difference each check saw, at the end of the run (with or
without pytest-xdist: each line travels with its test's report)."""

from __future__ import annotations

import pytest

_KEY = "parity"


@pytest.fixture
def report(request):
    return lambda line: request.node.user_properties.append((_KEY, line))


def pytest_terminal_summary(terminalreporter):
    lines = [value for kind in ("passed", "failed") for rep in terminalreporter.stats.get(kind, [])
             if getattr(rep, "when", None) == "call"
             for key, value in getattr(rep, "user_properties", ()) if key == _KEY]
    if lines:
        terminalreporter.section("parity: largest differences seen")
        for line in lines:
            terminalreporter.write_line(line)
