"""Teams: a group of keys (and of JWT users) with its own limits, budget and models.

A key belongs to at most one team (``Key.team_id``). A request is admitted only when
both the key and its team allow it: the model must be in both lists (an empty list
allows every model), and the limiter call reserves against both in one Redis round
trip (ratelimit/bucket.lua). Table ``teams`` (migration 0006), through the worker's
``Db`` like the key store.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from decimal import Decimal
from time import time
from typing import Any

import msgspec

from ...db import Db, epoch, timestamp
from . import secret

# A team's id names Redis keys and ledger rows: short, no spaces or braces.
TEAM_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class Team(msgspec.Struct, frozen=True):
    """One team's limits. A limit of None means none; empty ``models``: every model."""

    id: str
    name: str
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    models: frozenset[str] = frozenset()
    budget: Decimal | None = None
    budget_period: str = "monthly"
    budget_tz: str = "UTC"
    metadata: dict[str, Any] = {}
    created_at: float = 0.0

    @property
    def is_limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel or self.budget)

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


_COLUMNS = (
    "id, name, rpm, tpm, max_parallel, models, budget, budget_period, budget_tz, metadata, "
    "created_at"
)
# Columns ``update`` may change, in a fixed order (never built from user input).
UPDATABLE = (
    "name", "rpm", "tpm", "max_parallel", "models", "budget", "budget_period", "budget_tz",
    "metadata",
)  # fmt: skip
_GET = f"SELECT {_COLUMNS} FROM teams WHERE id = $1"
_LIST = f"SELECT {_COLUMNS} FROM teams ORDER BY created_at, id"
_INSERT = (
    "INSERT INTO teams (id, name, rpm, tpm, max_parallel, models, budget, budget_period, "
    "budget_tz, metadata, created_at, updated_at) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)"
)
_MEMBERS = "SELECT count(*) FROM api_keys WHERE team_id = $1"
_DELETE = "DELETE FROM teams WHERE id = $1"


class TeamInUse(Exception):
    """A team that still has keys cannot be deleted."""


class TeamStore:
    """Create, get, list, update and delete teams."""

    def __init__(self, db: Db) -> None:
        self.db = db

    async def get(self, team_id: str) -> Team | None:
        rows = await self.db.fetch(_GET, team_id)
        return _team(rows[0]) if rows else None

    find = get  # for ``KeyCache``, which caches teams by id as it caches keys by hash

    async def all_teams(self) -> list[Team]:
        return [_team(row) for row in await self.db.fetch(_LIST)]

    async def create(
        self,
        name: str,
        *,
        team_id: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_parallel: int | None = None,
        models: Iterable[str] = (),
        budget: Decimal | None = None,
        budget_period: str = "monthly",
        budget_tz: str = "UTC",
        metadata: dict[str, Any] | None = None,
    ) -> Team:
        """Store a new team (its id made up when not given). ``ValueError`` on a bad id."""
        team_id = team_id or "team_" + secret.new_id().removeprefix("key_")
        if not TEAM_ID.fullmatch(team_id):
            raise ValueError("a team id is 1 to 64 of A-Z a-z 0-9 _ . -")
        now = timestamp(time())
        team = Team(
            id=team_id,
            name=name,
            rpm=rpm,
            tpm=tpm,
            max_parallel=max_parallel,
            models=frozenset(models),
            budget=budget,
            budget_period=budget_period,
            budget_tz=budget_tz,
            metadata=metadata or {},
            created_at=now.timestamp(),
        )
        await self.db.execute(
            _INSERT,
            team.id,
            name,
            rpm,
            tpm,
            max_parallel,
            _json(sorted(team.models)),
            _param("budget", budget),
            budget_period,
            budget_tz,
            _json(team.metadata),
            now,
        )
        return team

    async def update(self, team_id: str, changes: dict[str, Any]) -> Team | None:
        """Change some of ``UPDATABLE``; None when there is no such team."""
        if unknown := set(changes) - set(UPDATABLE):
            raise ValueError(f"cannot update {', '.join(sorted(unknown))}")
        columns = [c for c in UPDATABLE if c in changes]
        values = [_param(c, changes[c]) for c in columns]
        sets = [f"{c} = ${i}" for i, c in enumerate(columns, start=2)]
        sets.append(f"updated_at = ${len(columns) + 2}")
        sql = f"UPDATE teams SET {', '.join(sets)} WHERE id = $1"
        if not await self.db.execute(sql, team_id, *values, timestamp(time())):
            return None
        return await self.get(team_id)

    async def delete(self, team_id: str) -> bool:
        """Delete a team without keys; False when there is none, ``TeamInUse`` when it
        still has keys (move or revoke them first: the ledger keeps the team's id)."""
        rows = await self.db.fetch(_MEMBERS, team_id)
        if rows and rows[0][0]:
            raise TeamInUse(f"team {team_id} still has {rows[0][0]} key(s)")
        return await self.db.execute(_DELETE, team_id) > 0


def _param(column: str, value: Any) -> Any:
    if column == "models":
        return _json(sorted(value))
    if column == "metadata":
        return _json(value)
    if column == "budget" and value is not None:
        return Decimal(value)
    return value


def _team(row: Sequence[Any]) -> Team:
    team_id, name, rpm, tpm, parallel, models, budget, period, tz, meta, created = row
    return Team(
        id=team_id,
        name=name,
        rpm=rpm,
        tpm=tpm,
        max_parallel=parallel,
        models=frozenset(msgspec.json.decode(models, type=list[str])),
        budget=None if budget is None else Decimal(budget),
        budget_period=period,
        budget_tz=tz,
        metadata=msgspec.json.decode(meta, type=dict[str, Any]),
        created_at=epoch(created) or 0.0,
    )


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()
