"""Fixtures and hooks of the adversity suite: fault relays, and
the run's figures (tests/support/figures.py) printed at the end and, when
``MORNGPT_RELIABILITY_JSON`` names a file, written there as JSON (docs/reliability.md
quotes them)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator

import pytest

from tests.support.figures import FIGURES, MEASURED, NAMES, Relays, count


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    line = ", ".join(f"{name} {FIGURES[name]}" for name in NAMES.values())
    terminalreporter.write_sep("-", "adversity figures")
    terminalreporter.write_line(line)
    for what, value in MEASURED.items():
        terminalreporter.write_line(f"{what}: {value}")
    target = os.environ.get("MORNGPT_RELIABILITY_JSON")
    if target:
        figures = {name: FIGURES[name] for name in NAMES.values()}
        with open(target, "w") as out:
            json.dump({**figures, "measured": MEASURED}, out, indent=2)


@pytest.fixture
async def relays() -> AsyncIterator[Relays]:
    made = Relays()
    yield made
    for relay in made.made:
        count(faults=relay.faults)
        await relay.close()
