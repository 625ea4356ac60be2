"""The adversity suite's figures: every test adds what it did to ``FIGURES`` (faults
injected, inputs tried, requests served, records lost, keys leaked); tests/adversity/
conftest.py prints the totals at the end of the run and, when
``MORNGPT_RELIABILITY_JSON`` names a file, writes them there as JSON
(docs/reliability.md quotes them)."""

from __future__ import annotations

from collections import Counter

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


class Relays:
    """Fault relays of one test (``await relays.to(port)``), closed after it (the
    ``relays`` fixture)."""

    def __init__(self) -> None:
        self.made: list[FaultProxy] = []

    async def to(self, port: int) -> FaultProxy:
        relay = await FaultProxy(port).start()
        self.made.append(relay)
        return relay
