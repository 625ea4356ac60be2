"""The Redis side of the limiter: ``bucket.lua`` loaded once (importlib.resources) and
called by its SHA (EVALSHA; loaded again if Redis forgot it), one call per admission
or settlement.

On one Redis the calls go over a ``Link`` (one pipelined connection per worker); on a
Redis Cluster through redis-py's cluster client, which routes each call to its slot's
node and follows redirections.

Key names carry the API key id as a hash tag, ``{prefix}:{<key id>}:rq|tk|par``, and
for a key with a budget ``…:bg:<period>|bh:<period>`` (the period's start, Unix
seconds), so the keys one call touches sit on one Redis Cluster slot. A key in a team
and the team itself are tagged with the team instead (``{prefix}:{team:<id>}:<key
id>:…`` and ``{prefix}:{team:<id>}:…``), so one call can check and reserve both.

Redis exceptions are not mapped here: the limiter catches ``FAILURES`` and falls back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ...config.schema import Redis as RedisConfig
from ...ops.metrics import LIMITER_CALLS, LIMITER_REDIS_CALLS
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
RedisClient = aioredis.Redis | RedisCluster


def connect(config: RedisConfig) -> RedisClient:
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


@contextlib.asynccontextmanager
async def open_redis(config: RedisConfig) -> AsyncIterator[RedisClient | None]:
    """The worker's Redis client, None when no Redis is configured. Connects lazily: a
    Redis that is down at start stops nothing."""
    if not config.url:
        yield None
        return
    client = connect(config)
    try:
        yield client
    finally:
        await client.aclose()


class Link:
    """One pipelined connection to one Redis server, for the limiter's calls.

    Why: a call through redis-py's client checks a connection out of its pool and
    back, runs its retry and observability layers, packs the command in Python and
    bounds the write (a task) and the read (a timer) on its own: about 50 µs of CPU
    per admission, the largest part of what a limited key cost (docs/performance.md).
    Here a call is a future and a share of one write (~10-15 µs): the calls made in
    one turn of the event loop go out together in one write (the first of them
    writes after the others joined it), Redis answers them in order, and one reader
    task hands each reply to the oldest waiting call (a cancelled caller's reply is
    dropped). Under load that is one send and one read for many requests.

    Each call waits at most ``timeout``: one timer per link, armed for the oldest
    call's deadline (re-armed for the next one when it fires too early), instead of
    one per call. A call that is late drops the connection: the calls waiting on it
    fail (TimeoutError) and the next call opens a new one. The connection is
    redis-py's own (URL, AUTH, TLS, database, protocol), made with the client's
    settings but no read timeout of its own: the reader waits as long as the link
    lives.
    """

    def __init__(self, make: Callable[[], AbstractConnection], timeout: float) -> None:
        self._make = make
        self.timeout = timeout
        self._conn: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        # Calls written and not answered yet, oldest first: (reply, deadline).
        self._waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._opening = asyncio.Lock()
        # Commands of this loop turn not written yet (None: no write pending).
        self._batch: list[bytes] | None = None

    async def call(self, *args: str | int) -> Any:
        """Send one command and wait for its reply (an error reply raises)."""
        conn = self._conn
        if conn is None or not conn.is_connected:
            async with asyncio.timeout(self.timeout):
                conn = await self._open()
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        deadline = loop.time() + self.timeout
        self._waiting.append((reply, deadline))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        packed = hiredis.pack_command(args)  # type: ignore[arg-type]  # its stub says 1-tuple
        if self._batch is not None:  # queued in the same order as ``_waiting``
            self._batch.append(packed)
            return await reply
        batch = self._batch = [packed]
        try:
            await asyncio.sleep(0)  # the calls made in this turn of the loop join
        except BaseException:
            reply.cancel()  # this caller is gone; its place in the queue stays
            raise
        finally:
            self._batch = None
            await _write(conn, batch)  # even when this caller is gone: others' are in it
        return await reply

    async def _open(self) -> AbstractConnection:
        async with self._opening:
            conn = self._conn
            if conn is None or not conn.is_connected:
                conn = self._make()
                await conn.connect()  # type: ignore[no-untyped-call]
                self._conn = conn
                self._waiting = deque()
                self._batch = None  # a batch started on the old connection stays there
                self._reader = asyncio.create_task(self._read(conn, self._waiting))
            return conn

    async def _read(
        self, conn: AbstractConnection, waiting: deque[tuple[asyncio.Future[Any], float]]
    ) -> None:
        """Hand each reply to the oldest waiting call, until the connection ends;
        then every call still waiting fails."""
        try:
            while True:
                try:
                    reply: Any = await conn.read_response()
                except ResponseError as error:  # an error reply: that call's answer
                    reply = error
                call = waiting.popleft()[0]
                if call.done():
                    continue
                if isinstance(reply, ResponseError):
                    call.set_exception(reply)
                else:
                    call.set_result(reply)
        except Exception:  # the connection ended (or a reply came for no call)
            pass
        finally:
            if self._conn is conn:
                self._conn = None
            _fail(waiting, RedisConnectionError("Redis connection lost"))
            await conn.disconnect(nowait=True)

    def _expire(self) -> None:
        """The timer: drop the link if its oldest call is late, else wait for the next
        deadline."""
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0][1]
        loop = asyncio.get_running_loop()
        if deadline > loop.time():
            self._timer = loop.call_at(deadline, self._expire)
            return
        _fail(self._waiting, TimeoutError(f"Redis did not answer within {self.timeout:g}s"))
        self.drop()

    def drop(self) -> None:
        """Close the connection (a call on it failed or was late); calls waiting on it
        fail, the next call opens a new one."""
        self._conn = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._reader is not None:
            self._reader.cancel()

    async def close(self) -> None:
        self.drop()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None


async def _write(conn: AbstractConnection, batch: list[bytes]) -> None:
    """Write ``batch``. Never raises: a connection that cannot take it is closed (by
    redis-py), and the end of its reader fails every call waiting on it."""
    if conn.is_connected:  # else its reader already failed the calls
        with contextlib.suppress(RedisError, OSError):
            await conn.send_packed_command(batch, check_health=False)


def _fail(waiting: deque[tuple[asyncio.Future[Any], float]], error: Exception) -> None:
    for call, _ in waiting:
        if not call.done():
            call.set_exception(error)
    waiting.clear()


def _link(client: aioredis.Redis, timeout: float) -> Link:
    """A ``Link`` to the server of ``client``'s pool, with its connection settings."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": None}
    return Link(lambda: pool.connection_class(**kwargs), timeout)


class RedisBuckets:
    """``check`` (bucket.py) for one key, run by bucket.lua inside Redis; each call
    waits at most ``timeout`` seconds (then raises TimeoutError)."""

    def __init__(self, client: RedisClient, prefix: str, timeout: float = 0.25) -> None:
        self.client = client
        self.timeout = timeout
        self.script = client.register_script(SCRIPT)
        self.link = _link(client, timeout) if isinstance(client, aioredis.Redis) else None
        self.prefix = prefix
        self._names: dict[str, tuple[str, str, str]] = {}
        # Calls made since the last ``fold``, by what they were for.
        self.calls = dict.fromkeys(LIMITER_CALLS, 0)

    def names(self, key_id: str) -> tuple[str, str, str]:
        """The request bucket, token bucket and slot set keys of one scope: an API key
        id (its own hash tag), or a scope that names its tag (``{team:t}:<key id>``,
        ``{team:t}``: a team's keys and its members' share its slot)."""
        names = self._names.get(key_id)
        if names is None:
            tag = f"{self.prefix}:{_tagged(key_id)}"
            names = self._names[key_id] = (f"{tag}:rq", f"{tag}:tk", f"{tag}:par")
        return names

    def budget_names(self, key_id: str, period: int) -> tuple[str, str]:
        """The budget hash and reservation set of one scope in one period."""
        tag = f"{self.prefix}:{_tagged(key_id)}"
        return f"{tag}:bg:{period}", f"{tag}:bh:{period}"

    async def check(self, key_id: str, call: Call) -> Verdict:
        return (await self.check_all([(key_id, call)]))[0]

    async def check_all(self, scopes: Sequence[tuple[str, Call]]) -> list[Verdict]:
        """``bucket.check_all`` for (scope, call) pairs, in one round trip."""
        first = scopes[0][1]
        self.calls[
            "lease" if first.requests > 1 else "admission" if first.take else "settlement"
        ] += 1
        keys: list[str] = []
        args: list[str | int] = ["" if first.now == SERVER_TIME else first.now]
        args.append(len(scopes))
        for scope, call in scopes:
            keys += self.names(scope)
            keys += self.budget_names(scope, call.period)
            args += _argv(call)
        reply = await self._run(tuple(keys), tuple(args))
        allowed, kind, retry, refused_by = reply[:4]
        verdicts = []
        for at in range(4, len(reply), 7):
            r_left, r_reset, t_left, t_reset, left, held, epoch = reply[at : at + 7]
            levels = (r_left, r_reset, t_left, t_reset, retry, left, held, epoch.decode())
            verdicts.append(Verdict(bool(allowed), _KINDS[kind], *levels, refused_by))
        return verdicts

    async def _run(self, keys: tuple[str, ...], args: tuple[str | int, ...]) -> Any:
        """bucket.lua with ``keys`` and ``args``: over the link, or the cluster client."""
        if self.link is None:
            async with asyncio.timeout(self.timeout):
                return await self.script(keys=keys, args=args)
        evalsha = ("EVALSHA", self.script.sha, len(keys), *keys, *args)
        try:
            return await self.link.call(*evalsha)
        except NoScriptError:  # Redis restarted, or its scripts were flushed
            await self.link.call("SCRIPT", "LOAD", SCRIPT)
            return await self.link.call(*evalsha)

    def fold(self) -> None:
        """Add the calls counted since the last fold to their metric (the limiter does
        it every ``limits.flush_interval``: no metric update per call)."""
        for call, count in self.calls.items():
            if count:
                LIMITER_REDIS_CALLS.labels(call).inc(count)
                self.calls[call] = 0

    def drop(self) -> None:
        """A call failed: open a fresh connection for the next one."""
        if self.link is not None:
            self.link.drop()

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()

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


def _tagged(scope: str) -> str:
    """A scope's Redis Cluster hash tag part: a key id gets its own tag, a scope
    that names one keeps it."""
    return scope if scope.startswith("{") else f"{{{scope}}}"


def _argv(call: Call) -> tuple[str | int, ...]:
    """One scope's block of bucket.lua's ARGV (after ``now`` and the scope count)."""
    take = "1" if call.take else "0"
    head = (call.rpm, call.tpm, call.parallel, call.cost, call.debt, take, call.slot,
            call.release, call.slot_ttl, call.budget, call.hold, call.charge, call.base,
            call.epoch, call.period_ttl, call.hold_ttl, call.requests, call.returned,
            len(call.settlements))  # fmt: skip
    if not call.settlements:
        return head
    return head + tuple(value for settled in call.settlements for value in settled)
