"""What a key has spent in a period, from the ledger: the sum of ``cost`` over its rows
that started in ``[start, end)``.

Budgets rebuild their Redis state from it when Redis lost it, and ``keys show`` /
``keys list`` print it. PostgreSQL sums the ``numeric`` column itself; SQLite holds
each cost as decimal text, summed here with ``decimal.Decimal`` (exact; the
``(key_id, started_at)`` index keeps both to the key's rows in the period).

Only committed rows count: rows still queued in a worker's writer (at most
``usage.flush_interval`` of traffic) or in a spool file are not in the sum.
Database exceptions are left to the caller.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from ..db import Db
from .store import TABLE

_PG = (
    f"SELECT coalesce(sum(cost), 0) FROM {TABLE} "
    "WHERE key_id = $1 AND started_at >= $2 AND started_at < $3"
)
_SQLITE = f"SELECT cost FROM {TABLE} WHERE key_id = ? AND started_at >= ? AND started_at < ?"
# Where a period has no end ("total" budgets): the last day a datetime can name.
_NEVER = datetime(9999, 12, 31, tzinfo=UTC).timestamp()


async def spent(db: Db, key_id: str, start: float, end: float | None) -> Decimal:
    """The exact cost of ``key_id``'s ledger rows that started in ``[start, end)``."""
    stop = _NEVER if end is None else end
    if db.pool is not None:
        total = await db.pool.fetchval(
            _PG, key_id, datetime.fromtimestamp(start, UTC), datetime.fromtimestamp(stop, UTC)
        )
        return Decimal(total)
    if db.sqlite is None:
        raise ConnectionError("the database handle is closed")
    async with db.sqlite.execute(_SQLITE, (key_id, start, stop)) as cursor:
        rows = await cursor.fetchall()
    return sum((Decimal(cost) for (cost,) in rows), Decimal(0))
