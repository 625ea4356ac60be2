"""The ledger stores on both backends, batch by batch: exact values, idempotent on
uid, all or nothing per batch, and a database session that stays usable after a
failed batch (SQLite's own connection, PostgreSQL's session-long staging table)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from decimal import Decimal
from pathlib import Path

import msgspec
import pytest

from proxy.config import schema as cfg
from proxy.db import Db
from proxy.errors import DatabaseUnavailable
from proxy.usage.record import Record
from proxy.usage.store import Rejected, store_for
from tests.support.ledger import ledger_rows

_BASE = Record(
    uid="",
    request_id="",
    key_id="key_1",
    endpoint="chat/completions",
    model="m",
    deployment="d",
    prompt_tokens=11,
    completion_tokens=7,
    total_tokens=18,
    cached_tokens=2,
    reasoning_tokens=1,
    estimated=True,
    status=200,
    stream=True,
    error=None,
    started_at=1_700_000_000.123456,
    duration_ms=12.5,
    ttft_ms=3.25,
    cost=Decimal("0.000001234"),
)


def batch(first: int, count: int) -> list[Record]:
    return [
        msgspec.structs.replace(_BASE, uid=f"{n:032x}", request_id=f"req_{n}")
        for n in range(first, first + count)
    ]


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> cfg.Database:
    if request.param == "postgres":
        # One pooled connection: every batch runs in the same session.
        return cfg.Database(url=request.getfixturevalue("migrated_pg"), pool_max=1)
    return cfg.Database(sqlite_path=str(tmp_path / "ledger.db"))


async def test_rows_hold_the_records_values(database: cfg.Database) -> None:
    # Over a hundred rows: SQLite's statements of many rows (db._insert) and the one-row
    # statement of what is left over both run.
    records = [*batch(0, 100), msgspec.structs.replace(_BASE, uid="f" * 32, request_id="r",
               key_id=None, estimated=False, stream=False, error="UpstreamTimeout",
               ttft_ms=None, cost=Decimal(0)),
               msgspec.structs.replace(_BASE, uid="e" * 32, request_id="s",
               cost=Decimal("1.50E-7")),
               msgspec.structs.replace(_BASE, uid="d" * 32, request_id="t",
               cost=Decimal("0.1234567891234"))]  # fmt: skip
    db = await Db.open(database)
    try:
        await store_for(db).write(records)
    finally:
        await db.close()
    found = {row["uid"]: row for row in await ledger_rows(database)}
    for record in records:
        row = found[record.uid]
        expected = msgspec.structs.asdict(record)
        assert row.pop("started_at") == pytest.approx(expected.pop("started_at"), abs=1e-6)
        # the same digits and scale (PostgreSQL gets the decimal's text, SQLite keeps it)
        assert Decimal(row.pop("cost")).as_tuple() == expected.pop("cost").as_tuple()
        assert row == expected


async def test_a_refused_batch_leaves_nothing_and_the_next_one_lands(
    database: cfg.Database,
) -> None:
    # A row refused in the middle of the batch, after rows before it went in (a NULL in
    # a NOT NULL column, refused by the INSERT from the staging table): the store says
    # Rejected (its data, not the database: poison.py sifts it) and commits nothing.
    bad = msgspec.structs.replace(_BASE, uid=f"{99:032x}", model=None)
    db = await Db.open(database)
    try:
        store = store_for(db)
        with pytest.raises(Rejected, match=r"NOT NULL|not-null"):
            await store.write([*batch(0, 2), bad, *batch(2, 2)])
        await store.write(batch(10, 3))
        await store.write(batch(10, 3))  # written twice: still once
    finally:
        await db.close()
    uids = sorted(row["uid"] for row in await ledger_rows(database))
    assert uids == [r.uid for r in batch(10, 3)]


async def test_concurrent_batches_on_postgres_sessions_do_not_mix(migrated_pg: str) -> None:
    database = cfg.Database(url=migrated_pg, pool_max=4)
    db = await Db.open(database)
    try:
        store = store_for(db)
        await asyncio.gather(*(store.write(batch(n * 100, 100)) for n in range(8)))
        await asyncio.gather(*(store.write(batch(n * 100, 100)) for n in range(8)))
    finally:
        await db.close()
    uids = sorted(row["uid"] for row in await ledger_rows(database))
    assert uids == [r.uid for r in batch(0, 800)]


async def test_a_sqlite_write_that_timed_out_is_never_doubled(tmp_path: Path) -> None:
    database = cfg.Database(sqlite_path=str(tmp_path / "ledger.db"), timeout=0.3)
    db = await Db.open(database)
    try:
        store = store_for(db)
        # Another process holds the write lock past the store's timeout.
        with contextlib.closing(
            sqlite3.connect(database.sqlite_path, isolation_level=None)
        ) as other:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(DatabaseUnavailable):
                await store.write(batch(0, 5))
            other.execute("ROLLBACK")
        await store.write(batch(0, 5))  # what the writer does next: spool, then replay
        await store.write(batch(5, 5))
    finally:
        await db.close()
    uids = sorted(row["uid"] for row in await ledger_rows(database))
    assert uids == [r.uid for r in batch(0, 10)]
