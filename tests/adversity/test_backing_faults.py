"""Redis and PostgreSQL failing under load, each a throwaway server of the test's own
(never the shared ones): paused with SIGSTOP (it accepts, it never answers), killed
with SIGKILL and restarted, and cut by a TCP relay in the middle of a command or of a
COPY. Clients must never notice; afterwards the ledger holds exactly one row per
answered request, and the proxy is back on Redis and the database by itself.

(Redis killed and restarted, and a slow Redis: tests/governance/test_limiter_outage.py;
PostgreSQL stopped and restarted: tests/usage/test_outage.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import msgspec
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model
from proxy.db import migrate
from proxy.state import STATE
from tests.support.figures import Relays, count
from tests.support.inproc import MakeProxy, Proxy
from tests.support.keys import declare, keyed, limiter
from tests.support.ledger import assert_same_requests, ledger_config, ledger_rows
from tests.support.load import Load, keyed_load
from tests.support.rawhttp import RawServer, read_request, response
from tests.support.servers import Cluster, RedisServer
from tests.support.wait import until

# Redis ----------------------------------------------------------------------------------


async def limited_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream, url: str
) -> tuple[Proxy, str]:
    """A proxy whose one key has limits, so every request asks Redis (at ``url``)."""
    value, key = declare(rpm=1_000_000, tpm=100_000_000, max_parallel=100)
    # redis.timeout 0.5: a pause or a cut shows within it; flush 0.1: probes come fast.
    config = keyed(upstream.url, key, redis=url, redis_timeout=0.5, flush_interval=0.1)
    return await make_proxy(config, auth=True), value


@contextlib.asynccontextmanager
async def under_load(proxy: Proxy, key: str) -> AsyncIterator[Load]:
    load = keyed_load(proxy.url, key)
    try:
        yield load
    finally:
        await load.stop()


async def test_redis_paused_accepts_but_never_answers(
    own_redis: RedisServer, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy, key = await limited_proxy(make_proxy, upstream, own_redis.url)
    limits = limiter(proxy)
    assert own_redis.proc is not None
    async with under_load(proxy, key) as load:
        await load.reach(20, lambda: limits.backend == "redis")
        own_redis.proc.send_signal(signal.SIGSTOP)
        try:
            await load.reach(len(load.statuses) + 40, lambda: limits.backend == "local")
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        await load.reach(len(load.statuses) + 40, lambda: limits.backend == "redis")
    assert set(load.statuses) == {200}, "a request failed while Redis was paused"
    assert load.slowest < 3.0  # bounded by redis.timeout, not by the pause
    count(faults=1, served=len(load.statuses))


@pytest.mark.parametrize("when", ["mid-command", "after-command"])
async def test_redis_cut_by_a_tcp_relay(
    own_redis: RedisServer,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    relays: Relays,
    when: str,
) -> None:
    """Mid-command: Redis gets half a command and a reset. After: Redis ran the script,
    the answer is lost. Either way the request goes on with in-process limits and the
    limiter comes back to Redis on a new connection."""
    relay = await relays.to(own_redis.port)
    proxy, key = await limited_proxy(make_proxy, upstream, f"redis://127.0.0.1:{relay.port}/0")
    limits = limiter(proxy)
    async with under_load(proxy, key) as load:
        for _ in range(3):
            await load.reach(len(load.statuses) + 20, lambda: limits.backend == "redis")
            cut = relay.cut_on(b"EVALSHA", after=when == "after-command")
            async with asyncio.timeout(10):
                await cut.wait()
        await load.reach(len(load.statuses) + 20, lambda: limits.backend == "redis")
    assert set(load.statuses) == {200}
    count(served=len(load.statuses))


# PostgreSQL -------------------------------------------------------------------------------


def holds(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``check`` as the async condition ``until`` polls."""

    async def condition() -> bool:
        return check()

    return condition


def cluster_pids(pg: Cluster) -> list[int]:
    """The postmaster and every process it started (backends, writer, checkpointer…)."""
    postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                    children.append(int(entry.name))
    return [postmaster, *children]


def signal_cluster(pg: Cluster, signum: int) -> list[int]:
    pids = cluster_pids(pg)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
    return pids


async def kill_cluster(pg: Cluster) -> None:
    """SIGKILL every process of the cluster, and wait until they are gone (reaped):
    a new postmaster refuses to start while the old pid still exists."""
    pids = signal_cluster(pg, signal.SIGKILL)
    async with asyncio.timeout(15):
        while any(Path(f"/proc/{pid}").exists() for pid in pids):  # noqa: ASYNC110
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def restarted(pg: Cluster) -> AsyncIterator[None]:
    """Whatever the test does to the cluster, it is running again afterwards."""
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            signal_cluster(pg, signal.SIGCONT)
        if not _running(pg):
            await asyncio.to_thread(pg.start)


def _running(pg: Cluster) -> bool:
    pid_file = pg.data / "postmaster.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
    except (ProcessLookupError, ValueError):
        return False
    return True


async def ledger_proxy(
    make_proxy: MakeProxy, upstream: FakeUpstream, url: str, tmp_path: Path
) -> tuple[Proxy, cfg.Database]:
    database = cfg.Database(url=url, timeout=1.0)
    config = ledger_config(upstream.url, database, tmp_path / "spool", high_water=50)
    return await make_proxy(config), database


async def fresh_database(pg: Cluster) -> str:
    url = await pg.create_database()
    await migrate(cfg.Database(url=url))
    return url


async def exactly_once(proxy: Proxy, database: cfg.Database, load: Load) -> None:
    """After the outage: every answered request has exactly one row, none dropped."""
    writer = proxy.runner.app[STATE].ledger

    async def all_in() -> bool:  # the spool replays once the backoff lets it try
        return len(await ledger_rows(database)) >= len(load.completed)

    await until(all_in, timeout=40)
    assert load.failed == {}
    await proxy.runner.cleanup()
    assert_same_requests(await ledger_rows(database), load.completed)
    assert writer.dropped == 0
    count(served=len(load.completed), lost=writer.dropped)


@pytest.mark.parametrize("how", ["sigkill-then-restart", "sigstop-then-sigcont"])
async def test_postgres_killed_or_paused_mid_load(
    pg_cluster: Cluster,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    proxy, database = await ledger_proxy(
        make_proxy, upstream, await fresh_database(pg_cluster), tmp_path
    )
    writer = proxy.runner.app[STATE].ledger
    load = Load(proxy.url)
    async with restarted(pg_cluster):
        try:
            await load.reach(30)
            await until(holds(lambda: writer.written > 0))
            if how.startswith("sigkill"):
                await kill_cluster(pg_cluster)
            else:
                signal_cluster(pg_cluster, signal.SIGSTOP)
            await load.reach(len(load.completed) + 60)
            # A write failed (refused, or timed out on the paused server) and rows spooled.
            await until(holds(lambda: "usage ledger: database unavailable" in caplog.text))
            await until(holds(lambda: writer.spooled > 0))
        finally:
            if how.startswith("sigkill"):
                await asyncio.to_thread(pg_cluster.start)
            else:
                signal_cluster(pg_cluster, signal.SIGCONT)
        await load.reach(len(load.completed) + 30)
        await load.stop()
    await exactly_once(proxy, database, load)
    count(faults=1)


@pytest.mark.parametrize(
    ("pattern", "after"),
    [(b"PGCOPY\n\xff\r\n\x00", False), (b"COMMIT", True)],
    ids=["mid-copy", "commit-answer-lost"],
)
async def test_postgres_cut_mid_copy_or_after_commit(
    pg_cluster: Cluster,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    relays: Relays,
    tmp_path: Path,
    pattern: bytes,
    after: bool,
) -> None:
    """Mid-COPY: the batch's transaction dies half-sent. After COMMIT: the rows are in,
    but the writer never hears so, spools them and replays them later. Either way each
    request ends up with exactly one row (the writes are idempotent on uid)."""
    url = await fresh_database(pg_cluster)
    relay = await relays.to(pg_cluster.port)
    through = url.replace(f":{pg_cluster.port}/", f":{relay.port}/")
    proxy, database = await ledger_proxy(make_proxy, upstream, through, tmp_path)
    writer = proxy.runner.app[STATE].ledger
    load = Load(proxy.url)
    for _ in range(3):
        await load.reach(len(load.completed) + 20)
        fired = relay.cut_on(pattern, after=after)
        async with asyncio.timeout(20):
            await fired.wait()
    await load.reach(len(load.completed) + 20)
    await load.stop()
    await exactly_once(proxy, msgspec.structs.replace(database, url=url), load)
    assert writer.spooled > 0  # the cut batches went through the spool


# Poison: what a client or an upstream sends must never wedge the ledger ---------------------


async def absurd_usage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """An upstream that reports usage no integer column can hold."""
    usage = {"prompt_tokens": 10**12, "completion_tokens": -5, "total_tokens": 2**70}
    body = msgspec.json.encode({"choices": [], "usage": usage})
    while await read_request(reader) is not None:
        writer.write(response(body))
        await writer.drain()


async def test_no_request_can_poison_the_ledger(
    pg_cluster: Cluster, make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A NUL in a model name (PostgreSQL text cannot hold it) and an upstream's absurd
    token counts (int4 cannot) used to fail their batch on every retry: the ledger
    spooled and replayed forever and every row after them waited."""
    url = await fresh_database(pg_cluster)
    async with RawServer(absurd_usage) as liar:
        model = Model(name="liar", deployments=[Deployment(base_url=liar.url)])
        config = ledger_config(upstream.url, cfg.Database(url=url, timeout=1.0), tmp_path)
        config = resolve(msgspec.structs.replace(config, models=[model, *config.models]))
        proxy = await make_proxy(config)
        async with aiohttp.ClientSession() as http:
            url_ = proxy.base + "/chat/completions"
            for body in (b'{"model": "m\\u0000"}', b'{"model": "liar"}', b'{"model": "m1"}'):
                async with http.post(url_, data=body) as resp:
                    await resp.read()
        writer = proxy.runner.app[STATE].ledger
        await until(holds(lambda: writer.written >= 3))
        await proxy.runner.cleanup()
    rows = sorted(await ledger_rows(cfg.Database(url=url)), key=lambda r: r["started_at"])
    assert [(r["status"], r["model"]) for r in rows] == [(400, ""), (200, "liar"), (200, "m1")]
    lying = rows[1]
    assert (lying["prompt_tokens"], lying["completion_tokens"]) == (2**31 - 1, 0)
    assert writer.spooled == writer.dropped == 0
    count(faults=2, served=3)
