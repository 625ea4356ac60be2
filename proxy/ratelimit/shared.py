"""The Redis side of the limiter: ``bucket.lua`` loaded once (importlib.resources) and
registered once (EVALSHA; redis-py reloads it if Redis forgot it), one call per
admission or settlement.

Key names carry the API key id as a hash tag, ``{prefix}:{<key id>}:rq|tk|par``, and
for a key with a budget ``…:bg:<period>|bh:<period>`` (the period's start, Unix
seconds), so the keys one call touches sit on one Redis Cluster slot.

Redis exceptions are not mapped here: the limiter catches ``FAILURES`` and falls back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from importlib import resources

import redis.asyncio as aioredis
from aiohttp import web
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from ..config import Redis as RedisConfig
from .bucket import Call, Verdict

SCRIPT = (resources.files(__package__) / "bucket.lua").read_text()
# ``Call.now`` for Redis: let the script read the Redis server's clock, so every
# replica refills from one clock.
SERVER_TIME = -1
# What a slow, down or broken Redis raises (TimeoutError: our own per-call bound).
FAILURES = (RedisError, OSError, TimeoutError)
_KINDS = {
    b"": "",
    b"requests": "requests",
    b"tokens": "tokens",
    b"parallel": "parallel",
    b"budget": "budget",
    b"rebuild": "rebuild",
}

# One Redis, or a Redis Cluster (``redis.cluster``): the limiter uses either the same way.
Client = aioredis.Redis | RedisCluster
REDIS: web.AppKey[Client] = web.AppKey("redis")


def connect(config: RedisConfig) -> Client:
    """A client whose every call is bounded by ``config.timeout`` and never retried
    after a timeout: the limiter falls back at once instead (and probes for recovery
    itself). The one retry is for a dead pooled connection (Redis restarted since it
    was opened), which reconnects or fails at once. A cluster client still follows
    MOVED/ASK redirections (those are not retries)."""
    factory = RedisCluster.from_url if config.cluster else aioredis.Redis.from_url
    return factory(
        config.url,
        socket_timeout=config.timeout,
        socket_connect_timeout=config.timeout,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )


async def open_redis(app: web.Application, config: RedisConfig) -> AsyncIterator[None]:
    """cleanup_ctx body: the worker's Redis client under ``app[REDIS]`` (when a Redis is
    configured). Connects lazily: a Redis that is down at start stops nothing."""
    if not config.url:
        yield
        return
    client = app[REDIS] = connect(config)
    try:
        yield
    finally:
        await client.aclose()


class RedisBuckets:
    """``check`` (bucket.py) for one key, run by bucket.lua inside Redis."""

    def __init__(self, client: Client, prefix: str) -> None:
        self.client = client
        self.script = client.register_script(SCRIPT)
        self.prefix = prefix
        self._names: dict[str, tuple[str, str, str]] = {}

    def names(self, key_id: str) -> tuple[str, str, str]:
        """The request bucket, token bucket and slot set keys of one API key."""
        names = self._names.get(key_id)
        if names is None:
            tag = f"{self.prefix}:{{{key_id}}}"
            names = self._names[key_id] = (f"{tag}:rq", f"{tag}:tk", f"{tag}:par")
        return names

    def budget_names(self, key_id: str, period: int) -> tuple[str, str]:
        """The budget hash and reservation set of one API key in one period."""
        tag = f"{self.prefix}:{{{key_id}}}"
        return f"{tag}:bg:{period}", f"{tag}:bh:{period}"

    async def check(self, key_id: str, call: Call) -> Verdict:
        keys: tuple[str, ...] = self.names(key_id)
        if call.budget:
            keys += self.budget_names(key_id, call.period)
        reply = await self.script(keys=keys, args=_argv(call))
        allowed, kind, r_left, r_reset, t_left, t_reset, retry, left, held, epoch = reply
        return Verdict(
            bool(allowed), _KINDS[kind], r_left, r_reset, t_left, t_reset, retry,
            left, held, epoch.decode(),
        )  # fmt: skip

    async def renew(
        self,
        slots: Mapping[str, str],
        expiry_ms: int,
        ttl_ms: int,
        holds: Mapping[str, str] | None = None,
    ) -> None:
        """Push back the expiry of live slots (slot id → key id) and budget
        reservations (hold → its set's Redis key) so long streams keep theirs; one
        round trip. A slot or hold already gone stays gone (``XX``)."""
        pipe = self.client.pipeline(transaction=False)
        for slot, key_id in slots.items():
            pipe.zadd(self.names(key_id)[2], {slot: expiry_ms}, xx=True)
        for key_id in set(slots.values()):
            pipe.pexpire(self.names(key_id)[2], ttl_ms)
        for hold, name in (holds or {}).items():
            pipe.zadd(name, {hold: expiry_ms}, xx=True)
        await pipe.execute()

    async def ping(self) -> None:
        await self.client.ping()


def _argv(call: Call) -> tuple[str | int, ...]:
    now: str | int = "" if call.now == SERVER_TIME else call.now
    take = "1" if call.take else "0"
    head = (now, call.rpm, call.tpm, call.parallel, call.cost, call.debt, take, call.slot,
            call.release, call.slot_ttl, call.budget, call.hold, call.charge, call.base,
            call.epoch, call.period_ttl, call.hold_ttl)  # fmt: skip
    if not call.settlements:
        return head
    return head + tuple(value for settled in call.settlements for value in settled)
