"""Where ledger batches are committed, through ``Db`` (PostgreSQL or embedded SQLite).

One transaction per batch: the rows go to a staging table (PostgreSQL: COPY), are
inserted from it skipping those already there (idempotent on ``uid``: a batch written
twice, after a retry or a spool replay, leaves each row once), and the rows that went
in are added to the hourly and daily rollups (rollup.py) in the same transaction.

Every failure becomes one of two exceptions: ``DatabaseUnavailable`` (the database
could not take the batch: the writer spools it and retries later, never drops it) or
``Rejected`` (the database refused the batch for its data: retrying cannot help; the
writer's ``sift`` finds the bad rows, poison.py). On PostgreSQL the day partitions a
batch needs are made before its transaction (partitions.py).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

import asyncpg
from msgspec.structs import astuple

from ..db import Db, Tx
from ..errors import DatabaseUnavailable
from ..exchange import made_request_id
from . import rollup
from .partitions import Partitions
from .record import COLUMNS, Record

TABLE = "usage_records"
_LIST = ", ".join(COLUMNS)

# The staging table lives as long as the session and is empty at the start of every
# transaction (Db's ``stage``): creating and dropping one per batch cost more server
# CPU than a 100-row batch's inserts. Its started_at is the record's Unix seconds, so
# records are staged as they are (no datetime per row); the INSERT converts.
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
    # The decimal's text, made numeric by the merge: asyncpg's binary encoding of a
    # Decimal cost ~9,400 instructions a row, 13 % of the row's write (callgrind).
    "cost": "text",
    "team_id": "text",
}
_STAGING = {c: _STAGING_TYPES[c] for c in COLUMNS}
_COST = COLUMNS.index("cost")
# What the merge takes of a staged column, where it is not the column as it is.
_MERGED = {"started_at": "to_timestamp(started_at)", "cost": "cost::numeric"}
# ``WHERE true``: SQLite would read ON CONFLICT as a join's ON without it.
_INSERT = (
    f"INSERT INTO {TABLE} ({_LIST}) SELECT "
    + ", ".join(_MERGED.get(c, c) for c in COLUMNS)
    + " FROM usage_batch WHERE true ON CONFLICT DO NOTHING"
)
_MERGE = f"{_INSERT} RETURNING uid"
# PostgreSQL's merge returns the uids of the batch it did not insert (already there,
# or another writer's since), usually none, rather than every one it did: no UUID
# decoded (and no object for the collector) per row.
_MERGE_SKIPPED = (
    f"WITH added AS ({_MERGE}) SELECT uid FROM usage_batch WHERE uid NOT IN (SELECT uid FROM added)"
)
# The request id of a PostgreSQL row (NULL: the proxy made it from the uid, 37 bytes
# a row saved); SQLite keeps every request id as it is.
READ_REQUEST_ID = "coalesce(request_id, 'req_' || replace(uid::text, '-', ''))"
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    ConnectionError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    sqlite3.Error,
)
# Refusals for the data itself: the same batch would be refused again.
_REJECTED = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    ValueError,
    ArithmeticError,
)


class Rejected(Exception):
    """The database refused a batch for its data (a value out of range, a uid that is
    not a UUID…): written again, it would be refused again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Store(Protocol):
    async def write(self, batch: Sequence[Record]) -> None:
        """Commit ``batch`` and its rollups (rows already there are skipped), or raise
        ``DatabaseUnavailable`` or ``Rejected``."""
        ...


class LedgerStore:
    """Batches into the ledger through the worker's ``Db`` (either backend)."""

    __slots__ = ("db", "partitions", "timeout")

    def __init__(self, db: Db, timeout: float) -> None:
        self.db = db
        self.timeout = timeout
        self.partitions = Partitions(db) if db.is_postgres else None

    async def write(self, batch: Sequence[Record]) -> None:
        try:
            rows = self._rows(batch)
            async with asyncio.timeout(self.timeout):
                if self.partitions is not None:
                    await self.partitions.ensure(r.started_at for r in batch)
                async with self.db.transaction() as tx:
                    await tx.stage("usage_batch", _STAGING)
                    await tx.copy("usage_batch", COLUMNS, rows)
                    if self.partitions is None:
                        fresh = await _merge_lite(tx, batch)
                    else:
                        skipped = {u.hex for (u,) in await tx.fetch(_MERGE_SKIPPED)}
                        fresh = (
                            [r for r in batch if _hex(r.uid) not in skipped]
                            if skipped
                            else list(batch)
                        )
                    for width, changes in rollup.changes(fresh).items():
                        if changes:
                            await tx.stage(rollup.staging(width), rollup.STAGING)
                            await tx.copy(rollup.staging(width), rollup.COLUMNS, changes)
                            await tx.execute(rollup.merge(width))
        except asyncpg.CheckViolationError as exc:
            if self.partitions is not None and "no partition" in str(exc):
                # A day another process's retention dropped since this one made it:
                # not the row's fault; made again at the next try.
                self.partitions.known.clear()
                raise DatabaseUnavailable(_describe(exc)) from exc
            raise Rejected(_describe(exc)) from exc
        except _REJECTED as exc:
            raise Rejected(_describe(exc)) from exc
        except _UNAVAILABLE as exc:
            raise DatabaseUnavailable(_describe(exc)) from exc

    def _rows(self, batch: Sequence[Record]) -> list[tuple[Any, ...]]:
        """The staged rows. Raises ``ValueError`` for a uid that is not a UUID
        (PostgreSQL only: SQLite keeps any text), before anything is sent: asyncpg
        refusing a value in the middle of a COPY leaves its connection waiting.
        PostgreSQL stores a request id the proxy made (``req_<uid>``) as NULL:
        ``READ_REQUEST_ID`` gives it back; its cost goes as the decimal's text."""
        rows = [astuple(r) for r in batch]
        if self.partitions is None:
            return rows
        return [
            (
                r.uid if _PLAIN_UID(r.uid) else uuid.UUID(r.uid),
                None if r.request_id == made_request_id(r.uid) else r.request_id,
                *row[2:_COST],
                str(r.cost),
                *row[_COST + 1 :],
            )
            for r, row in zip(batch, rows, strict=True)
        ]


async def _merge_lite(tx: Tx, batch: Sequence[Record]) -> Sequence[Record]:
    """The staged batch into the ledger on SQLite; the records it added. Usually all of
    them: then one statement, without the RETURNING that hands back each uid (SQLite's
    module releases the GIL around each row it steps through, which the event loop's
    thread then takes). When some were there already (a replay), it is undone and
    merged again with RETURNING."""
    await tx.execute("SAVEPOINT merge")
    if await tx.execute(_INSERT) == len(batch):
        return batch
    await tx.execute("ROLLBACK TO merge")
    added = {u for (u,) in await tx.fetch(_MERGE)}
    return [r for r in batch if r.uid in added]


def store_for(db: Db) -> LedgerStore:
    """The ledger store of the worker's database handle."""
    return LedgerStore(db, db.config.timeout)


# The proxy's own uids (``unique_hex``), copied as they are; any other spelling is
# checked and converted by ``uuid.UUID`` (~1.1 µs, against ~0.17).
_PLAIN_UID = re.compile("[0-9a-f]{32}").fullmatch


def _hex(uid: str) -> str:
    """``uid`` as PostgreSQL gives it back (``UUID.hex``), whichever way it is written."""
    return uuid.UUID(uid).hex


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
