"""A dependency that hangs (accepts, never answers) costs at most one bounded wait per
backoff window, never one per request (issue #15). Each fault goes through the fault
relay (tests/support/faultproxy.py) in three kinds: ``pause`` (a black hole), ``refuse`` (every
connection reset, as a server that is down) and ``cut`` (whatever is sent resets its
connection mid-message, again and again).

- PostgreSQL as the key store: requests with cached keys keep being served without
  waiting while the key refreshes back off; unknown keys get a prompt 503.
- Redis as the limiter: the parallel slots given back while Redis was away reach it
  when it is back, so no request gets a false 429 afterwards.
- PostgreSQL as the ledger, then SIGKILL of the proxy: every request answered more
  than the loss window (``flush_interval`` twice, plus slack) before the kill has
  its row, committed or spooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import msgspec
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.governance.keys import secret
from tests.support.env import PG_ADMIN_DSN, UPSTREAM_KEY
from tests.support.faultproxy import FaultProxy
from tests.support.figures import Relays, count, measure
from tests.support.inproc import MakeProxy, Proxy
from tests.support.keys import declare, issue, keyed, limiter
from tests.support.ledger import ledger_config as ledger_config_for
from tests.support.ledger import ledger_rows, spooled_request_ids
from tests.support.load import Load, keyed_load
from tests.support.served import serve
from tests.support.servers import RedisServer
from tests.support.wait import until

FAULTS = ["pause", "refuse", "cut"]


class Fault:
    """One kind of fault on ``relay``, from ``start`` until ``stop``."""

    def __init__(self, relay: FaultProxy, kind: str) -> None:
        self.relay = relay
        self.kind = kind
        self._cutting: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.kind == "pause":
            self.relay.pause()
        elif self.kind == "refuse":
            self.relay.refuse()
        else:
            self._cutting = asyncio.create_task(self._keep_cutting())

    async def _keep_cutting(self) -> None:
        while True:
            await self.relay.cut_after(0).wait()  # the next bytes anyone sends

    async def stop(self) -> None:
        if self._cutting is not None:
            self._cutting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._cutting
            self.relay._trigger = None  # disarm the last cut
        self.relay.resume()


def via(relay: FaultProxy, dsn: str) -> str:
    """``dsn`` (on the shared server's port) through the relay."""
    return dsn.replace(f":{pg_port()}/", f":{relay.port}/")


def pg_port() -> int:
    return int(PG_ADMIN_DSN.rsplit(":", 1)[1].split("/")[0])


class Timed:
    """The load (tests/support/load.py) in phases: clients sending chat requests back
    to back, each one's latency and status kept under the phase it started in; every
    request bounded so a hang fails the test instead of stalling it."""

    def __init__(self, url: str, key: str, clients: int = 4) -> None:
        self.load = keyed_load(url, key, clients, deadline=10.0)

    @property
    def latencies(self) -> dict[str, list[float]]:
        found: dict[str, list[float]] = {}
        for answer in self.load.answers:
            found.setdefault(answer.phase, []).append(answer.latency)
        return found

    @property
    def statuses(self) -> dict[str, list[int]]:
        found: dict[str, list[int]] = {}
        for answer in self.load.answers:
            found.setdefault(answer.phase, []).append(answer.status)
        return found

    async def run(self, phase: str, requests: int, seconds: float = 0.0) -> None:
        """Switch to ``phase`` and wait until it has ``requests`` answers and lasted
        ``seconds``."""
        self.load.phase = phase
        started = time.monotonic()

        def done() -> bool:
            answered = sum(answer.phase == phase for answer in self.load.answers)
            return answered >= requests and time.monotonic() - started >= seconds

        await self.load.reach(0, done, timeout=seconds + 30)

    async def stop(self) -> None:
        await self.load.stop()

    def p99(self, phase: str) -> float:
        return statistics.quantiles(self.latencies[phase], n=100)[98]


# PostgreSQL as the key store ----------------------------------------------------------------

KEY_DB_TIMEOUT = 2.0


@pytest.mark.parametrize("fault", FAULTS)
async def test_cached_keys_never_wait_for_a_hung_key_store(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    migrated_pg: str,
    relays: Relays,
    caplog: pytest.LogCaptureFixture,
    fault: str,
) -> None:
    relay = await relays.to(pg_port())
    database = cfg.Database(url=via(relay, migrated_pg), timeout=KEY_DB_TIMEOUT)
    config = quick_start(upstream.url, UPSTREAM_KEY)
    # cache_ttl 0.2 s: entries go stale many times during the fault.
    auth = cfg.Auth(cache_ttl=0.2, negative_ttl=0.2)
    config = msgspec.structs.replace(config, database=database, auth=auth)
    proxy = await make_proxy(config, auth=True)
    value, _ = await issue(proxy)
    load = Timed(proxy.url, value)
    faulty = Fault(relay, fault)
    try:
        await load.run("normal", requests=100)
        faulty.start()
        # Longer than the database timeout: a refresh that waited would show.
        await load.run("fault", requests=50, seconds=KEY_DB_TIMEOUT * 1.5)
        # An unknown key: a prompt 503 (we cannot tell), not a wait on the store.
        started = time.monotonic()
        async with aiohttp.ClientSession() as http:
            unknown = {"Authorization": f"Bearer {secret.generate()}"}
            url = proxy.base + "/chat/completions"
            async with http.post(url, data=b"{}", headers=unknown) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
        assert time.monotonic() - started < 1.0
        await faulty.stop()
        await load.run("after", requests=50)
    finally:
        await load.stop()
        await faulty.stop()
    assert "key store unreachable" in caplog.text  # the fault reached the key store
    for phase in ("normal", "fault", "after"):
        assert set(load.statuses[phase]) == {200}, phase
    # Before the fix every stale entry cost a wait of the whole timeout.
    assert max(load.latencies["fault"]) < KEY_DB_TIMEOUT * 0.75, "a request waited on the store"
    normal, hung = load.p99("normal") * 1000, load.p99("fault") * 1000
    measure(
        f"cached keys, PostgreSQL {fault}",
        f"p99 {normal:.1f} ms before, {hung:.1f} ms during ({hung / normal:.2f}x); "
        f"{len(load.latencies['fault'])} requests in {KEY_DB_TIMEOUT * 1.5:g} s",
    )
    count(served=sum(len(s) for s in load.statuses.values()))


# Redis as the limiter ---------------------------------------------------------------------

STREAM = orjson.dumps(
    {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
)


@contextlib.asynccontextmanager
async def streams(proxy: Proxy, key: str, n: int) -> AsyncIterator[list[int]]:
    """``n`` streams held open (each past its first event); their statuses."""
    headers = {"Authorization": f"Bearer {key}", "x-fake-stall": "1"}
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def one() -> int:
            resp = await stack.enter_async_context(
                http.post(proxy.base + "/chat/completions", data=STREAM, headers=headers)
            )
            if resp.status == 200:
                await resp.content.readuntil(b"\n\n")
            return resp.status

        async with asyncio.timeout(10):
            yield list(await asyncio.gather(*(one() for _ in range(n))))
    # Leaving closes them: each client goes away mid-stream, its slot is settled.


async def backend_is(proxy: Proxy, name: str) -> None:
    async def there() -> bool:
        return limiter(proxy).backend == name

    await until(there, timeout=15)


@pytest.mark.parametrize("fault", FAULTS)
async def test_slots_given_back_during_a_redis_outage_reach_redis(
    own_redis: RedisServer,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    relays: Relays,
    fault: str,
) -> None:
    relay = await relays.to(own_redis.port)
    value, key = declare(rpm=1_000_000, tpm=100_000_000, max_parallel=4)
    redis = f"redis://127.0.0.1:{relay.port}/0"
    config = keyed(upstream.url, key, redis=redis, redis_timeout=0.3, flush_interval=0.1)
    proxy = await make_proxy(config, auth=True)  # slot_ttl: 60 s, the default
    limits = limiter(proxy)
    faulty = Fault(relay, fault)
    async with streams(proxy, value, 3) as statuses:
        assert statuses == [200] * 3
        assert limits.backend == "redis"
        assert len(limits.held) == 3  # taken in Redis
        faulty.start()
    # The three streams ended while Redis was away: their releases could not reach it.
    try:
        await backend_is(proxy, "local")

        async def owed() -> bool:
            return len(limits.releases) == 3

        await until(owed)
    finally:
        await faulty.stop()
    await backend_is(proxy, "redis")
    assert limits.releases == {}
    # All four slots are free in Redis again: four streams at once, none refused.
    async with streams(proxy, value, 4) as statuses:
        assert statuses == [200] * 4
    count(served=7)


# PostgreSQL as the ledger, then SIGKILL ---------------------------------------------------

FLUSH = 0.1
LEDGER_DB_TIMEOUT = 5.0  # long: a write that waits for it would break the loss window
# Queued, then one batch's deadline, + slack for a busy machine: still far below the
# database timeout that a write waiting on the hang would take.
LOSS_WINDOW = 2 * FLUSH + 1.0
FAULT_SECONDS = 3.0  # how long the fault lasts before the SIGKILL


async def _after(moment: float) -> bool:
    return time.monotonic() >= moment


def ledger_config(path: Path, upstream_url: str, dsn: str, spool: Path) -> None:
    config = {
        "models": [{"name": "*", "deployments": [{"base_url": upstream_url, "name": "up"}]}],
        "server": {"workers": 1, "grace_period": 5},
        "database": {"url": dsn, "timeout": LEDGER_DB_TIMEOUT},
        "usage": {"spool_dir": str(spool), "flush_interval": FLUSH},
    }
    path.write_bytes(orjson.dumps(config))


async def ledger_holds(dsn: str, ids: Callable[[], set[str]]) -> None:
    database = cfg.Database(url=dsn)

    async def there() -> bool:
        return ids() <= {row["request_id"] for row in await ledger_rows(database)}

    await until(there, timeout=30)


@pytest.mark.parametrize("fault", FAULTS)
async def test_sigkill_while_the_ledger_database_hangs_loses_at_most_the_loss_window(
    upstream: FakeUpstream, migrated_pg: str, relays: Relays, tmp_path: Path, fault: str
) -> None:
    relay = await relays.to(pg_port())
    spool = tmp_path / "spool"
    config = tmp_path / "proxy.json"
    ledger_config(config, upstream.url, via(relay, migrated_pg), spool)
    async with serve("--config", str(config)) as served:
        await served.wait_log("listening")
        traffic = Load(served.url, stream_headers={"x-fake-gap-ms": "5"}, on_failure="go on")
        await traffic.reach(30)
        faulty = Fault(relay, fault)
        faulty.start()
        try:
            # Longer than the loss window, shorter than the database timeout.
            started = time.monotonic()
            await traffic.reach(len(traffic.completed) + 100)
            await until(lambda: _after(started + FAULT_SECONDS))
            served.proc.send_signal(signal.SIGKILL)  # no drain, no flush
            killed_at = time.monotonic()
            await traffic.stop()
            await served.proc.wait()
        finally:
            await faulty.stop()
    spooled = set(spooled_request_ids(spool))
    # Replayed by a new process over the same spool, straight to the database.
    ledger_config(config, upstream.url, migrated_pg, spool)
    async with serve("--config", str(config)) as again:
        await again.wait_log("listening")
        await ledger_holds(migrated_pg, lambda: spooled)
        again.proc.send_signal(signal.SIGTERM)
        assert await again.wait_exit() == 0
    ids = {row["request_id"] for row in await ledger_rows(cfg.Database(url=migrated_pg))}
    missing = set(traffic.completed) - ids
    late = {rid for rid in missing if traffic.completed[rid] < killed_at - LOSS_WINDOW}
    assert late == set(), (len(late), len(traffic.completed))
    assert spooled, "nothing was spooled during the fault"
    measure(
        f"ledger, PostgreSQL {fault} then SIGKILL",
        f"{len(traffic.completed)} answered, {len(missing)} without a row (all finished "
        f"< {LOSS_WINDOW:g} s before the kill)",
    )
    count(faults=1, served=len(traffic.completed), lost=len(late))


async def test_a_slow_ledger_database_leaves_no_spool_after_shutdown(
    make_proxy: MakeProxy, upstream: FakeUpstream, migrated_pg: str, relays: Relays, tmp_path: Path
) -> None:
    """A database slow enough that writes outlast their deadline (each such batch is
    spooled while its write goes on), but answering: shutdown waits for the late write
    and replays the spool within its deadline, so nothing stays on disk and every
    request has its row once."""
    relay = await relays.to(pg_port())
    spool = tmp_path / "spool"
    database = cfg.Database(url=via(relay, migrated_pg), timeout=10.0)
    config = ledger_config_for(upstream.url, database, spool, shutdown_timeout=30.0)
    proxy = await make_proxy(config)
    relay.drip(0.001)  # answers byte by byte, 1 ms apart: past flush_interval (0.05 s)
    body = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession() as http:

        async def ask() -> None:
            async with http.post(f"{proxy.base}/chat/completions", data=body) as resp:
                assert resp.status == 200
                await resp.read()

        await asyncio.gather(*(ask() for _ in range(10)))  # a batch or two

        async def spooled() -> bool:
            return bool(list(spool.glob("*.jsonl")))

        await until(spooled)  # the slow path was taken
    await proxy.runner.cleanup()  # still slow: usage.shutdown_timeout bounds it
    assert list(spool.glob("*.jsonl")) == []
    rows = await ledger_rows(cfg.Database(url=migrated_pg))
    assert len(rows) == 10
    assert len({row["uid"] for row in rows}) == 10
