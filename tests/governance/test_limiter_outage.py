"""Redis down or slow under load: requests never hang and never fail, the limiter
falls back to in-process buckets (logged once, in the backend metric) and returns to
Redis by itself. Uses a throwaway ``redis-server`` on a free port, never the shared one.
"""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import REGISTRY

from bench.fake_upstream import FakeUpstream
from proxy.governance.ratelimit.bucket import Call
from proxy.governance.ratelimit.shared import SERVER_TIME, RedisBuckets
from tests.support.inproc import MakeProxy
from tests.support.keys import declare, keyed, limiter
from tests.support.load import keyed_load
from tests.support.servers import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
BODY = b'{"model": "m1", "messages": [{"role": "user", "content": "hi"}]}'


def backend_metric(name: str) -> float | None:
    return REGISTRY.get_sample_value("morngpt_limiter_backend", {"backend": name})


async def test_redis_killed_mid_load_then_restarted(
    own_redis: RedisServer,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    value, key = declare(rpm=1_000_000, tpm=100_000_000, max_parallel=100)
    # A killed Redis refuses connections at once; the generous timeout keeps a busy
    # machine's slow call from adding a failover this test does not expect.
    config = keyed(upstream.url, key, redis=own_redis.url, redis_timeout=1.0, flush_interval=0.1)
    proxy = await make_proxy(config, auth=True)
    limits = limiter(proxy)
    load = keyed_load(proxy.url, value)
    try:
        await load.reach(30)
        assert limits.backend == "redis"
        await own_redis.kill()
        await load.reach(len(load.statuses) + 60, lambda: limits.backend == "local")
        assert backend_metric("local") == 1
        assert backend_metric("redis") == 0
        await own_redis.start()
        await load.reach(len(load.statuses) + 60, lambda: limits.backend == "redis")
        assert backend_metric("redis") == 1
        await load.reach(len(load.statuses) + 30)
    finally:
        await load.stop()
    assert set(load.statuses) == {200}, "a request failed while Redis was away"
    messages = [r.getMessage() for r in caplog.records if r.name == "proxy.ratelimit"]
    assert sum("Redis unreachable" in m for m in messages) == 1  # once per state change
    assert sum("reachable again" in m for m in messages) == 1


async def test_a_slow_redis_costs_a_request_at_most_its_timeout(
    own_redis: RedisServer, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    value, key = declare(rpm=1_000_000)
    config = keyed(upstream.url, key, redis=own_redis.url, flush_interval=0.1)
    proxy = await make_proxy(config, auth=True)
    limits = limiter(proxy)
    load = keyed_load(proxy.url, value, clients=2)
    async with aioredis.Redis.from_url(own_redis.url) as admin:
        try:
            await load.reach(10)
            freeze = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "3"))
            await load.reach(len(load.statuses) + 20, lambda: limits.backend == "local")
            await freeze
            await load.reach(len(load.statuses) + 20, lambda: limits.backend == "redis")
        finally:
            await load.stop()
    assert set(load.statuses) == {200}
    # redis.timeout is 0.25 s; a request waiting out the 3 s freeze would show it.
    assert load.slowest < 2.0


# --- The pipelined link (ratelimit/shared.py) ------------------------------------------


def _call(tpm: int) -> Call:
    """An admission whose verdict tells which call it answered: a fresh key's token
    bucket holds ``tpm`` tokens, and the call takes 1."""
    return Call(SERVER_TIME, 0, tpm, 0, 1, 0, True, "", "", 60_000)


async def test_the_link_answers_each_call_its_own_reply_and_reloads_a_lost_script(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    buckets = RedisBuckets(client, "link")
    try:
        assert (await buckets.check("a", _call(100))).tokens_remaining == 99
        # A caller that goes away after its command was written: its reply is dropped,
        # never handed to the next call.
        gone = asyncio.create_task(buckets.check("b", _call(200)))
        await asyncio.sleep(0)
        gone.cancel()
        assert (await buckets.check("c", _call(300))).tokens_remaining == 299
        await client.script_flush()  # as after a Redis restart
        assert (await buckets.check("d", _call(400))).tokens_remaining == 399
    finally:
        await buckets.close()
        await client.aclose()


async def until_frozen(url: str) -> None:
    """Until the server no longer answers a PING within 0.1 s (a DEBUG SLEEP runs)."""
    async with asyncio.timeout(5):
        while True:
            async with aioredis.Redis.from_url(url, socket_timeout=0.1) as probe:
                try:
                    await probe.ping()
                except (TimeoutError, redis.exceptions.TimeoutError):
                    return
            await asyncio.sleep(0.01)


async def test_a_late_reply_fails_the_waiting_calls_at_their_deadline_and_the_link_reconnects(
    own_redis: RedisServer,
) -> None:
    client = aioredis.Redis.from_url(own_redis.url)
    buckets = RedisBuckets(client, "link", timeout=0.2)
    async with aioredis.Redis.from_url(own_redis.url) as admin:
        try:
            await buckets.check("a", _call(100))
            freeze = asyncio.create_task(admin.execute_command("DEBUG", "SLEEP", "2"))
            await until_frozen(own_redis.url)
            started = time.monotonic()
            first = asyncio.create_task(buckets.check("b", _call(200)))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(buckets.check("c", _call(300)))
            for late in (first, second):
                with pytest.raises(TimeoutError):
                    await late
            assert time.monotonic() - started < 1.5  # at the first deadline, not the freeze's end
            await freeze
            assert (await buckets.check("d", _call(400))).tokens_remaining == 399
        finally:
            await buckets.close()
            await client.aclose()
