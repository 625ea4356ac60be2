"""The usage ledger on PostgreSQL at scale: ``python -m bench.ledger [--rows N]``.

Against the server at ``--admin`` (default the local one), in scratch databases it
creates and drops, it measures, in one run:

- bytes per row, heap + indexes (``pg_total_relation_size`` of the ledger and its
  partitions) and WAL (``pg_current_wal_lsn`` before and after; the server must be
  otherwise quiet for this figure), for the ledger before issue 18 (migrations up to
  0004, its write path: COPY to a staging table, ``INSERT … ON CONFLICT (uid)``) and
  after (0005: partitions, the lean row, and the rollups written in the same
  transaction, counted in the WAL figure and shown apart in the size figure);
- ingest rows/s with 4 concurrent writers (4 tasks, 4 pooled connections, batches
  of 1000 realistic rows: proxy-made request ids, 10 000 keys), before and after;
- ``python -m proxy usage --since 30d --by key`` over 30 days of rollups for 10 000
  keys (the command, run as a subprocess: process start included; and the query
  alone, ``report.fetch``), median of 5;
- a budget rebuild (``usage.spend.spent``) for a key with a month of traffic: 30
  days of hourly rollups for it (2 models), median of 20, for a period starting on
  the hour and for one starting on the half hour (its first half hour read from
  ``--fringe`` rows of that key).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from proxy.config import schema as cfg
from proxy.db import Db, migrate, migrations
from proxy.usage import report, rollup
from proxy.usage.record import COLUMNS, Record
from proxy.usage.spend import spent
from proxy.usage.store import store_for

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
KEYS = 10_000
BATCH = 1000
WRITERS = 4
DAY = 86400
HOUR = 3600
_PROCESS = os.urandom(8).hex()

# The 0004 write path, as store.py ran it before issue 18.
_OLD_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_batch (uid uuid, request_id text, key_id text, "
    "endpoint text, model text, deployment text, prompt_tokens integer, completion_tokens "
    "integer, total_tokens integer, cached_tokens integer, reasoning_tokens integer, "
    "estimated boolean, status integer, stream boolean, error text, started_at double "
    "precision, duration_ms double precision, ttft_ms double precision, cost numeric) "
    "ON COMMIT DELETE ROWS"
)
# The row as migration 0004 knew it (0006 added the team).
_OLD_COLUMNS = tuple(c for c in COLUMNS if c != "team_id")
_OLD_MERGE = (
    f"INSERT INTO usage_records ({', '.join(_OLD_COLUMNS)}) SELECT "
    + ", ".join("to_timestamp(started_at)" if c == "started_at" else c for c in _OLD_COLUMNS)
    + " FROM usage_batch ON CONFLICT (uid) DO NOTHING"
)


def rows(count: int, start: float, offset: int = 0) -> list[Record]:
    """``count`` realistic ledger rows, one every millisecond from ``start``."""
    made = []
    for n in range(offset, offset + count):
        uid = f"{_PROCESS}{n:016x}"
        made.append(
            Record(
                uid=uid,
                request_id=f"req_{uid}",
                key_id=f"key_{n % KEYS:016x}",
                endpoint="chat/completions",
                model="gpt-4o-mini" if n % 3 else "gpt-4o",
                deployment="openai-east" if n % 2 else "openai-west",
                prompt_tokens=200 + n % 800,
                completion_tokens=50 + n % 300,
                total_tokens=250 + n % 800 + n % 300,
                cached_tokens=n % 64,
                reasoning_tokens=0,
                estimated=False,
                status=200 if n % 50 else 502,
                stream=bool(n % 4),
                error=None if n % 50 else "UpstreamUnavailable",
                started_at=start + n * 0.001,
                duration_ms=300.0 + (n * 7919) % 5000 + 0.123,
                ttft_ms=80.0 + (n * 104729) % 900 + 0.456,
                cost=Decimal(150 + n % 900).scaleb(-9),
            )
        )
    return made


@asynccontextmanager
async def scratch(admin: str, versions: int | None) -> AsyncIterator[str]:
    """A scratch database migrated up to ``versions`` (None: all), dropped after."""
    name = f"bench_ledger_{os.urandom(4).hex()}"
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    dsn = admin.rsplit("/", 1)[0] + f"/{name}"
    try:
        if versions is None:
            await migrate(cfg.Database(url=dsn))
        else:
            from proxy import db as dbmod

            shipped = migrations("postgres")
            real = dbmod.migrations
            dbmod.migrations = lambda _kind: shipped[:versions]  # type: ignore[assignment]
            try:
                await migrate(cfg.Database(url=dsn))
            finally:
                dbmod.migrations = real
        yield dsn
    finally:
        conn = await asyncpg.connect(admin)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()


async def ingest(dsn: str, records: list[Record], old: bool) -> dict[str, float]:
    """Write ``records`` with 4 concurrent writers; rows/s, bytes and WAL per row."""
    database = cfg.Database(url=dsn, pool_max=WRITERS, timeout=60)
    if old:  # Db.open refuses a schema behind this proxy's
        db = Db(database, await asyncpg.create_pool(dsn, min_size=0, max_size=WRITERS), None)
    else:
        db = await Db.open(database)
    assert db.pool is not None
    store = store_for(db)
    batches = [records[i : i + BATCH] for i in range(0, len(records), BATCH)]
    if not old:  # partitions exist before the clock starts, as in a running proxy
        assert store.partitions is not None
        await store.partitions.ensure(r.started_at for r in records)

    async def old_write(batch: Sequence[Record]) -> None:
        assert db.pool is not None
        async with db.pool.acquire() as conn, conn.transaction():
            await conn.execute(_OLD_STAGE)
            rows = [tuple(getattr(r, c) for c in _OLD_COLUMNS) for r in batch]
            await conn.copy_records_to_table("usage_batch", records=rows, columns=_OLD_COLUMNS)
            await conn.execute(_OLD_MERGE)

    async def writer(mine: list[list[Record]]) -> None:
        for batch in mine:
            await (old_write(batch) if old else store.write(batch))

    lsn = await db.pool.fetchval("SELECT pg_current_wal_lsn()")
    began = time.perf_counter()
    await asyncio.gather(*(writer(batches[i::WRITERS]) for i in range(WRITERS)))
    took = time.perf_counter() - began
    wal = await db.pool.fetchval("SELECT pg_current_wal_lsn() - $1::pg_lsn", lsn)
    ledger = await db.pool.fetchval(
        "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c WHERE c.relkind = 'r' "
        "AND (c.relname = 'usage_records' OR c.relname LIKE 'usage\\_records\\_2%')"
    )
    heap = await db.pool.fetchval(
        "SELECT sum(pg_relation_size(c.oid)) FROM pg_class c WHERE c.relkind = 'r' "
        "AND (c.relname = 'usage_records' OR c.relname LIKE 'usage\\_records\\_2%')"
    )
    rollups = 0
    if not old:
        rollups = await db.pool.fetchval(
            "SELECT pg_total_relation_size('usage_hourly') + pg_total_relation_size('usage_daily')"
        )
    await db.close()
    n = len(records)
    return {
        "rows_per_s": n / took,
        "heap_per_row": int(heap) / n,
        "heap_index_per_row": int(ledger) / n,
        "wal_per_row": int(wal) / n,
        "rollups_per_row": int(rollups) / n,
    }


_FILL = (
    "INSERT INTO {table} (starts_at, key_id, model, deployment, outcome, "
    + ", ".join(rollup.SUMS)
    + ") SELECT s, 'key_' || lpad(to_hex(k), 16, '0'), 'gpt-4o-mini', 'openai-east', '', "
    "3600, 0, 900000, 200000, 1000, 0, 540000000, "
    + ", ".join("100" if i in (5, 6, 7) else "0" for i in range(rollup.BUCKETS))
    + ", "
    + ", ".join("100" if i in (3, 4) else "0" for i in range(rollup.BUCKETS))
    + " FROM generate_series($1::bigint, $2::bigint, $3::bigint) AS s, "
    "generate_series(0, $4 - 1) AS k"
)


async def report_and_rebuild(dsn: str, fringe: int) -> dict[str, float]:
    today = int(time.time() // DAY) * DAY
    # Noon 30 days ago, not "now" less 30 days: the report reads the hours before the
    # first whole day from the hourly rollups, and in the first hour of a UTC day there
    # are none, so the rebuilt key (hourly rows only) was missing from 00:00 to 01:00.
    since = today - 30 * DAY + 12 * HOUR
    conn = await asyncpg.connect(dsn)
    try:
        # 31 days of daily rollups and the two days of hourly ones the report's first
        # partial day reads (the rest of the hourly table is not read: index range).
        await conn.execute(_FILL.format(table="usage_daily"), today - 30 * DAY, today, DAY, KEYS)
        await conn.execute(_FILL.format(table="usage_hourly"), since - DAY, since + DAY, HOUR, KEYS)
        # The rebuilt key: a month of hourly rollups, two models.
        for model in ("gpt-4o", "gpt-4o-mini"):
            await conn.execute(
                _FILL.replace("'gpt-4o-mini'", f"'{model}'")
                .replace("'key_' || lpad(to_hex(k), 16, '0')", "'key_rebuilt'")
                .format(table="usage_hourly"),
                today - 30 * DAY,
                today + DAY,
                HOUR,
                1,
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    database = cfg.Database(url=dsn, timeout=60)
    query = []
    for _ in range(5):
        began = time.perf_counter()
        found = await asyncio.to_thread(report.fetch, database, since, "key")
        query.append(time.perf_counter() - began)
    assert len(found) == KEYS + 1, len(found)  # and the rebuilt key
    command = []
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "proxy.json"
        config.write_bytes(
            orjson.dumps(
                {"database": {"url": dsn, "timeout": 60},
                 "models": [{"name": "a", "deployments": [{"base_url": "http://x"}]}]}
            )
        )  # fmt: skip
        args = [sys.executable, "-m", "proxy", "usage", "--since", "30d", "--by", "key"]
        for _ in range(5):
            began = time.perf_counter()
            run = [*args, "--config", str(config)]
            await asyncio.to_thread(subprocess.run, run, check=True, capture_output=True)
            command.append(time.perf_counter() - began)
    db = await Db.open(database)
    try:
        start = today - 29 * DAY
        fringe_rows = [
            Record(**{**_asdict(r), "key_id": "key_rebuilt"})
            for r in rows(fringe, start - 1800 + 1, offset=10**9)
        ]
        for i in range(0, len(fringe_rows), BATCH):
            await store_for(db).write(fringe_rows[i : i + BATCH])
        on_hour, off_hour = [], []
        for _ in range(20):
            began = time.perf_counter()
            await spent(db, "key_rebuilt", start, None)
            on_hour.append(time.perf_counter() - began)
            began = time.perf_counter()
            await spent(db, "key_rebuilt", start - 1800, None)
            off_hour.append(time.perf_counter() - began)
    finally:
        await db.close()
    return {
        "report_query_s": statistics.median(query),
        "report_command_s": statistics.median(command),
        "rebuild_on_hour_ms": statistics.median(on_hour) * 1000,
        "rebuild_half_hour_ms": statistics.median(off_hour) * 1000,
    }


def _asdict(record: Record) -> dict[str, Any]:
    return {f: getattr(record, f) for f in record.__struct_fields__}


async def main(admin: str, count: int, fringe: int) -> None:
    start = int(time.time() // DAY) * DAY - DAY + 3600.0
    records = rows(count, start)
    async with scratch(admin, 4) as dsn:
        before = await ingest(dsn, records, old=True)
    async with scratch(admin, None) as dsn:
        after = await ingest(dsn, records, old=False)
    async with scratch(admin, None) as dsn:
        reads = await report_and_rebuild(dsn, fringe)
    print(f"rows: {count}, {WRITERS} writers, batches of {BATCH}")
    print(f"{'':24}{'before (0004)':>16}{'after (0005)':>16}")
    for field in ("rows_per_s", "heap_per_row", "heap_index_per_row", "wal_per_row"):
        print(f"{field:24}{before[field]:16.1f}{after[field]:16.1f}")
    print(f"{'rollups_per_row':24}{'-':>16}{after['rollups_per_row']:16.1f}")
    for field, value in reads.items():
        print(f"{field:24}{value:16.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--admin", default=ADMIN)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--fringe", type=int, default=5000)
    args = parser.parse_args()
    asyncio.run(main(args.admin, args.rows, args.fringe))
