"""What the ``keys`` and ``teams`` commands share: reading ``update`` options as store
changes, model lists, budget checks and the time now."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from ...config.load import check_budget


def budget_errors(budget: Decimal | None, period: str, tz: str) -> str | None:
    """Why a key's budget settings cannot be used (the time zone), or None."""
    return check_budget(budget or Decimal(1), period, tz)


async def changes_of(
    args: argparse.Namespace, updatable: tuple[str, ...], current: Callable[[], Awaitable[Any]]
) -> dict[str, Any] | None:
    """The ``update`` options given, as store changes (a key's or a team's, whose
    record ``current`` reads); None after printing why they cannot be applied."""
    given = vars(args)
    changes: dict[str, Any] = {c: given[c] for c in updatable if c in given}
    for limit in ("rpm", "tpm", "max_parallel"):
        if limit in changes:
            changes[limit] = changes[limit] or None
    if "models" in changes:
        changes["models"] = models_of(changes["models"])
    if {"budget", "budget_period", "budget_tz"} & set(changes):
        record = await current()
        period = changes.get("budget_period") or (record.budget_period if record else "")
        tz = changes.get("budget_tz") or (record.budget_tz if record else "UTC")
        wrong = budget_errors(None, period or "monthly", tz)
        if wrong:
            print(f"error: {wrong}", file=sys.stderr)
            return None
    if "meta" in given:
        record = await current()
        changes["metadata"] = {**(record.metadata if record else {}), **dict(given["meta"])}
    if not changes:
        print("error: nothing to change", file=sys.stderr)
        return None
    return changes


def models_of(values: list[str]) -> frozenset[str]:
    return frozenset(m for value in values for m in value.split(",") if m)


def now() -> float:
    return datetime.now(UTC).timestamp()
