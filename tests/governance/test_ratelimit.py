"""Per-key limits through the proxy: OpenAI's rate-limit headers, 429s the SDK's own
retry gets past, token reservation and reconciliation (streams count fully),
parallel slots released on every path, and limits that hold across proxies sharing
one Redis."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from bench.fake_upstream import FakeUpstream
from tests.support.env import REDIS_URL, free_port
from tests.support.inproc import MakeProxy, Proxy
from tests.support.keys import client_leaves, declare, keyed, limiter

MESSAGES = [{"role": "user", "content": "hi"}]
GO_DURATION = re.compile(r"\d+ms|(\d+h)?(\d+m)?\d+(\.\d+)?s")
HEADERS = tuple(
    f"x-ratelimit-{what}-{kind}"
    for kind in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)

Backend = str  # "redis": the shared Redis; "memory": no Redis configured


@pytest.fixture(params=["redis", "memory"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return str(request.param)


async def limited(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    prefix: str,
    backend: Backend = "redis",
    limits: dict[str, Any] | None = None,
    **key: Any,
) -> tuple[Proxy, str]:
    """A proxy with one declared key (``key`` holds its limits): (proxy, key)."""
    value, declared = declare(**key)
    redis = REDIS_URL if backend == "redis" else ""
    config = keyed(
        upstream.url, declared, redis=redis, prefix=prefix, redis_timeout=5.0, **(limits or {})
    )
    return await make_proxy(config, auth=True), value


async def post(
    proxy: Proxy, key: str, headers: dict[str, str] | None = None, **body: Any
) -> tuple[int, dict[str, str], dict[str, Any]]:
    """One chat completion over plain HTTP: (status, headers, JSON body)."""
    payload = orjson.dumps({"model": "m1", "messages": MESSAGES, **body})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base + "/chat/completions",
            data=payload,
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as resp:
            raw = await resp.read()
            return (
                resp.status,
                dict(resp.headers),
                orjson.loads(raw) if not body.get("stream") else {},
            )


def refused(kind: str) -> float:
    return REGISTRY.get_sample_value("morngpt_ratelimited_requests_total", {"kind": kind}) or 0.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# --- Headers ------------------------------------------------------------------------


async def test_every_proxied_response_carries_the_six_headers(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key = await limited(make_proxy, upstream, redis_prefix, rpm=10, tpm=100_000)
    answers = [
        await post(proxy, key),
        await post(proxy, key, stream=True),
        await post(proxy, key, headers={"x-fake-status": "500"}),
    ]
    assert [status for status, _, _ in answers] == [200, 200, 500]
    for status, headers, _ in answers:
        lower = {k.lower(): v for k, v in headers.items()}
        assert all(h in lower for h in HEADERS), (status, headers)
        assert lower["x-ratelimit-limit-requests"] == "10"
        assert lower["x-ratelimit-limit-tokens"] == "100000"
        assert GO_DURATION.fullmatch(lower["x-ratelimit-reset-requests"])
        assert GO_DURATION.fullmatch(lower["x-ratelimit-reset-tokens"])
    remaining = [int(h["x-ratelimit-remaining-requests"]) for _, h, _ in answers]
    assert remaining == [9, 8, 7]  # rpm=10 refills one request per 6 s
    assert answers[0][1]["x-ratelimit-reset-requests"] in ("6s", "5.999s", "5.998s")


async def test_keys_without_limits_never_touch_redis(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    free, free_key = declare()
    capped, capped_key = declare(rpm=100)
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    proxy = await make_proxy(keyed(upstream.url, free_key, capped_key, redis=dead_redis), auth=True)
    for _ in range(5):
        status, headers, _ = await post(proxy, free)
        assert status == 200
        assert "x-ratelimit-limit-requests" not in headers
    assert limiter(proxy).backend == "redis"  # never tried, so never failed over
    assert (await post(proxy, capped))[0] == 200
    assert limiter(proxy).backend == "local"  # the limited key did try


# --- 429s -----------------------------------------------------------------------------


async def test_429_is_openai_shaped_and_says_when_to_retry(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key = await limited(make_proxy, upstream, redis_prefix, rpm=2)
    before = refused("requests")
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=key, max_retries=0) as client:
        for _ in range(2):
            await client.chat.completions.create(model="m1", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m1", messages=MESSAGES)
    error = caught.value
    assert error.code == "rate_limit_exceeded"
    assert error.body["type"] == "requests"  # type: ignore[index]
    headers = error.response.headers
    wait_ms = int(headers["retry-after-ms"])
    assert 25_000 < wait_ms <= 30_000  # rpm=2: a request comes back every 30 s
    assert int(headers["retry-after"]) == -(-wait_ms // 1000)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(upstream.received) == 2
    assert refused("requests") == before + 1


async def test_the_sdk_retry_succeeds_once_the_bucket_refills(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key = await limited(make_proxy, upstream, redis_prefix, rpm=60)  # one per second
    retrying = openai.AsyncOpenAI(base_url=proxy.base, api_key=key)  # default: 2 retries
    async with retrying:
        for _ in range(3):  # a refill may beat the SDK's first try; then drain again
            while (await post(proxy, key))[0] != 429:
                pass
            refusals = sum(ex.status == 429 for ex in proxy.recorder.exchanges)
            reply = await retrying.chat.completions.create(model="m1", messages=MESSAGES)
            assert reply.choices[0].message.content
            if sum(ex.status == 429 for ex in proxy.recorder.exchanges) > refusals:
                break
        else:
            pytest.fail("the SDK never met a 429")
    assert proxy.recorder.exchanges[-1].status == 200


# --- Tokens ---------------------------------------------------------------------------


async def test_tokens_are_reserved_then_reconciled_and_streams_count_fully(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream, backend: Backend
) -> None:
    proxy, key = await limited(
        make_proxy,
        upstream,
        redis_prefix,
        backend,
        limits={"default_max_tokens": 20},
        tpm=600,  # 10 tokens a second
    )
    # 1. The reservation is body/4 + max_tokens; the answer used 3 + 8 = 11 tokens.
    status, headers, _ = await post(proxy, key, max_tokens=500)
    assert status == 200
    reserved = -(-len(upstream.received[-1].body) // 4) + 500
    assert int(headers["x-ratelimit-remaining-tokens"]) in range(600 - reserved, 600 - reserved + 3)
    # 2. Only because the unused 500 - 8 came back does a second such request fit.
    status, headers, _ = await post(proxy, key, max_tokens=500)
    assert status == 200
    left = 600 - 11 - reserved
    assert int(headers["x-ratelimit-remaining-tokens"]) in range(left, left + 5)
    # 3. A stream reserves 20 (the default) but is charged all it generated.
    await post(proxy, key, headers={"x-fake-chunks": "300"}, stream=True)
    status, headers, _ = await post(proxy, key, max_tokens=1)
    assert status == 200
    assert int(headers["x-ratelimit-remaining-tokens"]) < 600 - 11 - 11 - 303 + 10
    # 4. A stream bigger than what is left puts the key in debt: it waits.
    await post(proxy, key, headers={"x-fake-chunks": "400"}, stream=True)
    status, headers, body = await post(proxy, key, max_tokens=1)
    assert status == 429
    assert body["error"]["type"] == "tokens"
    assert int(headers["retry-after-ms"]) > 5_000  # 10 tokens/s, more than 50 owed


# --- Parallel slots -------------------------------------------------------------------


async def _slots_in_redis(proxy: Proxy) -> int:
    shared = limiter(proxy).shared
    assert shared is not None
    key_id = next(iter(proxy.state.gate.lookup.fixed.values())).id  # type: ignore[attr-defined]
    async with aioredis.Redis.from_url(REDIS_URL) as client:
        return int(await client.zcard(shared.names(key_id)[2]))


async def test_a_slot_is_held_until_the_stream_ends_even_past_its_ttl(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key = await limited(
        make_proxy,
        upstream,
        redis_prefix,
        limits={"slot_ttl": 0.3, "flush_interval": 0.05},  # renewed every 0.1 s
        max_parallel=1,
    )
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
    slow = {"Authorization": f"Bearer {key}", "x-fake-chunks": "8", "x-fake-gap-ms": "150"}
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=body, headers=slow) as s:
            await s.content.readuntil(b"\n\n")
            for _ in range(3):  # over a second: three slot lifetimes
                status, _, answer = await post(proxy, key)
                assert status == 429
                assert "parallel" in answer["error"]["message"]
                await asyncio.sleep(0.35)
            assert (await s.read()).endswith(b"data: [DONE]\n\n")

    async def admitted() -> bool:
        return (await post(proxy, key))[0] == 200

    await until(admitted)
    assert await _slots_in_redis(proxy) == 0


@pytest.mark.parametrize(
    "ending", ["upstream-error", "client-gone-mid-stream", "cancelled-before-first-byte"]
)
async def test_the_slot_comes_back_on_every_path(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream, ending: str
) -> None:
    proxy, key = await limited(make_proxy, upstream, redis_prefix, max_parallel=1)
    auth = {"Authorization": f"Bearer {key}"}
    stream = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
    if ending == "upstream-error":  # 400: not retried, so routing keeps the deployment
        assert (await post(proxy, key, headers={"x-fake-status": "400"}))[0] == 400
    else:
        await client_leaves(upstream, proxy, stream, auth, ending)

    async def released() -> bool:
        return await _slots_in_redis(proxy) == 0

    await until(released)  # long before the slot's 60 s expiry
    assert (await post(proxy, key))[0] == 200


# --- Concurrency and replicas -----------------------------------------------------------


async def test_concurrent_requests_against_burst_b_admit_exactly_b(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream, backend: Backend
) -> None:
    proxy, key = await limited(make_proxy, upstream, redis_prefix, backend, rpm=5)
    statuses = await asyncio.gather(*(post(proxy, key) for _ in range(30)))
    assert sorted(s for s, _, _ in statuses) == [200] * 5 + [429] * 25
    assert limiter(proxy).backend == backend  # decided where it was meant to be


async def test_two_proxies_sharing_redis_admit_at_most_limit_plus_burst(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    rpm = 30  # burst 30, then one every 2 s
    value, declared = declare(rpm=rpm)
    config = keyed(upstream.url, declared, redis=REDIS_URL, prefix=redis_prefix, redis_timeout=5.0)
    proxies = [await make_proxy(config, auth=True) for _ in range(2)]
    admitted = 0

    async def drive(proxy: Proxy, until_time: float) -> None:
        nonlocal admitted
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < until_time:
                async with http.post(
                    proxy.base + "/chat/completions",
                    json={"model": "m1", "messages": MESSAGES},
                    headers={"Authorization": f"Bearer {value}"},
                ) as resp:
                    await resp.read()
                    assert resp.status in (200, 429)
                    admitted += resp.status == 200

    started = time.monotonic()
    deadline = started + 1.5
    await asyncio.gather(*(drive(p, deadline) for p in proxies for _ in range(4)))
    elapsed = time.monotonic() - started
    assert all(p.recorder.exchanges for p in proxies)  # both served
    assert rpm <= admitted <= rpm + int(rpm * elapsed / 60) + 1
    assert all(limiter(p).backend == "redis" for p in proxies)
