"""Fixtures and hooks of the whole suite: a fake upstream, the proxy as a real server
on loopback, the official OpenAI SDK as the client, the shared and throwaway backing
servers, the key-leak scan. Fixtures that start something also stop it. The helpers
they use, and that tests import, are in tests/support/."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import openai
import pytest
import redis.asyncio as aioredis
import uvloop
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.db import Db
from proxy.serve import start
from tests.support import leaks, properties
from tests.support.env import CLIENT_KEY, PG_ADMIN_DSN, REDIS_URL, ROOT, UPSTREAM_KEY
from tests.support.inproc import MakeProxy, MakeUpstream, Proxy, with_server
from tests.support.issuer import Issuer
from tests.support.servers import Cluster, RedisServer, cluster


def pytest_configure(config: pytest.Config) -> None:
    """The hypothesis profile (derandomized unless MORNGPT_HYPOTHESIS=wide), loaded
    before any test module builds its settings."""
    properties.load_profile()


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests run on uvloop, as every serve worker does: the proxy's protocols and
    transports must work on the loop they run on in production."""
    return {"uvloop": uvloop.new_event_loop}


_SESSION_START = time.time()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Report (never assert) the console's page load times the browser tests measured."""
    for measured in sorted((ROOT / "var" / "e2e").glob("load-*.txt")):
        if measured.stat().st_mtime >= _SESSION_START:
            terminalreporter.write_line(measured.read_text().strip())


@pytest.fixture
async def make_upstream() -> AsyncIterator[MakeUpstream]:
    """Fake upstreams (bench/fake_upstream.py, the one the benchmarks use) with
    options, each started on a free port and closed after the test."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**options: Any) -> FakeUpstream:
            return await stack.enter_async_context(FakeUpstream(**options))

        yield make


@pytest.fixture
async def upstream(make_upstream: MakeUpstream) -> FakeUpstream:
    return await make_upstream()


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    runners: list[web.AppRunner] = []

    async def make(config: cfg.Config, *, auth: bool = False) -> Proxy:
        config = with_server(config, host="127.0.0.1", port=0, grace_period=5.0)
        if not auth:
            config = msgspec.structs.replace(
                config, auth=msgspec.structs.replace(config.auth, enabled=False)
            )
        if not config.database.is_postgres:  # each test gets its own embedded database
            database = msgspec.structs.replace(
                config.database, sqlite_path=str(tmp_path / f"proxy{len(runners)}.db")
            )
            config = msgspec.structs.replace(config, database=database)
        if config.usage.spool_dir == cfg.Ledger().spool_dir:  # and its own usage spool
            usage = msgspec.structs.replace(config.usage, spool_dir=str(tmp_path / "spool"))
            config = msgspec.structs.replace(config, usage=usage)
        runner = await start(config)
        runners.append(runner)
        return Proxy(runner)

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    return await make_proxy(quick_start(upstream.url, UPSTREAM_KEY))


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=CLIENT_KEY, max_retries=0) as c:
        yield c


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix no other test (or test run) uses on the shared Redis; every
    key under it is deleted afterwards. Ask for it before ``make_proxy``, so the
    cleanup runs after the proxies closed (a closing limiter still writes)."""
    prefix = f"test-{os.getpid()}-{secrets.token_hex(4)}"
    yield prefix
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def pg_dsn() -> AsyncIterator[str]:
    """A fresh, empty PostgreSQL database on the shared server, dropped afterwards."""
    name = f"morngpt_test_{os.getpid()}_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield PG_ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def migrated_pg(pg_dsn: str) -> str:
    """A fresh PostgreSQL database with every migration applied."""
    from proxy.db import migrate

    await migrate(cfg.Database(url=pg_dsn))
    return pg_dsn


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> cfg.Database:
    """Each backend in turn: a SQLite file, then a fresh migrated PostgreSQL database."""
    if request.param == "postgres":
        return cfg.Database(url=request.getfixturevalue("migrated_pg"))
    return cfg.Database(sqlite_path=str(tmp_path / "backend.db"))


@pytest.fixture(params=["postgres", "sqlite"])
def unmigrated(request: pytest.FixtureRequest, tmp_path: Path) -> cfg.Database:
    """Each backend, empty: a fresh PostgreSQL database, then a new SQLite file (for
    tests of the migrations themselves)."""
    if request.param == "postgres":
        return cfg.Database(url=request.getfixturevalue("pg_dsn"))
    return cfg.Database(sqlite_path=str(tmp_path / "ledger.db"))


@pytest.fixture
async def db(database: cfg.Database) -> AsyncIterator[Db]:
    """The database handle the proxy's workers use, open on ``database``."""
    handle = await Db.open(database)
    try:
        yield handle
    finally:
        await handle.close()


@pytest.fixture(scope="session", autouse=True)
def _no_key_in_logs() -> Iterator[None]:
    """Capture every log record of the run (the proxy's at debug level, so nothing is
    filtered out before it is made) and fail if any known key appears in one, or in
    the output of a proxy subprocess (tests/support/leaks.py)."""
    capture = leaks.Capture()
    capture.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    proxy_log = logging.getLogger("proxy")
    access_log = logging.getLogger("proxy.access")  # does not propagate while it runs
    level = proxy_log.level
    proxy_log.setLevel(logging.DEBUG)
    logging.getLogger().addHandler(capture)
    access_log.addHandler(capture)
    try:
        yield
    finally:
        access_log.removeHandler(capture)
        logging.getLogger().removeHandler(capture)
        proxy_log.setLevel(level)
    found = leaks.leaks()
    assert not found, f"a key appeared in the logs: {found[:5]}"


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    """An OpenID Connect provider and JWT issuer on loopback (tests/support/issuer.py)."""
    issuer = Issuer()
    await issuer.start()
    try:
        yield issuer
    finally:
        await issuer.close()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[Cluster]:
    """A throwaway PostgreSQL server for the module's tests (never the shared one)."""
    with cluster() as server:
        yield server


@pytest.fixture
async def own_redis() -> AsyncIterator[RedisServer]:
    """A redis-server of this test's own on a free port, to kill, pause and restart
    (never the shared one)."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.returncode is None:
            server.proc.send_signal(signal.SIGCONT)  # a test may have paused it
        await server.kill()
