"""The API key record, as the request path sees it (never the key itself)."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec

from ...config.schema import DeclaredKey


class Key(msgspec.Struct, frozen=True):
    """One API key's identity, permissions and limits. A limit of None means none."""

    id: str
    name: str
    prefix: str = ""
    rpm: int | None = None
    tpm: int | None = None
    max_parallel: int | None = None
    # Model names the key may use; empty: every model.
    models: frozenset[str] = frozenset()
    # Unix time after which the key no longer works; None: never.
    expires_at: float | None = None
    revoked: bool = False
    metadata: dict[str, Any] = {}
    created_at: float = 0.0
    # Spending limit per period in the prices' unit (None: none); see proxy/governance/budgets.py.
    budget: Decimal | None = None
    budget_period: str = "monthly"  # daily, weekly, monthly or total
    budget_tz: str = "UTC"  # IANA zone whose midnight starts a period
    # The team the key belongs to (None: none); its limits apply too (keys/teams.py).
    team_id: str | None = None
    # What the key may do on the admin API: "admin", "viewer" or "member" (identity.py).
    role: str = "member"

    @property
    def is_limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel or self.budget)

    @property
    def allowed_models(self) -> frozenset[str] | None:
        """``Caller.allowed_models`` (exchange.py): None when every model is allowed."""
        return self.models or None

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def is_usable(self, now: float) -> bool:
        """Neither revoked nor expired at unix time ``now``."""
        return not self.revoked and (self.expires_at is None or now < self.expires_at)


MASTER = Key(id="master", name="master key", role="admin")


def declared(key: DeclaredKey) -> Key:
    """The record of a key declared in the config file."""
    return Key(
        id=key.id,
        name=key.name or key.id,
        rpm=key.rpm,
        tpm=key.tpm,
        max_parallel=key.max_parallel,
        models=frozenset(key.models),
        expires_at=_timestamp(key.expires_at),
        metadata=key.metadata,
        budget=key.budget,
        budget_period=key.budget_period,
        budget_tz=key.budget_tz,
        team_id=key.team_id,
        role=key.role,
    )


def _timestamp(when: datetime | None) -> float | None:
    if when is None:
        return None
    if when.tzinfo is None:  # a bare date-time in a config file means UTC
        return when.replace(tzinfo=UTC).timestamp()
    return when.timestamp()
