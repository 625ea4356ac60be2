"""What a key has spent in a period, from the rollups: the sum of ``cost`` over its
requests that started in ``[start, end)``.

Budgets rebuild their Redis state from it when Redis lost it, and ``keys show`` /
``keys list`` print it. The whole hours of the period come from ``usage_hourly``
(indexed on ``(key_id, starts_at)``: a month is ~720 rollup rows per model); a period
that does not begin or end on the hour (a time zone half an hour off UTC) takes the
fringe from the rows themselves, through their key index (PostgreSQL: ``(key_id)`` in
the fringe's day partition; SQLite: ``(key_id, started_at)``). So the
rows of the period's first hour must still be there: keep ``usage.retention`` longer
than the longest budget period in use (docs/usage-ledger.md).

Only committed rows count: rows still queued in a worker's writer (at most
``usage.flush_interval`` of traffic) or in a spool file are not in the sum.
Database exceptions are left to the caller.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

from ..db import Db, timestamp
from .rollup import HOUR
from .store import TABLE

_HOURS_OF = (
    "SELECT coalesce(sum(cost), 0) FROM usage_hourly "
    "WHERE {0} = $1 AND starts_at >= $2 AND starts_at < $3"
)
_ROWS_OF = f"SELECT cost FROM {TABLE} WHERE {{0}} = $1 AND started_at >= $2 AND started_at < $3"
_HOURS, _ROWS = _HOURS_OF.format("key_id"), _ROWS_OF.format("key_id")
# Where a period has no end ("total" budgets): the last day a datetime can name.
_NEVER = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


async def spent(db: Db, key_id: str, start: float, end: float | None) -> Decimal:
    """The exact cost of ``key_id``'s requests that started in ``[start, end)``."""
    return await _spent(db, "key_id", key_id, start, end)


async def team_spent(db: Db, team_id: str, start: float, end: float | None) -> Decimal:
    """The exact cost of the requests of ``team_id``'s keys that started in
    ``[start, end)`` (the fringe hours are read without an index: a team's budget
    period normally starts on the hour)."""
    return await _spent(db, "team_id", team_id, start, end)


async def _spent(db: Db, column: str, value: str, start: float, end: float | None) -> Decimal:
    stop = _NEVER if end is None else end
    first = math.ceil(start / HOUR) * HOUR  # the whole hours: [first, last)
    last = max(first, math.floor(stop / HOUR) * HOUR)
    nano = await db.fetchval(_HOURS_OF.format(column), value, first, last)
    total = Decimal(nano).scaleb(-9)
    for low, high in ((start, min(first, stop)), (last, stop)):
        if low < high:
            rows = await db.fetch(_ROWS_OF.format(column), value, timestamp(low), timestamp(high))
            total += sum((Decimal(cost) for (cost,) in rows), Decimal(0))
    return total
