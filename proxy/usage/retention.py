"""Retention and partitions ahead: the ledger's upkeep, run by every worker's writer.

Every ``EVERY`` seconds (first after a random part of it, so workers and replicas do
not start in step) ``upkeep``:

- PostgreSQL: makes today's partition and the next ones (partitions.py), then drops
  the day partitions wholly older than ``usage.retention``: never a bulk DELETE, one
  process at a time (an advisory lock; a process that finds it taken leaves the work
  to the one holding it);
- SQLite: deletes rows older than ``usage.retention`` in steps of ``STEP`` rows, one
  short transaction each, so the writers never wait long for the file's lock;
- both: deletes rollups older than ``usage.rollup_retention``, one hour (or day) of
  them per statement.

A failure (database down) is logged once and tried again at the next round; the
ledger's writes never wait on upkeep.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from ..config.base import seconds
from ..config.schema import Ledger
from ..db import Db, timestamp
from .partitions import DAY, Partitions
from .rollup import TABLES
from .store import _UNAVAILABLE, TABLE

log = logging.getLogger("proxy.usage")

EVERY = 600.0
STEP = 5000
_SQLITE_STEP = (
    f"DELETE FROM {TABLE} WHERE rowid IN "
    f"(SELECT rowid FROM {TABLE} WHERE started_at < $1 LIMIT {STEP})"
)


def _oldest(table: str) -> str:
    return (
        f"DELETE FROM {table} WHERE starts_at = "
        f"(SELECT min(starts_at) FROM {table} WHERE starts_at < $1)"
    )


async def prune(db: Db, settings: Ledger, now: float, partitions: Partitions | None) -> int:
    """Apply retention as of ``now``; returns how many partitions, rows (SQLite) and
    rollup rows went. Database exceptions are the caller's."""
    gone = 0
    if settings.retention is not None:
        cutoff = now - seconds(settings.retention)
        if partitions is not None:
            async with asyncio.timeout(db.config.timeout * 4):
                gone += len(await partitions.drop_before(int(cutoff // DAY)))
        else:
            while (deleted := await _step(db, _SQLITE_STEP, timestamp(cutoff))) > 0:
                gone += deleted
    if settings.rollup_retention is not None:
        cutoff = now - seconds(settings.rollup_retention)
        for table in TABLES.values():
            while (deleted := await _step(db, _oldest(table), int(cutoff))) > 0:
                gone += deleted
    return gone


async def _step(db: Db, sql: str, arg: object) -> int:
    async with asyncio.timeout(db.config.timeout), db.transaction() as tx:
        deleted = await tx.execute(sql, arg)
    await asyncio.sleep(0)  # let the request path and the writer in between steps
    return deleted


async def upkeep(db: Db, settings: Ledger, partitions: Partitions | None) -> None:
    """Run forever (until cancelled): partitions ahead, then retention, every ``EVERY``."""
    failing = False
    await asyncio.sleep(random.uniform(0, EVERY / 10))
    while True:
        try:
            now = time.time()
            if partitions is not None:
                async with asyncio.timeout(db.config.timeout):
                    await partitions.ensure([now])
            gone = await prune(db, settings, now, partitions)
            if gone:
                log.info("usage ledger retention: %d partitions, rows and rollups removed", gone)
            failing = False
        except _UNAVAILABLE as exc:
            if not failing:
                log.warning("usage ledger upkeep failed (%s); trying again later", exc)
            failing = True
        except Exception:  # a bug must not end the upkeep for good: say so, go on
            log.exception("usage ledger: unexpected error in the upkeep")
        await asyncio.sleep(EVERY)
