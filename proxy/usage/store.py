"""Where ledger batches are committed: PostgreSQL or the embedded SQLite file.

Both backends insert a batch idempotently on ``uid``: writing the same batch twice
(a retry after a commit whose acknowledgement was lost, a spool replayed twice) leaves
each row once. Every database failure becomes ``DatabaseUnavailable``: the writer
spools the batch and retries later; it never drops it.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

import aiosqlite
import asyncpg
import msgspec

from ..db import Db
from ..errors import DatabaseUnavailable
from .record import COLUMNS, Record

TABLE = "usage_records"
_LIST = ", ".join(COLUMNS)

# COPY into a per-transaction staging table, then one INSERT … ON CONFLICT: COPY alone
# cannot skip rows that already exist. ON COMMIT DROP leaves nothing behind on a
# pooled connection, whatever happens to the transaction.
_STAGE = f"CREATE TEMP TABLE usage_staging (LIKE {TABLE} INCLUDING DEFAULTS) ON COMMIT DROP"
_MERGE = (
    f"INSERT INTO {TABLE} ({_LIST}) SELECT {_LIST} FROM usage_staging ON CONFLICT (uid) DO NOTHING"
)
# One statement, one parameter (the batch as a JSON array of arrays), any batch size:
# atomic without a transaction that other users of the shared connection could see.
_SQLITE_INSERT = (
    f"INSERT OR IGNORE INTO {TABLE} ({_LIST}) SELECT "
    + ", ".join(f"value ->> {i}" for i in range(len(COLUMNS)))
    + " FROM json_each(?)"
)
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)
_STARTED_AT = COLUMNS.index("started_at")
_encode = msgspec.json.Encoder().encode


class Store(Protocol):
    async def write(self, batch: Sequence[Record]) -> None:
        """Commit ``batch`` (rows already there are skipped) or raise
        ``DatabaseUnavailable``."""
        ...


class PostgresStore:
    __slots__ = ("pool", "timeout")

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    async def write(self, batch: Sequence[Record]) -> None:
        rows = [_pg_row(r) for r in batch]
        try:
            async with asyncio.timeout(self.timeout):
                async with self.pool.acquire() as conn, conn.transaction():
                    await conn.execute(_STAGE)
                    await conn.copy_records_to_table("usage_staging", records=rows, columns=COLUMNS)
                    await conn.execute(_MERGE)
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc


def _pg_row(record: Record) -> tuple[object, ...]:
    row = list(msgspec.structs.astuple(record))
    row[_STARTED_AT] = datetime.fromtimestamp(record.started_at, UTC)  # for timestamptz
    return tuple(row)


class SqliteStore:
    __slots__ = ("conn", "timeout")

    def __init__(self, conn: aiosqlite.Connection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout

    async def write(self, batch: Sequence[Record]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                cursor = await self.conn.execute(_SQLITE_INSERT, (_encode(batch),))
                await cursor.close()
        except (sqlite3.Error, ValueError, TimeoutError) as exc:
            # ValueError: aiosqlite's "no active connection" once the Db has closed.
            raise DatabaseUnavailable(_describe(exc)) from exc


def store_for(db: Db) -> Store:
    """The backend of the worker's database handle."""
    if db.pool is not None:
        return PostgresStore(db.pool, db.config.timeout)
    assert db.sqlite is not None
    return SqliteStore(db.sqlite, db.config.timeout)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
