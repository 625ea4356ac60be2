"""Helpers for tests of API keys and rate limits (keys are recorded in SECRETS so the
session-wide log scan fails if one ever leaks)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start, resolve
from proxy.governance.keys import secret
from proxy.governance.keys.store import KeyStore
from proxy.governance.ratelimit.limiter import Limiter
from proxy.state import STATE

from .env import UPSTREAM_KEY
from .inproc import Proxy
from .leaks import SECRETS


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
    config = quick_start(upstream_url, UPSTREAM_KEY)
    return resolve(
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
    record, value = await KeyStore(proxy.runner.app[STATE].db).create(name, **fields)
    SECRETS.add(value)
    return value, record.id


def limiter(proxy: Proxy) -> Limiter:
    limiter = proxy.runner.app[STATE].limiter
    assert limiter is not None  # a keyed proxy
    return limiter


async def client_leaves(
    upstream: FakeUpstream, proxy: Proxy, body: bytes, headers: dict[str, str], when: str
) -> None:
    """A streamed chat request whose client goes away: after the first event
    (``when="client-gone-mid-stream"``) or, cancelled, while the upstream holds the
    request before its first byte (``"cancelled-before-first-byte"``). What it held
    must come back either way."""
    url = proxy.base + "/chat/completions"
    async with aiohttp.ClientSession() as http:
        if when == "client-gone-mid-stream":
            async with http.post(url, data=body, headers={**headers, "x-fake-stall": "2"}) as resp:
                await resp.content.readuntil(b"\n\n")
            return
        assert when == "cancelled-before-first-byte", when
        task = asyncio.create_task(
            http.post(url, data=body, headers={**headers, "x-fake-stall": "before"})
        )
        await upstream.wait_received()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def config_file_for(tmp_path: Path, database: str) -> str:
    """A config file with this ``database`` (YAML flow text) and one model, for the
    ``keys`` and ``teams`` commands."""
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"database: {database}\nmodels: [{{name: a, deployments: [{{base_url: 'http://x'}}]}}]\n"
    )
    return str(path)
