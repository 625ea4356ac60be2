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
from typing import Protocol

import asyncpg
from msgspec.structs import astuple

from ..db import BatchConnection, Db, bounded
from ..errors import DatabaseUnavailable
from .record import COLUMNS, Record

TABLE = "usage_records"
_LIST = ", ".join(COLUMNS)

# COPY into a staging table, then one INSERT … ON CONFLICT: COPY alone cannot skip rows
# that already exist. The staging table lives as long as the session (created in each
# transaction if missing, so it works behind a transaction pooler too) and ON COMMIT
# DELETE ROWS empties it at every commit: creating and dropping one per batch (as
# ``usage_staging`` before) cost more server CPU than a 100-row batch's inserts. Its
# started_at is the record's Unix seconds, so records go to COPY as they are (no
# datetime per row); the INSERT converts. (A new name, so that an older worker behind
# the same transaction pooler never finds this table where it creates its own.)
_STAGING_TYPES = {  # one per COLUMNS entry (a KeyError at import when one is missing)
    "uid": "uuid",
    "request_id": "text",
    "key_id": "text",
    "endpoint": "text",
    "model": "text",
    "deployment": "text",
    "prompt_tokens": "integer",
    "completion_tokens": "integer",
    "total_tokens": "integer",
    "cached_tokens": "integer",
    "reasoning_tokens": "integer",
    "estimated": "boolean",
    "status": "integer",
    "stream": "boolean",
    "error": "text",
    "started_at": "double precision",
    "duration_ms": "double precision",
    "ttft_ms": "double precision",
    "cost": "numeric",
}
_STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS usage_batch ("
    + ", ".join(f"{c} {_STAGING_TYPES[c]}" for c in COLUMNS)
    + ") ON COMMIT DELETE ROWS"
)
_MERGE = (
    f"INSERT INTO {TABLE} ({_LIST}) SELECT "
    + ", ".join("to_timestamp(started_at)" if c == "started_at" else c for c in COLUMNS)
    + " FROM usage_batch ON CONFLICT (uid) DO NOTHING"
)
_SQLITE_INSERT = f"INSERT OR IGNORE INTO {TABLE} ({_LIST}) VALUES ({', '.join('?' * len(COLUMNS))})"
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


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
        """Bounded by ``timeout`` in all; a hung connection is terminated (db.bounded)."""
        rows = [astuple(r) for r in batch]
        try:
            async with bounded(self.pool, self.timeout) as conn, conn.transaction():
                await conn.execute(_STAGE)
                await conn.copy_records_to_table("usage_batch", records=rows, columns=COLUMNS)
                await conn.execute(_MERGE)
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc


class SqliteStore:
    __slots__ = ("conn", "timeout")

    def __init__(self, conn: BatchConnection, timeout: float) -> None:
        self.conn = conn
        self.timeout = timeout

    async def write(self, batch: Sequence[Record]) -> None:
        # Booleans bind as 0/1; the decimal cost is stored as its text.
        rows = [(*astuple(r)[:-1], str(r.cost)) for r in batch]
        try:
            async with asyncio.timeout(self.timeout):
                await self.conn.insert(_SQLITE_INSERT, rows)
        except (sqlite3.Error, TimeoutError) as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc


def store_for(db: Db) -> Store:
    """The backend of the worker's database handle."""
    if db.pool is not None:
        return PostgresStore(db.pool, db.config.timeout)
    assert db.batches is not None
    return SqliteStore(db.batches, db.config.timeout)


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
