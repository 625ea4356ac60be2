"""Shared fixtures: a fake upstream, the proxy as a real server on loopback, the
official OpenAI SDK as the client. Fixtures that start something also stop it."""

from __future__ import annotations

import os
import secrets
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import msgspec
import openai
import pytest
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from proxy import config as cfg
from proxy.app import STATE, State
from proxy.exchange import Exchange
from proxy.serve import start

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
CLIENT_KEY = "sk-client-key-should-never-travel"


class Recorder:
    """A sink that keeps every finished exchange, for assertions."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []

    def record(self, exchange: Exchange) -> None:
        self.exchanges.append(exchange)


class Proxy:
    def __init__(self, runner: web.AppRunner) -> None:
        self.runner = runner
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        self.base = f"{self.url}/v1"
        self.state: State = runner.app[STATE]
        self.recorder = Recorder()
        self.state.sinks.sinks.append(self.recorder)


MakeProxy = Callable[[cfg.Config], Awaitable[Proxy]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_server(config: cfg.Config, **server: object) -> cfg.Config:
    return msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, **server))


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream() as up:
        yield up


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    runners: list[web.AppRunner] = []

    async def make(config: cfg.Config) -> Proxy:
        config = with_server(config, host="127.0.0.1", port=0, grace_period=5.0)
        if not config.database.is_postgres:  # each test gets its own embedded database
            database = msgspec.structs.replace(
                config.database, sqlite_path=str(tmp_path / f"proxy{len(runners)}.db")
            )
            config = msgspec.structs.replace(config, database=database)
        runner = await start(config)
        runners.append(runner)
        return Proxy(runner)

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    return await make_proxy(cfg.quick_start(upstream.url, UPSTREAM_KEY))


@pytest.fixture
async def client(proxy: Proxy) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=CLIENT_KEY, max_retries=0) as c:
        yield c


PG_ADMIN_DSN = os.environ.get("MORNGPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MORNGPT_TEST_REDIS", "redis://127.0.0.1:6379/0")


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


def proxy_env() -> dict[str, str]:
    """Environment for running ``python -m proxy`` / ``bench`` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
