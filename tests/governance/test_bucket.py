"""The token-bucket algorithm: one table of cases run against the Python twin
(``bucket.check``) and against bucket.lua on the real Redis, time passed in."""

from __future__ import annotations

import fnmatch
import random
import tomllib
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.governance.ratelimit.bucket import (
    UNIT,
    KeyState,
    Level,
    Settlement,
    check,
    check_all,
    take,
)
from proxy.governance.ratelimit.shared import RedisBuckets
from tests.support.bucket_cases import CASES, TEAM_CASES, Step, TeamStep, call
from tests.support.env import REDIS_URL, ROOT


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


@pytest.mark.parametrize("steps", list(TEAM_CASES.values()), ids=list(TEAM_CASES))
async def test_python_and_lua_agree_on_every_team_case(
    lua: RedisBuckets, steps: list[TeamStep]
) -> None:
    states: dict[str, KeyState] = {}
    run = random.randrange(1 << 30)
    # Scopes tagged as the limiter tags a team and its keys: one Redis Cluster slot.
    named = {"t": f"{{team:{run}}}", "a": f"{{team:{run}}}:a", "b": f"{{team:{run}}}:b"}
    for i, (scopes, expected) in enumerate(steps):
        python = check_all([states.setdefault(n, KeyState()) for n, _ in scopes],
                           [c for _, c in scopes])  # fmt: skip
        assert python == expected, f"python, step {i}"
        assert await lua.check_all([(named[n], c) for n, c in scopes]) == expected, f"lua, {i}"


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
            requests=rng.choice((1, 1, 1, 5, 100)),
            returned=rng.choice((0, 0, 0, 3, 70)),
        )
        assert check(state, step) == await lua.check(key_id, step), f"step {i}: {step}"


@pytest.mark.parametrize("seed", range(4))
async def test_python_and_lua_agree_on_random_budget_traffic(lua: RedisBuckets, seed: int) -> None:
    """Random budget calls over two periods: takes, settlements of earlier holds (some
    twice, some after they expired), delayed ones with an epoch, rebuilds, token debts."""
    rng = random.Random(100 + seed)
    state, now, holds = KeyState(), 1_000_000, [f"h{i}" for i in range(8)]
    taken: list[str] = []
    key_id = f"fuzz-budget-{seed}-{random.randrange(1 << 30)}"
    for i in range(200):
        now = max(0, now + rng.choice((0, 0, 1, 300, 999, 5_000, -200)))
        charge = rng.choice((0, 1, 40, 300, 2_000))
        step = call(
            now,
            tpm=rng.choice((0, 0, 1000)),
            cost=rng.choice((0, 5)),
            debt=rng.choice((0, 0, -3, 7)),
            take=rng.random() < 0.6,
            ttl=rng.choice((500, 60_000)),
            budget=rng.choice((1_000, 5_000)),
            period=rng.choice((1, 1, 1, 2)),
            hold=(hold := rng.choice(holds)),
            charge=charge,
            settlements=tuple(
                Settlement(
                    rng.choice(["", *taken[-4:]]),
                    rng.choice((0, 17, 250)),
                    rng.choice(("", "x", "y")),
                    now + rng.choice((-2_000, -1, 0, 1)),
                )
                for _ in range(rng.choice((0, 0, 1, 3)))
            ),
            base=rng.choice((-1, -1, -1, 0, 400)),
            epoch=rng.choice(("x", "y")),
            period_ttl=rng.choice((0, 3_600_000)),
        )
        expected = check(state, step)
        assert await lua.check(key_id, step) == expected, f"step {i}: {step}"
        if step.take and expected.allowed:
            taken.append(f"{hold}:{charge}")


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
    assert any(fnmatch.fnmatch("governance/ratelimit/bucket.lua", p) for p in patterns)
