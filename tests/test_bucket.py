"""The token-bucket algorithm: one table of cases run against the Python twin
(``bucket.check``) and against bucket.lua on the real Redis, time passed in."""

from __future__ import annotations

import fnmatch
import random
import tomllib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.ratelimit.bucket import UNIT, Call, KeyState, Level, Verdict, check, take
from proxy.ratelimit.shared import RedisBuckets

from .conftest import REDIS_URL, ROOT


def call(
    now: int,
    *,
    rpm: int = 0,
    tpm: int = 0,
    parallel: int = 0,
    cost: int = 0,
    debt: int = 0,
    take: bool = True,
    slot: str = "",
    release: str = "",
    ttl: int = 60_000,
) -> Call:
    return Call(now, rpm, tpm, parallel, cost, debt, take, slot, release, ttl)


def ok(r_left: int = 0, r_reset: int = 0, t_left: int = 0, t_reset: int = 0) -> Verdict:
    return Verdict(True, "", r_left, r_reset, t_left, t_reset, 0)


def no(
    kind: str, retry: int, r_left: int = 0, r_reset: int = 0, t_left: int = 0, t_reset: int = 0
) -> Verdict:
    return Verdict(False, kind, r_left, r_reset, t_left, t_reset, retry)


Step = tuple[Call, Verdict]

CASES: dict[str, list[Step]] = {
    "a fresh bucket holds a minute's worth, then refuses": [
        (call(0, rpm=3), ok(2, 20_000)),
        (call(0, rpm=3), ok(1, 40_000)),
        (call(0, rpm=3), ok(0, 60_000)),
        (call(0, rpm=3), no("requests", 20_000, 0, 60_000)),
    ],
    "refill admits again exactly when a token is back": [
        (call(0, rpm=2), ok(1, 30_000)),
        (call(0, rpm=2), ok(0, 60_000)),
        (call(29_999, rpm=2), no("requests", 1, 0, 30_001)),
        (call(30_000, rpm=2), ok(0, 60_000)),
    ],
    "refill is exact for limits that do not divide a minute": [
        # reset after the (i+1)th take: ceil((i + 1) * 60 000 / 7) ms
        *[(call(0, rpm=7), ok(6 - i, -(-(i + 1) * UNIT // 7))) for i in range(7)],
        (call(8_571, rpm=7), no("requests", 1, 0, 51_429)),
        (call(8_572, rpm=7), ok(0, 60_000)),
    ],
    "a refusal by tokens takes no request either": [
        (call(0, rpm=10, tpm=100, cost=30), ok(9, 6_000, 70, 18_000)),
        (call(0, rpm=10, tpm=100, cost=80), no("tokens", 6_000, 9, 6_000, 70, 18_000)),
        (call(0, rpm=10, tpm=100, cost=70), ok(8, 12_000, 0, 60_000)),
    ],
    "a request larger than the bucket waits for a full one, then leaves debt": [
        (call(0, tpm=100, cost=250), ok(0, 0, 0, 150_000)),
        (call(0, tpm=100, cost=1), no("tokens", 90_600, 0, 0, 0, 150_000)),
        (call(90_599, tpm=100, cost=1), no("tokens", 1, 0, 0, 0, 59_401)),
        (call(90_600, tpm=100, cost=1), ok(0, 0, 0, 60_000)),
    ],
    "reconciliation refunds and charges, never above a full bucket": [
        (call(0, tpm=100, cost=50), ok(0, 0, 50, 30_000)),
        (call(0, tpm=100, debt=-30, take=False), ok(0, 0, 80, 12_000)),
        (call(0, tpm=100, debt=60, take=False), ok(0, 0, 20, 48_000)),
        (call(0, tpm=100, debt=-1000, take=False), ok(0, 0, 100, 0)),
        (call(0, tpm=100, debt=300, take=False), ok(0, 0, 0, 180_000)),
        (call(0, tpm=100, cost=1), no("tokens", 120_600, 0, 0, 0, 180_000)),
    ],
    "debt carried into an admission counts before the check": [
        (call(0, tpm=100, cost=90), ok(0, 0, 10, 54_000)),
        (call(0, tpm=100, cost=20, debt=-50), ok(0, 0, 40, 36_000)),
    ],
    "parallel slots: refused when all are taken, free again on release": [
        (call(0, parallel=2, slot="a"), ok()),
        (call(0, parallel=2, slot="b"), ok()),
        (call(0, parallel=2, slot="c"), no("parallel", 1000)),
        (call(1, release="a", take=False), ok()),
        (call(1, parallel=2, slot="c"), ok()),
        (call(1, parallel=2, slot="d"), no("parallel", 1000)),
    ],
    "a slot nobody released expires (crashed process)": [
        (call(0, parallel=1, slot="a", ttl=1000), ok()),
        (call(999, parallel=1, slot="b", ttl=1000), no("parallel", 1000)),
        (call(1000, parallel=1, slot="b", ttl=1000), ok()),
    ],
    "a refusal by slots takes no request and no tokens": [
        (call(0, rpm=5, tpm=100, parallel=1, cost=10, slot="a"), ok(4, 12_000, 90, 6_000)),
        (
            call(0, rpm=5, tpm=100, parallel=1, cost=10, slot="b"),
            no("parallel", 1000, 4, 12_000, 90, 6_000),
        ),
    ],
    "a clock that goes back refills nothing": [
        (call(10_000, rpm=1), ok(0, 60_000)),
        (call(5_000, rpm=1), no("requests", 60_000, 0, 60_000)),
        (call(70_000, rpm=1), ok(0, 60_000)),
    ],
    "settling takes nothing": [
        (call(0, rpm=1, take=False), ok(1, 0)),
        (call(0, rpm=1), ok(0, 60_000)),
    ],
}


@pytest.fixture
async def lua(redis_prefix: str) -> AsyncIterator[RedisBuckets]:
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        yield RedisBuckets(client, redis_prefix)
    finally:
        await client.aclose()


@pytest.mark.parametrize("steps", list(CASES.values()), ids=list(CASES))
async def test_python_and_lua_agree_on_every_case(lua: RedisBuckets, steps: list[Step]) -> None:
    state = KeyState()
    key_id = f"case-{random.randrange(1 << 30)}"
    for i, (step, expected) in enumerate(steps):
        assert check(state, step) == expected, f"python, step {i}"
        assert await lua.check(key_id, step) == expected, f"lua, step {i}"


@pytest.mark.parametrize("seed", range(4))
async def test_python_and_lua_agree_on_random_traffic(lua: RedisBuckets, seed: int) -> None:
    """Random calls (time mostly forward, sometimes back; takes, debts, slots)."""
    rng = random.Random(seed)
    rpm, tpm, parallel = rng.choice((0, 1, 7, 60)), rng.choice((0, 13, 1000)), rng.randint(0, 3)
    state, now, slots = KeyState(), 1_000_000, [f"s{i}" for i in range(6)]
    key_id = f"fuzz-{seed}-{random.randrange(1 << 30)}"
    for i in range(150):
        now = max(0, now + rng.choice((0, 0, 1, 17, 999, 5_000, 61_000, -500)))
        step = call(
            now,
            rpm=rpm,
            tpm=tpm,
            parallel=parallel,
            cost=rng.choice((0, 1, 12, 400, 2_000)),
            debt=rng.choice((0, 0, -30, 45, -5_000)),
            take=rng.random() < 0.8,
            slot=rng.choice(slots),
            release=rng.choice(("", "", *slots)),
            ttl=rng.choice((500, 60_000)),
        )
        assert check(state, step) == await lua.check(key_id, step), f"step {i}: {step}"


def test_take_is_a_pure_function_of_its_arguments() -> None:
    empty = Level(0, 1_000)
    assert take(None, 5, 60, 60, 1) == (True, Level(59 * UNIT, 5), 0)
    assert take(empty, 1_000, 60, 60, 1) == (False, empty, 1_000)
    assert take(empty, 2_000, 60, 60, 1) == (True, Level(0, 2_000), 0)
    # The cost check is capped at a full bucket; the charge is not.
    assert take(None, 0, 60, 60, 100) == (True, Level(-40 * UNIT, 0), 0)


def test_the_lua_script_ships_in_the_package() -> None:
    """A wheel (the Docker image) must carry bucket.lua: it is package data."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = data["tool"]["setuptools"]["package-data"]["proxy"]
    assert any(fnmatch.fnmatch("ratelimit/bucket.lua", p) for p in patterns)
