"""Database connections and versioned migrations, for PostgreSQL and embedded SQLite.

Migrations are plain SQL files, ``proxy/migrations/{postgres,sqlite}/NNNN_name.sql``,
applied in order, each in its own transaction, and recorded in
``schema_migrations``. On PostgreSQL an advisory lock serialises concurrent
``migrate`` runs (several replicas starting at once). SQLite is migrated
automatically when the proxy starts; PostgreSQL only by ``python -m proxy migrate``
(a deploy step), and ``serve`` refuses to start on a schema that is behind.

One connection holder per worker (``Db``) is shared by the key store, the usage
ledger, budgets and the report, and is the one way they reach a database (one SQL
dialect, rewritten for SQLite in ``lite``): an asyncpg pool, or for SQLite an aiosqlite
connection (keys, reads) plus the ledger's own ``BatchConnection`` (SQLite serialises
writers anyway; WAL mode lets the worker processes read concurrently).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from importlib import resources
from itertools import chain
from pathlib import Path
from types import NoneType
from typing import Any, Protocol, TypeVar

import aiosqlite
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .config.schema import Database

log = logging.getLogger("proxy.db")
_FILE = re.compile(r"(\d{4})_(\w+)\.sql")
# Arbitrary constant: the advisory lock id that serialises migrations.
_LOCK_ID = 0x6D6F726E
_T = TypeVar("_T")


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


# -- one SQL dialect -------------------------------------------------------------------
#
# Code writes SQL once, in PostgreSQL's dialect with ``$n`` placeholders, restricted to
# what both backends run the same way. ``lite`` is the one place it is rewritten for
# SQLite: placeholders, ``to_timestamp(x)`` (the ledger's staged Unix seconds) to
# ``x`` (SQLite keeps Unix seconds), and ``x::numeric`` (a staged decimal's text) to
# ``x`` (SQLite keeps the text). Values: pass ``datetime`` for timestamps and
# ``Decimal`` for exact amounts; SQLite stores them as Unix seconds and decimal text
# (the adapters below), and ``epoch`` reads either back.

_PLACEHOLDER = re.compile(r"\$(\d+)")
_TO_TIMESTAMP = re.compile(r"to_timestamp\((\w+)\)")
_TO_NUMERIC = re.compile(r"::numeric\b")  # SQLite keeps a decimal as its text
_LITE: dict[str, str] = {}
sqlite3.register_adapter(Decimal, str)
sqlite3.register_adapter(datetime, lambda value: value.timestamp())
# Bound as before (1/0, NULL), but found at once: sqlite3 looks for an adapter of a
# value of any other type than int, float, str and bytearray, and when none is
# registered it formats an AttributeError for each and drops it (a third of a ledger
# row's insert, which has 4-6 such values).
sqlite3.register_adapter(bool, int)
sqlite3.register_adapter(NoneType, lambda value: value)


def lite(sql: str) -> str:
    """``sql`` (PostgreSQL dialect) as SQLite runs it (cached)."""
    found = _LITE.get(sql)
    if found is None:
        found = _PLACEHOLDER.sub(r"?\1", _TO_NUMERIC.sub("", sql))
        found = _LITE[sql] = _TO_TIMESTAMP.sub(r"\1", found)
    return found


def epoch(value: datetime | float | None) -> float | None:
    """A timestamp read from either backend, as Unix seconds."""
    return value.timestamp() if isinstance(value, datetime) else value


def timestamp(value: float) -> datetime:
    """Unix seconds as the timestamp parameter both backends take."""
    return datetime.fromtimestamp(value, UTC)


class Tx(Protocol):
    """One transaction (``Db.transaction``), the same calls on both backends."""

    async def execute(self, sql: str, *args: object) -> int:
        """Run one statement; returns the number of rows it touched."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]: ...

    async def copy(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        """Bulk-insert ``rows`` into ``table`` (PostgreSQL: COPY)."""
        ...

    async def stage(self, table: str, columns: dict[str, str]) -> None:
        """Create the session's temporary staging ``table`` (``columns``: name → type)
        if missing; it is empty at the start of every transaction."""
        ...


class _PgTx:
    __slots__ = ("conn",)

    def __init__(self, conn: asyncpg.Connection | asyncpg.pool.PoolConnectionProxy) -> None:
        self.conn = conn

    async def execute(self, sql: str, *args: object) -> int:
        return _touched(await self.conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self.conn.executemany(sql, rows)

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self.conn.fetch(sql, *args)]

    async def copy(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        await self.conn.copy_records_to_table(table, records=rows, columns=columns)

    async def stage(self, table: str, columns: dict[str, str]) -> None:
        # ON COMMIT DELETE ROWS: emptied by every commit; created in each transaction if
        # missing, so it works behind a transaction pooler too.
        typed = ", ".join(f"{name} {kind}" for name, kind in columns.items())
        await self.conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {table} ({typed}) ON COMMIT DELETE ROWS"
        )


def _touched(status: str) -> int:
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


class BatchConnection:
    """The SQLite connection for batch writes (the usage ledger's), with one thread of
    its own: every statement of a transaction runs in that thread, in the order it was
    sent. A transaction whose await is cancelled or times out still sends its
    ``ROLLBACK``, which the thread runs after the statement in progress: a transaction
    is never left half done, and the next one starts clean. (The aiosqlite connection
    stays with reads and the key store, whose statements are atomic on their own.)"""

    def __init__(self, path: str, timeout: float) -> None:
        # timeout: how long a write waits for another process's write lock.
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            path, timeout=timeout, isolation_level=None, check_same_thread=False
        )
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger-sqlite")
        self._lock = asyncio.Lock()  # one transaction at a time

    async def _run(self, call: Callable[[sqlite3.Connection], _T]) -> _T:
        def run() -> _T:
            if self._conn is None:
                raise sqlite3.ProgrammingError("the ledger connection is closed")
            return call(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        async with self._lock:
            try:
                await self._run(lambda conn: conn.execute("BEGIN IMMEDIATE"))
                yield _LiteTx(self)
                await self._run(lambda conn: conn.execute("COMMIT"))
            except BaseException:
                # Sent even when cancelled: the thread runs it after what it is doing.
                done = asyncio.get_running_loop().run_in_executor(self._thread, self._rollback)
                await asyncio.shield(done)
                raise

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    async def close(self) -> None:
        """After the transaction in progress, if any."""
        await self._run(lambda conn: conn.close())
        self._conn = None
        self._thread.shutdown(wait=False)


class _LiteTx:
    __slots__ = ("batches",)

    def __init__(self, batches: BatchConnection) -> None:
        self.batches = batches

    async def execute(self, sql: str, *args: object) -> int:
        return await self.batches._run(lambda conn: conn.execute(lite(sql), args).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self.batches._run(lambda conn: conn.executemany(lite(sql), rows))

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return await self.batches._run(lambda conn: conn.execute(lite(sql), args).fetchall())

    async def copy(self, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]) -> None:
        await self.batches._run(lambda conn: _insert(conn, table, columns, rows))

    async def stage(self, table: str, columns: dict[str, str]) -> None:
        # Untyped columns keep values as they are bound (a declared type would give a
        # column an affinity: "uuid" or "numeric" would turn digit strings into numbers).
        def run(conn: sqlite3.Connection) -> None:
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} ({', '.join(columns)})")
            conn.execute(f"DELETE FROM {table}")  # SQLite has no ON COMMIT DELETE ROWS

        await self.batches._run(run)


# Placeholders one statement may hold in any SQLite (SQLITE_MAX_VARIABLE_NUMBER was 999
# before 3.32).
_MAX_MARKS = 999


def _insert(
    conn: sqlite3.Connection, table: str, columns: Sequence[str], rows: list[tuple[Any, ...]]
) -> None:
    """``rows`` into ``table``, as many rows a statement as its placeholders allow:
    ``executemany`` of one row a statement releases the GIL (and the event loop's
    thread takes it) around every row's step."""
    marks = "(" + ", ".join("?" * len(columns)) + ")"
    head = f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
    per = max(1, _MAX_MARKS // len(columns))
    whole = len(rows) - len(rows) % per
    if whole:
        values = ", ".join([marks] * per)
        chunks = (tuple(chain.from_iterable(rows[at : at + per])) for at in range(0, whole, per))
        conn.executemany(head + values, chunks)
    if whole < len(rows):
        conn.executemany(head + marks, rows[whole:])


class Db:
    """The worker's database handle, the one way code reaches either backend: ``fetch``,
    ``fetchval`` and ``execute`` for single statements, ``transaction`` for batches.
    SQL is PostgreSQL's dialect (see ``lite``). Database exceptions are the caller's.
    On PostgreSQL each call holds its connection for at most ``database.timeout`` in
    all, and a hung one is terminated, never waited on twice (``bounded``)."""

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

    @property
    def is_postgres(self) -> bool:
        return self.config.is_postgres

    async def fetch(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        if self.pool is not None:
            async with bounded(self.pool, self.config.timeout) as conn:
                return [tuple(row) for row in await conn.fetch(sql, *args)]
        async with self._sqlite().execute(lite(sql), args) as cursor:
            return [tuple(row) for row in await cursor.fetchall()]

    async def fetchval(self, sql: str, *args: object) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def execute(self, sql: str, *args: object) -> int:
        """Run one statement; returns the number of rows it touched."""
        if self.pool is not None:
            async with bounded(self.pool, self.config.timeout) as conn:
                return _touched(await conn.execute(sql, *args))
        async with self._sqlite().execute(lite(sql), args) as cursor:
            return cursor.rowcount

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Tx]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        if self.pool is not None:
            async with bounded(self.pool, self.config.timeout) as conn, conn.transaction():
                yield _PgTx(conn)
            return
        if self.batches is None:
            raise ConnectionError("the database handle is closed")
        async with self.batches.transaction() as tx:
            yield tx

    def _sqlite(self) -> aiosqlite.Connection:
        if self.sqlite is None:
            raise ConnectionError("the database handle is closed")
        return self.sqlite

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


@asynccontextmanager
async def open_db(config: Database) -> AsyncIterator[Db]:
    """The worker's one ``Db``, closed on the way out."""
    db = await Db.open(config)
    try:
        yield db
    finally:
        await db.close()
