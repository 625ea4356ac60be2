"""API keys in the database: PostgreSQL (asyncpg) or the embedded SQLite file, through
the worker's ``Db`` handle. Table ``api_keys`` (migration 0001).

The two backends run the same statements through ``Db`` (one SQL dialect, rewritten
for SQLite in db.py). Values differ only in type (PostgreSQL timestamps and jsonb,
SQLite Unix seconds and JSON text): timestamps go in as ``datetime`` and come back
through ``db.epoch``. Database exceptions are left to the caller (the lookup maps them
to a 503; the command line prints them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from time import time
from typing import Any

import msgspec

from ...db import Db, epoch, timestamp
from . import secret
from .record import Key

_COLUMNS = (
    "id, name, prefix, rpm, tpm, max_parallel, models, expires_at, revoked, metadata, created_at, "
    "budget, budget_period, budget_tz, team_id, role"
)
# Columns ``update`` may change, in a fixed order (never built from user input).
UPDATABLE = (
    "name", "rpm", "tpm", "max_parallel", "models", "expires_at", "metadata",
    "budget", "budget_period", "budget_tz", "team_id", "role",
)  # fmt: skip


_FIND = f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = $1"
_GET = f"SELECT {_COLUMNS} FROM api_keys WHERE id = $1"
_LIST = f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, id"
_OF_TEAM = f"SELECT {_COLUMNS} FROM api_keys WHERE team_id = $1 ORDER BY created_at, id"
_INSERT = (
    "INSERT INTO api_keys (id, name, prefix, key_hash, rpm, tpm, max_parallel, models, "
    "expires_at, revoked, metadata, created_at, updated_at, budget, budget_period, budget_tz, "
    "team_id, role) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12, $13, $14, $15, $16, $17)"
)
_REVOKE = "UPDATE api_keys SET revoked = $2, updated_at = $3 WHERE id = $1"


class KeyStore:
    """Create, find, list, revoke and update API keys."""

    def __init__(self, db: Db) -> None:
        self.db = db

    async def find(self, digest: str) -> Key | None:
        """The key stored under this SHA-256, revoked and expired ones included."""
        rows = await self.db.fetch(_FIND, digest)
        return self._key(rows[0]) if rows else None

    async def get(self, key_id: str) -> Key | None:
        rows = await self.db.fetch(_GET, key_id)
        return self._key(rows[0]) if rows else None

    async def all_keys(self) -> list[Key]:
        return [self._key(row) for row in await self.db.fetch(_LIST)]

    async def keys_of(self, team_id: str) -> list[Key]:
        """The keys of one team, revoked ones included."""
        return [self._key(row) for row in await self.db.fetch(_OF_TEAM, team_id)]

    async def create(
        self,
        name: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        models: Iterable[str] = (),
        expires_at: float | None = None,
        metadata: dict[str, Any] | None = None,
        budget: Decimal | None = None,
        budget_period: str = "monthly",
        budget_tz: str = "UTC",
        team_id: str | None = None,
        role: str = "member",
    ) -> tuple[Key, str]:
        """Store a new key; returns its record and the key itself (shown once)."""
        value = secret.generate()
        now = timestamp(time())  # what either backend stores and reads back
        expires = _when(expires_at)
        key = Key(
            id=secret.new_id(),
            name=name,
            prefix=secret.display_prefix(value),
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
            models=frozenset(models),
            expires_at=epoch(expires),
            metadata=metadata or {},
            created_at=now.timestamp(),
            budget=budget,
            budget_period=budget_period,
            budget_tz=budget_tz,
            team_id=team_id,
            role=role,
        )
        await self.db.execute(
            _INSERT,
            key.id,
            key.name,
            key.prefix,
            secret.digest(value),
            rpm,
            tpm,
            max_parallel,
            _json(sorted(key.models)),
            expires,
            False,
            _json(key.metadata),
            now,
            self._param("budget", budget),
            budget_period,
            budget_tz,
            team_id,
            role,
        )
        return key, value

    async def revoke(self, key_id: str) -> bool:
        """Mark a key revoked; False when there is no such key."""
        return await self.db.execute(_REVOKE, key_id, True, timestamp(time())) > 0

    async def update(self, key_id: str, changes: dict[str, Any]) -> Key | None:
        """Change some of ``UPDATABLE``; None when there is no such key."""
        columns = [c for c in UPDATABLE if c in changes]
        if unknown := set(changes) - set(UPDATABLE):
            raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
        values = [self._param(c, changes[c]) for c in columns]
        sets = [f"{c} = ${i}" for i, c in enumerate(columns, start=2)]
        sets.append(f"updated_at = ${len(columns) + 2}")
        sql = f"UPDATE api_keys SET {', '.join(sets)} WHERE id = $1"
        if not await self.db.execute(sql, key_id, *values, timestamp(time())):
            return None
        return await self.get(key_id)

    def _param(self, column: str, value: Any) -> Any:
        if column == "models":
            return _json(sorted(value))
        if column == "metadata":
            return _json(value)
        if column == "expires_at":
            return _when(value)
        return value

    def _key(self, row: Sequence[Any]) -> Key:
        key_id, name, prefix, rpm, tpm, parallel, models, expires, revoked, meta, created = row[:11]
        budget, period, tz, team_id, role = row[11:]
        return Key(
            id=key_id,
            name=name,
            prefix=prefix,
            rpm=rpm,
            tpm=tpm,
            max_parallel=parallel,
            models=frozenset(msgspec.json.decode(models, type=list[str])),
            expires_at=epoch(expires),
            revoked=bool(revoked),
            metadata=msgspec.json.decode(meta, type=dict[str, Any]),
            created_at=epoch(created) or 0.0,
            budget=None if budget is None else Decimal(budget),
            budget_period=period,
            budget_tz=tz,
            team_id=team_id,
            role=role,
        )


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _when(value: float | None) -> datetime | None:
    return None if value is None else timestamp(value)
