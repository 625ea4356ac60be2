"""The PostgreSQL ledger's day partitions: made ahead by the writers, dropped by retention.

``usage_records`` is range-partitioned on ``started_at`` by UTC day (migration 0005);
partition ``usage_records_YYYYMMDD`` holds ``[day, day + 1)``. A row needs its day's
partition before it is inserted, so ``Partitions.ensure`` runs before every batch
(free once a day is known to exist) and makes the missing days, plus ``AHEAD`` days
after the newest one, so that the first batch of a new day finds its partition
there. A row for a day retention already dropped (a spool replayed late) gets its
partition back; retention drops it again next time.

Partitions are made and dropped under a transaction-level advisory lock, so that
workers and replicas doing it at once never collide (two ``CREATE TABLE IF NOT
EXISTS`` racing can otherwise fail on the catalog's unique index).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from ..db import Db

TABLE = "usage_records"
AHEAD = 2  # days made ahead of the newest day a batch needed
DAY = 86400
# Arbitrary constant: the advisory lock taken while partitions are made or dropped.
LOCK = 0x6D6F7270
_PARTITIONS = (
    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    f"WHERE i.inhparent = '{TABLE}'::regclass"
)


def name(day: int) -> str:
    """The partition of ``day`` (days since the Unix epoch)."""
    return f"{TABLE}_{datetime.fromtimestamp(day * DAY, UTC):%Y%m%d}"


def day_of(partition: str) -> int | None:
    """The day a partition name holds, or None for a table not named by ``name``."""
    tail = partition.removeprefix(f"{TABLE}_")
    if len(tail) != 8 or not tail.isdigit():
        return None
    return int(datetime.strptime(tail, "%Y%m%d").replace(tzinfo=UTC).timestamp()) // DAY


def _create(day: int) -> str:
    start = datetime.fromtimestamp(day * DAY, UTC).isoformat()
    end = datetime.fromtimestamp((day + 1) * DAY, UTC).isoformat()
    return (
        f"CREATE TABLE IF NOT EXISTS {name(day)} PARTITION OF {TABLE} "
        f"FOR VALUES FROM ('{start}') TO ('{end}')"
    )


class Partitions:
    """The day partitions this process knows exist (see the module docstring)."""

    def __init__(self, db: Db) -> None:
        self.db = db
        self.known: set[int] = set()

    async def ensure(self, times: Iterable[float]) -> None:
        """Make sure the partitions for these Unix times exist (and ``AHEAD`` more)."""
        days = {int(t // DAY) for t in times}
        if days <= self.known:
            return
        newest = max(days)
        wanted = sorted(days | set(range(newest + 1, newest + AHEAD + 1)))
        async with self.db.transaction() as tx:
            await tx.execute("SELECT pg_advisory_xact_lock($1)", LOCK)
            for day in wanted:
                if day not in self.known:
                    await tx.execute(_create(day))
        self.known.update(wanted)

    async def drop_before(self, day: int) -> list[str]:
        """Drop the partitions of days before ``day``, one transaction each; returns
        their names. Stops early (returning what it dropped) when another process holds
        the lock: that one is doing it."""
        dropped = []
        for (partition,) in sorted(await self.db.fetch(_PARTITIONS)):
            held = day_of(partition)
            if held is None or held >= day:
                continue
            async with self.db.transaction() as tx:
                if not await tx.fetch("SELECT 1 WHERE pg_try_advisory_xact_lock($1)", LOCK):
                    break
                await tx.execute(f"DROP TABLE IF EXISTS {partition}")
            self.known.discard(held)
            dropped.append(partition)
        return dropped
