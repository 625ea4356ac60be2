"""Helpers for tests of API keys and rate limits (keys are recorded in SECRETS so the
session-wide log scan fails if one ever leaks)."""

from __future__ import annotations

import secrets
from typing import Any

import msgspec

from proxy import config as cfg
from proxy.db import DB
from proxy.keys import secret
from proxy.keys.store import KeyStore
from proxy.ratelimit.limiter import LIMITER, Limiter

from .conftest import SECRETS, UPSTREAM_KEY, Proxy


def declare(**fields: Any) -> tuple[str, cfg.DeclaredKey]:
    """A new key and its config declaration (by SHA-256, under a unique id)."""
    value = secret.generate()
    SECRETS.add(value)
    key = cfg.DeclaredKey(id=f"k-{secrets.token_hex(4)}", sha256=secret.digest(value), **fields)
    return value, key


def keyed(
    upstream_url: str,
    *keys: cfg.DeclaredKey,
    redis: str = "",
    prefix: str = "morngpt",
    auth: cfg.Auth | None = None,
    redis_timeout: float = 0.25,
    **limits: Any,
) -> cfg.Config:
    """A quick-start config with declared keys, a Redis (or none) and limiter settings.
    Tests that are not about a slow Redis pass a generous ``redis_timeout``: on a busy
    machine a 0.25 s call can time out and fail over, which is right but not their
    subject."""
    config = cfg.quick_start(upstream_url, UPSTREAM_KEY)
    return cfg.resolve(
        msgspec.structs.replace(
            config,
            keys=list(keys),
            redis=cfg.Redis(url=redis, key_prefix=prefix, timeout=redis_timeout),
            limits=cfg.Limits(**limits),
            auth=auth or cfg.Auth(),
        )
    )


async def issue(proxy: Proxy, name: str = "app", **fields: Any) -> tuple[str, str]:
    """Create a key in the proxy's own database: (key, key id)."""
    record, value = await KeyStore(proxy.runner.app[DB]).create(name, **fields)
    SECRETS.add(value)
    return value, record.id


def limiter(proxy: Proxy) -> Limiter:
    return proxy.runner.app[LIMITER]
