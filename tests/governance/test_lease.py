"""Leases (proxy/governance/ratelimit/lease.py): a busy key's requests admitted from a
share of its buckets taken in one Redis call; never past the limit across workers,
exact near it, and what a lease did not use given back. Real Redis, real limiters
(one per worker), and real proxies for the limit across replicas."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.governance.keys.record import Key
from proxy.governance.ratelimit.bucket import Call, Verdict
from proxy.governance.ratelimit.lease import Lease
from proxy.governance.ratelimit.limiter import Limiter
from proxy.governance.ratelimit.shared import SERVER_TIME, connect
from proxy.governance.ratelimit.ticket import Ticket
from proxy.ops.metrics import LIMITER_CALLS
from tests.support.env import REDIS_URL
from tests.support.inproc import MakeProxy
from tests.support.keys import declare, keyed, limiter
from tests.support.servers import RedisServer

MakeLimiter = Callable[..., Awaitable[Limiter]]
# Redis calls each limiter made, by id(limiter) (a compiled Limiter takes no new
# attributes), counted by ``make_limiter``.
_calls: dict[int, int] = {}


@pytest.fixture
async def make_limiter(redis_prefix: str) -> AsyncIterator[MakeLimiter]:
    """Limiters on the shared Redis, one per simulated worker, under one prefix; each
    counts its calls to Redis (``calls``)."""
    made: list[Limiter] = []

    async def make(**limits: Any) -> Limiter:
        redis = cfg.Redis(url=REDIS_URL, key_prefix=redis_prefix, timeout=5.0)
        limiter = Limiter(cfg.Limits(**limits), redis, connect(redis))
        shared = limiter.shared
        assert shared is not None
        check_all = shared.check_all
        _calls[id(limiter)] = 0

        async def counted(scopes: Sequence[tuple[str, Call]]) -> list[Verdict]:
            _calls[id(limiter)] += 1
            return await check_all(scopes)

        shared.check_all = counted  # type: ignore[method-assign]
        made.append(limiter)
        return limiter

    yield make
    for worker in made:
        assert worker.shared is not None
        await worker.close()
        await worker.shared.client.aclose()
        del _calls[id(worker)]


def redis_calls(call: str) -> float:
    """``morngpt_limiter_redis_calls_total`` of one kind of call, in this process."""
    sample = REGISTRY.get_sample_value("morngpt_limiter_redis_calls_total", {"call": call})
    return sample or 0.0


def calls(limiter: Limiter) -> int:
    return _calls[id(limiter)]


async def admitted(limiter: Limiter, key: Key, cost: int) -> Ticket:
    ticket = await limiter.admit(key, cost)
    assert ticket.shared, "decided in process: Redis failed"
    return ticket


@pytest.mark.parametrize("tpm", [0, 1000])
def test_a_lease_answers_with_its_last_verdict_and_what_it_holds(tpm: int) -> None:
    """Every field of the verdict Redis gave the lease is carried over (a field added
    to ``Verdict`` fails this until ``Lease.take`` carries it), the levels with what
    the lease still holds."""
    typed = {"allowed": True, "kind": "requests", "epoch": "e1"}
    seen = Verdict._make(typed.get(name, i) for i, name in enumerate(Verdict._fields))
    lease = Lease(rpm=100, tpm=tpm, requests=5, tokens=50, verdict=seen)
    got = lease.take(10)
    assert got == seen._replace(
        requests_remaining=seen.requests_remaining + 4,
        tokens_remaining=seen.tokens_remaining + 40 if tpm else 0,
    )
    assert (lease.take(41) is None) == bool(tpm)  # more tokens than it holds


async def test_a_busy_key_makes_one_redis_call_per_lease(make_limiter: MakeLimiter) -> None:
    worker = await make_limiter()  # lease_share 0.01: 100 of rpm 10 000
    key = Key(id="busy", name="busy", rpm=10_000, tpm=10_000_000)
    before = {call: redis_calls(call) for call in LIMITER_CALLS}
    tickets = [await admitted(worker, key, 100) for _ in range(501)]
    assert all(t.verdict.allowed for t in tickets)
    # The first call learns the key's levels; then one call per lease of 100.
    assert calls(worker) == 1 + 5
    await worker.flush()  # counts the calls into their metric, then gives the rest back
    made = {call: redis_calls(call) - before[call] for call in LIMITER_CALLS}
    assert made == {"admission": 1, "lease": 5, "settlement": 0}
    first = tickets[0].verdict
    assert (first.requests_remaining, first.tokens_remaining) == (9_999, 10_000_000 - 100)
    # A leased admission says what this worker knows is left: one less each time.
    remaining = [t.verdict.requests_remaining for t in tickets]
    for lease in range(1, 501, 100):
        assert remaining[lease : lease + 100] == list(
            range(remaining[lease], remaining[lease] - 100, -1)
        )


async def test_keys_that_need_redis_per_request_never_lease(make_limiter: MakeLimiter) -> None:
    parallel = Key(id="par", name="par", rpm=10_000, max_parallel=1_000)
    plain = Key(id="plain", name="plain", rpm=10_000)
    leasing, never = await make_limiter(), await make_limiter(lease_share=0)
    for _ in range(20):
        await admitted(leasing, parallel, 1)
        await admitted(never, plain, 1)
    assert (calls(leasing), calls(never)) == (20, 20)
    for _ in range(20):
        await admitted(leasing, plain, 1)
    assert calls(leasing) == 20 + 2  # the same limits without max_parallel do lease


async def test_what_a_lease_did_not_use_goes_back_at_the_flush(make_limiter: MakeLimiter) -> None:
    key = Key(id="back", name="back", rpm=10_000, tpm=1_000_000)
    worker, other = await make_limiter(), await make_limiter()
    await admitted(worker, key, 1_000)
    await admitted(worker, key, 1_000)  # leases 10 (tokens: 1 % of tpm), uses 1
    assert calls(worker) == 2
    assert worker.leases["back"].requests == 9
    await worker.flush()
    assert not worker.leases
    # Three requests were used; the nine left and their 9 000 tokens are back.
    seen = (await admitted(other, key, 1_000)).verdict
    assert seen.requests_remaining >= 10_000 - 3
    assert seen.tokens_remaining >= 1_000_000 - 3_000


async def test_near_its_limit_every_request_goes_to_redis(make_limiter: MakeLimiter) -> None:
    key = Key(id="near", name="near", rpm=1_000)  # a lease: 10 requests
    worker = await make_limiter()
    await admitted(worker, key, 1)  # sees 999 left: room for leases
    shared = worker.shared
    assert shared is not None
    # Other workers drain the bucket to 5 requests meanwhile.
    drain = Call(SERVER_TIME, 1_000, 0, 0, 0, 0, True, "", "", 60_000, requests=994)
    assert (await shared.check("near", drain)).allowed
    before = calls(worker)
    ticket = await admitted(worker, key, 1)  # a lease of 10 does not fit; 1 does
    assert ticket.verdict.allowed
    assert calls(worker) == before + 2
    outcomes = [(await admitted(worker, key, 1)).verdict.allowed for _ in range(8)]
    assert outcomes[:4] == [True] * 4
    assert not outcomes[-1]
    assert calls(worker) == before + 2 + 8  # one call each: no lease near the limit


async def test_two_proxies_leasing_admit_the_limit_and_no_more(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    rpm = 600  # leases of 6 requests; one request back every 100 ms
    value, declared = declare(rpm=rpm)
    config = keyed(upstream.url, declared, redis=REDIS_URL, prefix=redis_prefix, redis_timeout=5.0)
    proxies = [await make_proxy(config, auth=True) for _ in range(2)]
    statuses: list[int] = []

    async def drive(url: str) -> None:
        refused = 0
        async with aiohttp.ClientSession() as http:
            while refused < 3:  # until this client is refused three times in a row
                async with http.post(
                    url + "/chat/completions",
                    json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {value}"},
                ) as resp:
                    await resp.read()
                    statuses.append(resp.status)
                    refused = refused + 1 if resp.status == 429 else 0

    started = time.monotonic()
    await asyncio.gather(*(drive(p.base) for p in proxies for _ in range(4)))
    elapsed = time.monotonic() - started
    assert set(statuses) == {200, 429}
    assert all(limiter(p).backend == "redis" for p in proxies)
    ok = statuses.count(200)
    # Every unit of the bucket was used (none stranded in a lease), none twice.
    assert rpm <= ok <= rpm + int(rpm * elapsed / 60) + 1, (ok, elapsed)


async def test_a_lease_admits_while_redis_hangs_and_goes_back_when_it_is_up(
    own_redis: RedisServer,
) -> None:
    """Redis paused (accepts, never answers): the lease in hand keeps admitting with
    no call; a key without one falls back; once Redis answers again, the flush gives
    the lease's unused part back."""
    config = cfg.Redis(url=own_redis.url, timeout=0.3)
    worker, other = (Limiter(cfg.Limits(), config, connect(config)) for _ in range(2))
    key, cold = Key(id="k", name="k", rpm=10_000), Key(id="cold", name="cold", rpm=10_000)
    try:
        await admitted(worker, key, 1)
        await admitted(worker, key, 1)  # leases 100, uses 1
        assert own_redis.proc is not None
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            leased = [await worker.admit(key, 1) for _ in range(10)]
            assert all(t.shared and t.verdict.allowed for t in leased)
            assert (await worker.admit(cold, 1)).shared is False  # timed out: fell back
            assert worker.backend == "local"
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        await worker._probe()
        assert worker.backend == "redis"
        await worker.flush()
        # 12 used (the first call, the lease's 1 and 10); the other 89 are back.
        seen = (await admitted(other, key, 1)).verdict
        assert seen.requests_remaining >= 10_000 - 13
    finally:
        for each in (worker, other):
            await each.close()
            assert each.shared is not None
            await each.shared.client.aclose()
