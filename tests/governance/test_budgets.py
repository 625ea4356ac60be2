"""Per-key budgets through the real proxy, on the shared Redis (a key prefix of each
test's own) and the usage ledger (SQLite per test, or a fresh PostgreSQL database):
the SDK sees ``insufficient_quota`` before any upstream call, reservations come back
on every path, a lost Redis state is rebuilt from the ledger (neither forgiven nor
counted twice) and so is a Redis restart or pause (a throwaway ``redis-server``),
periods roll over (time passed in), and two proxy processes sharing Redis never let
a small budget overshoot."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from bench.fake_upstream import FakeUpstream
from proxy.cli import main
from proxy.config import schema as cfg
from proxy.config.upstreams import Price
from proxy.db import Db
from proxy.errors import QuotaExceeded
from proxy.exchange import Exchange
from proxy.governance.keys.record import Key
from proxy.governance.periods import period_of, zone
from proxy.governance.ratelimit.limiter import Limiter
from proxy.governance.ratelimit.shared import connect
from proxy.governance.ratelimit.ticket import Ask
from proxy.http.wire import RequestView
from proxy.state import STATE
from proxy.usage.record import Record
from proxy.usage.store import store_for
from tests.support.env import REDIS_URL
from tests.support.inproc import MakeProxy, Proxy
from tests.support.keys import client_leaves, declare, keyed, limiter
from tests.support.leaks import SECRETS
from tests.support.ledger import ledger_rows
from tests.support.pair import Pair
from tests.support.servers import RedisServer
from tests.support.wait import until

D = Decimal
MESSAGES = [{"role": "user", "content": "hi"}]
# 0.001 per prompt token, 0.002 per completion token. The fake upstream counts "hi" as
# one prompt token and answers 8 tokens: every plain request costs 0.017 exactly.
PRICE = Price(prompt=D(1000), completion=D(2000))
COST = D("0.017")


def priced(
    upstream_url: str,
    *keys: cfg.DeclaredKey,
    prefix: str,
    database: cfg.Database | None = None,
    redis: str = REDIS_URL,
    redis_timeout: float = 5.0,
    **limits: Any,
) -> cfg.Config:
    """A quick-start config at ``PRICE`` with declared keys, a Redis (the shared one
    by default) and a fast-flushing ledger."""
    config = keyed(
        upstream_url, *keys, redis=redis, prefix=prefix, redis_timeout=redis_timeout, **limits
    )
    model = msgspec.structs.replace(config.models[0], price=PRICE)
    return msgspec.structs.replace(
        config,
        models=[model],
        usage=cfg.Ledger(flush_interval=0.05),
        database=database or cfg.Database(),
    )


async def budget_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream, prefix: str, budget: str, **fields: Any
) -> tuple[Proxy, str, str]:
    """A proxy with one declared key of a total budget: (proxy, key, key id)."""
    database = fields.pop("database", None)
    limits = fields.pop("limits", {})
    value, key = declare(budget=D(budget), budget_period="total", **fields)
    config = priced(upstream.url, key, prefix=prefix, database=database, **limits)
    return await make_proxy(config, auth=True), value, key.id


def sdk(proxy: Proxy, key: str, retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base, api_key=key, max_retries=retries)


async def settled(proxy: Proxy) -> None:
    """Every settlement of a finished request in Redis: they are owed, like token
    debts, until the key's next admission or the limiter's flush; and the request's
    cost in the metrics (folded, as a scrape would)."""

    async def done() -> bool:
        return not limiter(proxy).tasks

    await until(done)
    await limiter(proxy).flush()
    proxy.state.metrics.fold()


async def state(
    prefix: str, key_id: str, period: int = 0, url: str = REDIS_URL
) -> dict[str, int] | None:
    """The budget's Redis state: spent, and held by the live reservations (the stored
    sum forgets expired ones only at the key's next call); None when there is none."""
    async with aioredis.Redis.from_url(url) as client:
        saved = await client.hgetall(f"{prefix}:{{{key_id}}}:bg:{period}")
        seconds, micros = await client.time()
        live = await client.zrangebyscore(
            f"{prefix}:{{{key_id}}}:bh:{period}", seconds * 1000 + micros // 1000 + 1, "+inf"
        )
    held = sum(int(hold.rpartition(b":")[2]) for hold in live)
    return {"spent": int(saved[b"s"]), "held": held} if saved else None


async def forget(prefix: str, key_id: str) -> int:
    """Delete the key's budget state from Redis, as a flush or restart would."""
    async with aioredis.Redis.from_url(REDIS_URL) as client:
        names = [n async for n in client.scan_iter(match=f"{prefix}:{{{key_id}}}:b*")]
        return int(await client.delete(*names)) if names else 0


async def ledger_cost(database: cfg.Database, key_id: str) -> Decimal:
    return sum((D(r["cost"]) for r in await ledger_rows(database) if r["key_id"] == key_id), D(0))


async def committed(proxy: Proxy, count: int) -> list[dict[str, Any]]:
    """The ledger, once it holds ``count`` rows."""
    rows: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal rows
        rows = await ledger_rows(proxy.state.config.database)
        return len(rows) >= count

    await until(enough)
    return rows


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest) -> cfg.Database | None:
    """The ledger's database: a fresh PostgreSQL one, or (None) the proxy's own SQLite."""
    if request.param == "postgres":
        return cfg.Database(url=request.getfixturevalue("migrated_pg"))
    return None


# --- What the client sees ---------------------------------------------------------------


async def test_the_sdk_sees_insufficient_quota_before_any_upstream_call(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream, ledger: cfg.Database | None
) -> None:
    proxy, key, key_id = await budget_proxy(
        make_proxy, upstream, redis_prefix, "0.1", database=ledger
    )
    rejected, spent = (
        sample("morngpt_budget_rejections_total"),
        sample("morngpt_cost_total", model="*"),
    )
    answers = []
    async with sdk(proxy, key, retries=2) as client:  # x-should-retry: false stops retries
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model="m1", messages=MESSAGES, max_tokens=10
            )
            answers.append(raw.headers)
            await settled(proxy)
        sent = len(upstream.received)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
    error = caught.value
    assert error.code == "insufficient_quota"
    assert error.body["type"] == "insufficient_quota"  # type: ignore[index]
    assert "budget" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert len(upstream.received) == sent  # refused before any upstream call
    assert [ex.status for ex in proxy.recorder.exchanges] == [200] * 4 + [429]  # no retry
    # After each answer: what is left beyond this request's worst case (0.039).
    worst = D(-(-len(upstream.received[0].body) // 4)) * D("0.001") + D("0.020")
    remaining = [D(h["x-budget-remaining"]) for h in answers]
    assert remaining == [D("0.1") - n * COST - worst for n in range(4)]
    assert "x-budget-reset" not in answers[0]  # a total budget never resets
    assert sample("morngpt_budget_rejections_total") == rejected + 1
    assert sample("morngpt_cost_total", model="*") == pytest.approx(spent + 4 * 0.017)

    await proxy.runner.cleanup()  # the ledger drains on the way out
    rows = await ledger_rows(proxy.state.config.database)
    costs = sorted(D(r["cost"]) for r in rows)
    assert costs == [D(0)] + [COST] * 4  # exact, the refused request costs nothing
    assert await state(redis_prefix, key_id) == {"spent": 4 * 17_000_000, "held": 0}


async def test_keys_without_a_budget_never_touch_budget_state(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    value, key = declare(rpm=100)
    proxy = await make_proxy(priced(upstream.url, key, prefix=redis_prefix), auth=True)
    async with sdk(proxy, value) as client:
        reply = await client.chat.completions.with_raw_response.create(
            model="m1", messages=MESSAGES
        )
    assert "x-budget-remaining" not in reply.headers
    async with aioredis.Redis.from_url(REDIS_URL) as client:
        assert [n async for n in client.scan_iter(match=f"{redis_prefix}:*:b*")] == []
    await proxy.runner.cleanup()
    [row] = await ledger_rows(proxy.state.config.database)
    assert D(row["cost"]) == COST  # priced all the same


async def test_without_redis_the_budget_is_kept_in_process(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    value, key = declare(budget=D("0.06"), budget_period="total")
    config = msgspec.structs.replace(priced(upstream.url, key, prefix="unused"), redis=cfg.Redis())
    proxy = await make_proxy(config, auth=True)
    async with sdk(proxy, value) as client:
        for _ in range(2):  # 0.06 - 0.017 still holds a worst case (0.039); 0.026 not
            await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
    assert caught.value.code == "insufficient_quota"
    assert limiter(proxy).backend == "memory"


async def test_in_flight_reservations_ask_for_a_retry_not_a_new_quota(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # Room for one worst case (0.039) at a time, and for several real costs (0.017).
    proxy, key, _ = await budget_proxy(make_proxy, upstream, redis_prefix, "0.06")
    async with sdk(proxy, key) as client:
        slow = asyncio.create_task(
            client.chat.completions.create(
                model="m1",
                messages=MESSAGES,
                max_tokens=10,
                extra_headers={"x-fake-delay-ms": "300"},
            )
        )
        await upstream.wait_received()
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
        await slow
        await settled(proxy)
        await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
    headers = caught.value.response.headers
    assert caught.value.code == "insufficient_quota"
    assert (headers["x-should-retry"], headers["retry-after-ms"]) == ("true", "1000")
    assert "in flight" in caught.value.message


# --- Reservations come back --------------------------------------------------------------


@pytest.mark.parametrize(
    "ending", ["upstream-error", "client-gone-mid-stream", "cancelled-before-first-byte"]
)
async def test_a_reservation_comes_back_on_every_path(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream, ending: str
) -> None:
    proxy, key, key_id = await budget_proxy(make_proxy, upstream, redis_prefix, "0.05")
    auth = {"Authorization": f"Bearer {key}"}
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "max_tokens": 10, "stream": True})
    if ending == "upstream-error":
        async with aiohttp.ClientSession() as http:
            async with http.post(
                proxy.base + "/chat/completions",
                data=body,
                headers={**auth, "x-fake-status": "400"},
            ) as resp:
                assert resp.status == 400
    else:
        await client_leaves(upstream, proxy, body, auth, ending)

    async def released() -> bool:
        await settled(proxy)
        found = await state(redis_prefix, key_id)
        return found is not None and found["held"] == 0 and len(proxy.recorder.exchanges) == 1

    await until(released)
    exchange = proxy.recorder.exchanges[0]
    # What was used (nothing for a refused request, an estimate for a vanished client)
    # is spent; the rest of the reservation is free again.
    assert await state(redis_prefix, key_id) == {"spent": exchange.cost, "held": 0}
    assert (exchange.cost == 0) == (ending == "upstream-error")
    await proxy.runner.cleanup()
    assert await ledger_cost(proxy.state.config.database, key_id) == D(exchange.cost) / 10**9


async def test_the_reservation_of_a_dead_process_expires(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key, key_id = await budget_proxy(
        make_proxy, upstream, redis_prefix, "0.05", limits={"slot_ttl": 0.5}
    )
    # Another process reserves almost all of the budget, then dies without settling.
    config = proxy.state.config
    dead = Limiter(config.limits, config.redis, connect(config.redis))
    record = Key(id=key_id, name="k", budget=D("0.05"), budget_period="total")
    ask = Ask(50_000_000, 0, 45_000_000, 0, base=0, epoch="dead")
    assert (await dead.admit(record, 0, ask)).verdict.allowed
    assert dead.shared is not None
    await dead.shared.client.aclose()
    async with sdk(proxy, key) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)

        async def admitted() -> bool:  # once the hold is past its 0.5 s
            try:
                await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
            except openai.RateLimitError:
                return False
            return True

        await until(admitted)
    await settled(proxy)
    assert await state(redis_prefix, key_id) == {"spent": 17_000_000, "held": 0}


async def test_a_long_stream_keeps_its_reservation_past_the_ttl(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key, key_id = await budget_proxy(
        make_proxy, upstream, redis_prefix, "0.05", limits={"slot_ttl": 0.3, "flush_interval": 0.05}
    )
    async with sdk(proxy, key) as client:
        stream = await client.chat.completions.create(
            model="m1", messages=MESSAGES, max_tokens=10, stream=True,
            extra_headers={"x-fake-chunks": "8", "x-fake-gap-ms": "150"},
        )  # fmt: skip
        async for _ in stream:  # over a second: three reservation lifetimes
            found = await state(redis_prefix, key_id)
            assert found is not None
            assert found["held"] > 0
    await settled(proxy)
    found = await state(redis_prefix, key_id)
    assert found is not None
    assert found["held"] == 0


# --- Rebuilt from the ledger ----------------------------------------------------------


async def test_a_lost_state_is_rebuilt_from_the_ledger_neither_forgiven_nor_doubled(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream, ledger: cfg.Database | None
) -> None:
    proxy, key, key_id = await budget_proxy(
        make_proxy, upstream, redis_prefix, "1", database=ledger
    )
    async with sdk(proxy, key) as client:
        for _ in range(3):
            await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
        await committed(proxy, 3)
        # A stream that is in flight while Redis loses the state: its reservation goes
        # with it, its cost must still count once.
        stream = await client.chat.completions.create(
            model="m1", messages=MESSAGES, max_tokens=10, stream=True,
            extra_headers={"x-fake-chunks": "4", "x-fake-gap-ms": "100"},
        )  # fmt: skip
        assert await forget(redis_prefix, key_id) >= 1
        reply = await client.chat.completions.with_raw_response.create(
            model="m1", messages=MESSAGES, max_tokens=10
        )
        async for _ in stream:
            pass
        await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
    await settled(proxy)
    # Rebuilt from the three committed rows (0.051), then this request's worst case held.
    worst = D(-(-len(upstream.received[0].body) // 4)) * D("0.001") + D("0.020")
    assert D(reply.headers["x-budget-remaining"]) == D(1) - 3 * COST - worst
    found = await state(redis_prefix, key_id)
    await proxy.runner.cleanup()
    total = await ledger_cost(proxy.state.config.database, key_id)
    [streamed] = [ex for ex in proxy.recorder.exchanges if ex.stream]
    assert streamed.cost == 9_000_000  # 1 prompt token, 4 answer tokens
    assert total == 5 * COST + D("0.009")
    assert found == {"spent": int(total * 10**9), "held": 0}  # equal: nothing lost or doubled


@pytest.mark.parametrize("outage", ["restarted empty", "paused, state kept"])
async def test_a_redis_outage_neither_forgives_nor_doubles_spending(
    own_redis: RedisServer, make_proxy: MakeProxy, upstream: FakeUpstream, outage: str
) -> None:
    """Spend through Redis, then with Redis away (in process, rebuilt from the ledger),
    then through Redis again: Redis ends holding exactly what the ledger holds, whether
    it came back empty (rebuilt) or with its state (the spend it missed is owed)."""
    value, declared = declare(budget=D(1), budget_period="total")
    config = priced(
        upstream.url, declared, prefix="out", redis=own_redis.url, redis_timeout=0.25,
        flush_interval=0.05, slot_ttl=0.5,
    )  # fmt: skip
    proxy = await make_proxy(config, auth=True)
    assert own_redis.proc is not None

    async def ask(client: openai.AsyncOpenAI) -> None:
        await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)

    async with sdk(proxy, value) as client:
        for _ in range(3):
            await ask(client)
        await settled(proxy)
        await committed(proxy, 3)
        if outage == "restarted empty":
            await own_redis.kill()
        else:
            own_redis.proc.send_signal(signal.SIGSTOP)
        for _ in range(2):  # admitted in process: the ledger says 0.051 is spent
            await ask(client)
        assert limiter(proxy).backend == "local"
        await committed(proxy, 5)
        if outage == "restarted empty":
            await own_redis.start()
        else:
            own_redis.proc.send_signal(signal.SIGCONT)

        async def back() -> bool:
            return limiter(proxy).backend == "redis"

        await until(back)
        await ask(client)
        await settled(proxy)

    async def exact() -> bool:  # a hold of the call that timed out may take 0.5 s to go
        await settled(proxy)
        found = await state("out", declared.id, url=own_redis.url)
        return found == {"spent": 6 * 17_000_000, "held": 0}

    await until(exact)
    await proxy.runner.cleanup()
    assert await ledger_cost(proxy.state.config.database, declared.id) == 6 * COST


async def test_an_unreadable_ledger_refuses_with_503_not_a_free_pass(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key, _ = await budget_proxy(make_proxy, upstream, redis_prefix, "1")
    await proxy.runner.app[STATE].db.close()  # the ledger is gone (and the key is declared)
    async with sdk(proxy, key) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert upstream.received == []


# --- Periods roll over (time passed in) -----------------------------------------------------


async def test_a_daily_budget_rolls_over_at_local_midnight(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    value, declared = declare(budget=D("0.05"), budget_period="daily", budget_tz="Europe/Berlin")
    proxy = await make_proxy(priced(upstream.url, declared, prefix=redis_prefix), auth=True)
    gate = proxy.state.gate
    key = await gate.authenticate({"Authorization": f"Bearer {value}"})
    midnight = period_of("daily", zone("Europe/Berlin"), time.time()).start
    view = RequestView(model="m1", max_tokens=10)

    async def spend(when: float, nano: int) -> bool:
        exchange = Exchange("r", "chat/completions")
        exchange.started_at, exchange.body_bytes = when, 100
        try:
            grant = await gate.admit(key, view, exchange)
        except QuotaExceeded:
            return False
        exchange.cost = nano
        grant.settle(exchange)
        await settled(proxy)
        return True

    # The last second of yesterday (Berlin): 0.045 spent, the next worst case (0.045)
    # does not fit; the first second of today is a new period.
    assert await spend(midnight - 1, 45_000_000)
    assert not await spend(midnight - 0.5, 0)
    assert await spend(midnight, 1_000_000)
    assert await spend(midnight + 1, 0)
    yesterday = period_of("daily", zone("Europe/Berlin"), midnight - 1).id
    assert await state(redis_prefix, declared.id, yesterday) == {"spent": 45_000_000, "held": 0}
    assert await state(redis_prefix, declared.id, int(midnight)) == {"spent": 1_000_000, "held": 0}


# --- Visibility ------------------------------------------------------------------------


async def test_a_key_past_its_alert_share_is_logged_once(
    redis_prefix: str,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy, key, key_id = await budget_proxy(
        make_proxy, upstream, redis_prefix, "0.2", limits={"budget_alert_share": 0.3}
    )
    alerts = sample("morngpt_budget_alerts_total")
    async with sdk(proxy, key) as client:
        with caplog.at_level(logging.WARNING, logger="proxy.budget"):
            for _ in range(4):  # used: 0.039, 0.056, 0.073 (37 %), 0.090
                await client.chat.completions.create(model="m1", messages=MESSAGES, max_tokens=10)
                await settled(proxy)
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.budget"]
    assert len(lines) == 1, lines
    assert re.search(rf"budget alert: key {key_id} has used 3\d% of its total budget", lines[0])
    assert sample("morngpt_budget_alerts_total") == alerts + 1


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_keys_and_usage_commands_show_budget_spend_and_cost(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        database = cfg.Database(url=request.getfixturevalue("migrated_pg"))
        text = f"{{url: '{database.url}'}}"
    else:
        database = cfg.Database(sqlite_path=str(tmp_path / "k.db"))
        text = f"{{sqlite_path: '{database.sqlite_path}'}}"
    path = tmp_path / "proxy.yaml"
    path.write_text(
        f"database: {text}\nmodels: [{{name: a, deployments: [{{base_url: 'http://x'}}]}}]\n"
    )
    conf = ["--config", str(path)]

    budget = ["--budget", "5", "--budget-period", "weekly", "--budget-tz", "Europe/Berlin"]
    assert main(["keys", "create", "--name", "team", *budget, *conf]) == 0
    out, err = capsys.readouterr()
    SECRETS.add(out.strip())
    key_id = err.split()[1]
    assert main(["keys", "create", "--name", "free", *conf]) == 0
    SECRETS.add(capsys.readouterr().out.strip())
    assert main(["keys", "create", "--name", "x", "--budget-tz", "Mars/Base", *conf]) == 1
    assert "unknown time zone" in capsys.readouterr().err

    now = time.time()
    rows = [
        _row(f"{i:032x}", key_id, now - i, cost)
        for i, cost in enumerate(("1.25", "0.000000015", "0.5"))
    ]
    rows.append(_row("f" * 32, key_id, now - 8 * 86400, "9"))  # two weeks ago: last period's

    async def write() -> None:
        db = await Db.open(database)
        try:
            await store_for(db).write(rows)
        finally:
            await db.close()

    asyncio.run(write())

    assert main(["keys", "show", key_id, *conf]) == 0
    shown = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert shown["budget"] == "5.00 weekly (Europe/Berlin)"
    assert (shown["spent"], shown["left"]) == ("1.750000015", "3.249999985")
    assert re.match(r"\d{4}-\d\d-\d\dT00:00:00\+0[12]:00 to ", shown["period"])
    assert main(["keys", "show", key_id, "--json", *conf]) == 0
    described = orjson.loads(capsys.readouterr().out)
    assert (D(described["spent"]), D(described["left"])) == (D("1.750000015"), D("3.249999985"))

    assert main(["keys", "list", *conf]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[-3:] == ["BUDGET", "SPENT", "LEFT"]
    assert [line.split()[-3:] for line in listing[1:]] == [
        ["5.00/weekly", "1.750000015", "3.249999985"],
        ["-", "-", "-"],
    ]
    assert main(["keys", "update", key_id, "--budget", "0", *conf]) == 0
    capsys.readouterr()
    assert main(["keys", "show", key_id, *conf]) == 0
    assert "budget    -" in capsys.readouterr().out

    assert main(["usage", "--since", "1h", "--by", "key", *conf]) == 0
    table = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert table[0][4] == "cost"
    assert table[1][:5] == [key_id, "3", "3", "3", "1.750000015"]


def _row(uid: str, key_id: str, started: float, cost: str) -> Record:
    return Record(
        uid, "r", key_id, "chat/completions", "a", "d", 1, 1, 2, 0, 0, False, 200, False, None,
        started, 1.0, None, D(cost),
    )  # fmt: skip


# --- Two proxy processes sharing Redis ------------------------------------------------------


async def test_two_processes_never_overshoot_a_small_budget(pair: Pair, redis_prefix: str) -> None:
    """Sixteen clients over two ``serve`` processes spend a budget of 0.3 (about 17 real
    requests, 7 worst cases at once); each goes on until it gets a hard refusal."""
    out, err = await pair.command(
        "keys", "create", "--name", "team", "--budget", "0.3", "--budget-period", "total"
    )
    key, key_id = out.strip(), err.split()[1]
    SECRETS.add(key)
    async with pair.serving():
        outcomes = await pair.spend_until_refused([key], clients=16)
    assert outcomes["admitted"] >= 5
    assert outcomes["hard"] == 16  # every client ended on a hard refusal
    worst = D("0.039")  # ceil(~76 body bytes / 4) * 0.001 + 10 * 0.002, at most
    rows = await ledger_rows(cfg.Database(url=pair.dsn))
    spent = sum((D(r["cost"]) for r in rows), D(0))
    assert Counter(r["status"] for r in rows)[200] == outcomes["admitted"]
    assert spent == outcomes["admitted"] * COST
    assert spent <= D("0.3")  # never over: at most one worst case was promised
    assert D("0.3") - spent < worst  # and the budget was used up, not left idle
    assert await state(redis_prefix, key_id) == {"spent": int(spent * 10**9), "held": 0}
