"""Fixtures of the adversity suite, and its figures.

Every test adds what it did to ``FIGURES`` (faults injected, inputs tried, requests
served, records lost, keys leaked); the totals are printed at the end of the run and,
when ``MORNGPT_RELIABILITY_JSON`` names a file, written there as JSON
(docs/reliability.md quotes them).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest

from ..usage_support import Cluster, cluster
from .faultproxy import FaultProxy

FIGURES: Counter[str] = Counter()
# What ``count`` takes, and the names printed, in order ("lost" and "leaked" stay 0).
NAMES = {
    "faults": "faults injected",
    "inputs": "inputs tried",
    "served": "requests served",
    "lost": "records lost",
    "leaked": "keys leaked",
}


def count(**figures: int) -> None:
    """Add to the run's figures, e.g. ``count(faults=1, served=20)`` (see ``NAMES``)."""
    for short, value in figures.items():
        FIGURES[NAMES[short]] += value


# Measurements worth quoting (latencies, memory), by what was measured.
MEASURED: dict[str, str] = {}


def measure(what: str, value: str) -> None:
    """Keep a measurement for the end-of-run summary, e.g. ``measure("overload", …)``."""
    MEASURED[what] = value


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


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL server for the module's tests (never the shared one)."""
    with cluster() as server:
        yield server


class Relays:
    """Fault relays of one test (``await relays.to(port)``), closed after it."""

    def __init__(self) -> None:
        self.made: list[FaultProxy] = []

    async def to(self, port: int) -> FaultProxy:
        relay = await FaultProxy(port).start()
        self.made.append(relay)
        return relay


@pytest.fixture
async def relays() -> AsyncIterator[Relays]:
    made = Relays()
    yield made
    for relay in made.made:
        count(faults=relay.faults)
        await relay.close()
