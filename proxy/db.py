"""Database connections and versioned migrations, for PostgreSQL and embedded SQLite.

Migrations are plain SQL files, ``proxy/migrations/{postgres,sqlite}/NNNN_name.sql``,
applied in order, each in its own transaction, and recorded in
``schema_migrations``. On PostgreSQL an advisory lock serialises concurrent
``migrate`` runs (several replicas starting at once). SQLite is migrated
automatically when the proxy starts; PostgreSQL only by ``python -m proxy migrate``
(a deploy step), and ``serve`` refuses to start on a schema that is behind.

One connection holder per worker (``Db``) is shared by the key store and the usage
ledger: an asyncpg pool, or for SQLite an aiosqlite connection (keys, reads) plus the
ledger's own ``BatchConnection`` (SQLite serialises writers anyway; WAL mode lets the
worker processes read concurrently).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import aiosqlite
import asyncpg
from aiohttp import web
from asyncpg.pool import PoolConnectionProxy

from .config import Config, Database

log = logging.getLogger("proxy.db")
_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
# Arbitrary constant: the advisory lock id that serialises migrations.
_LOCK_ID = 0x6D6F726E


class SchemaError(Exception):
    """The database schema is not what this version of the proxy needs."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations(kind: str) -> list[Migration]:
    """The migrations shipped for ``kind`` ("postgres" or "sqlite"), in order."""
    folder = resources.files("proxy") / "migrations" / kind
    found = []
    for entry in folder.iterdir():
        match = _FILE.fullmatch(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(database: Database) -> list[str]:
    """Apply pending migrations; returns the names applied."""
    if database.is_postgres:
        return await _migrate_postgres(database)
    return _migrate_sqlite(database.sqlite_path)


_CREATE_LEDGER = (
    "CREATE TABLE IF NOT EXISTS schema_migrations ("
    "version integer PRIMARY KEY, name text NOT NULL, "
    "applied_at timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP)"
)


async def _migrate_postgres(database: Database) -> list[str]:
    conn = await asyncpg.connect(database.url, timeout=database.timeout)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        try:
            await conn.execute(_CREATE_LEDGER)
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            applied = []
            for m in migrations("postgres"):
                if m.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(m.sql)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        m.version,
                        m.name,
                    )
                applied.append(f"{m.version:04d}_{m.name}")
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
    finally:
        await conn.close()


def _migrate_sqlite(path: str) -> list[str]:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")  # one migrating process at a time
        conn.execute(_CREATE_LEDGER)
        done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
        applied = []
        for m in migrations("sqlite"):
            if m.version in done:
                continue
            for statement in _statements(m.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)", (m.version, m.name)
            )
            applied.append(f"{m.version:04d}_{m.name}")
        conn.execute("COMMIT")
        return applied
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    finally:
        conn.close()


def _statements(sql: str) -> list[str]:
    # sqlite3.execute runs one statement; executescript would commit our transaction.
    return [s.strip() for s in sql.split(";") if s.strip()]


class BatchConnection:
    """A SQLite connection for batch writes (the usage ledger's): each ``insert`` runs
    whole in a thread — ``BEGIN IMMEDIATE``, ``executemany``, ``COMMIT`` — under a
    lock. ``executemany`` in one transaction takes half the CPU of the one-statement
    ``json_each`` insert it replaced (which is atomic without a transaction, the only
    safe kind on the aiosqlite connection the key store shares). Running the whole
    transaction in the thread, on a connection nobody else uses, means a cancelled or
    timed-out await never leaves one half done."""

    def __init__(self, path: str, timeout: float) -> None:
        # timeout: how long a write waits for another process's write lock.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._lock = threading.Lock()  # one thread at a time on the connection

    async def insert(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        """Run ``sql`` for every row in one transaction; raises ``sqlite3.Error``."""
        await asyncio.to_thread(self._insert, sql, rows)

    def _insert(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise sqlite3.ProgrammingError("the ledger connection is closed")
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(sql, rows)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    async def close(self) -> None:
        """After the write in progress, if any."""
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class Db:
    """The worker's database handle: either ``pool``, or ``sqlite`` and ``batches``."""

    def __init__(
        self,
        database: Database,
        pool: asyncpg.Pool | None,
        sqlite: aiosqlite.Connection | None,
        batches: BatchConnection | None = None,
    ) -> None:
        self.config = database
        self.pool = pool
        self.sqlite = sqlite
        self.batches = batches

    @classmethod
    async def open(cls, database: Database) -> Db:
        if database.is_postgres:
            # min_size=0: creating the pool connects to nothing, so a database that is
            # down at start does not stop the proxy (usage spools, keys are cached).
            pool = await asyncpg.create_pool(
                database.url,
                min_size=0,
                max_size=database.pool_max,
                timeout=database.timeout,
                command_timeout=database.timeout,
            )
            try:
                await _check_schema(pool)
            except (OSError, TimeoutError, asyncpg.PostgresConnectionError) as exc:
                log.warning("database unreachable at start (%s); going on without it", exc)
            except BaseException:
                await pool.close()
                raise
            return cls(database, pool, None)
        _migrate_sqlite(database.sqlite_path)
        conn = await aiosqlite.connect(database.sqlite_path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA busy_timeout=5000")
        return cls(database, None, conn, BatchConnection(database.sqlite_path, database.timeout))

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        if self.sqlite is not None:
            await self.sqlite.close()
            self.sqlite = None
        if self.batches is not None:
            await self.batches.close()
            self.batches = None


async def _check_schema(pool: asyncpg.Pool) -> None:
    latest = max((m.version for m in migrations("postgres")), default=0)
    if latest == 0:
        return
    try:
        current = await pool.fetchval("SELECT max(version) FROM schema_migrations")
    except asyncpg.UndefinedTableError:
        current = None
    if current is None or current < latest:
        raise SchemaError(
            f"database schema is at version {current or 0}, this proxy needs {latest}: "
            "run `python -m proxy migrate --config FILE` first"
        )


@contextlib.asynccontextmanager
async def bounded(pool: asyncpg.Pool, seconds: float) -> AsyncIterator[PoolConnectionProxy]:
    """A pooled connection for at most ``seconds`` in all (acquiring included).
    A connection still in use then, or whose user was cancelled or failed, is
    terminated rather than waited on again: a cancelled asyncpg statement sends a
    cancel request and its release a reset, each waiting on the same hung server."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    async with asyncio.timeout_at(deadline):
        conn = await pool.acquire()
    watchdog = loop.call_at(deadline, conn.terminate)
    try:
        yield conn
    except BaseException:
        conn.terminate()
        raise
    finally:
        try:
            await pool.release(conn)  # at once when terminated; else bounded by the watchdog
        finally:
            watchdog.cancel()


DB = web.AppKey("db", Db)


async def open_db(app: web.Application, config: Config) -> AsyncIterator[None]:
    """cleanup_ctx body: one ``Db`` per worker under ``app[DB]``."""
    db = await Db.open(config.database)
    app[DB] = db
    try:
        yield
    finally:
        await db.close()
