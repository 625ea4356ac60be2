"""Shared fixtures: a fake upstream, the proxy as a real server on loopback, the
official OpenAI SDK as the client. Fixtures that start something also stop it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

import asyncpg
import msgspec
import openai
import pytest
import redis.asyncio as aioredis
import uvloop
from aiohttp import web
from hypothesis import settings

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.exchange import Exchange
from proxy.serve import start
from proxy.state import STATE, State

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM_KEY = "sk-upstream-secret-0123456789"
CLIENT_KEY = "sk-client-key-should-never-travel"
# Every key a test hands out: none may ever appear in a log (see ``_no_key_in_logs``).
# Tests that issue keys add them here.
SECRETS: set[str] = {UPSTREAM_KEY, CLIENT_KEY}

# Property tests are derandomized by default: every run of the suite tries the same
# examples, so CI never passes or fails by chance (no example database either). Each
# failure one of them ever found stays as an explicit ``@example``. The wide random
# search is ``tests/test_wide_search.py`` (``-m slow``): it runs them all again with
# MORNGPT_HYPOTHESIS=wide, random seeds and ``examples(n)`` twenty times larger.
WIDE = os.environ.get("MORNGPT_HYPOTHESIS") == "wide"
settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
settings.register_profile("wide", derandomize=False, database=None, print_blob=True)
settings.load_profile("wide" if WIDE else "fixed")


def examples(n: int) -> int:
    """How many examples a property test tries: ``n``, or twenty times that in the wide search."""
    return n * 20 if WIDE else n


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


class MakeProxy(Protocol):
    """``make_proxy(config, auth=False)``: auth stays off unless a test is about keys."""

    def __call__(self, config: cfg.Config, *, auth: bool = False) -> Awaitable[Proxy]: ...


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


PG_ADMIN_DSN = os.environ.get("MORNGPT_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("MORNGPT_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A Redis key prefix no other test (or test run) uses on the shared Redis; every
    key under it is deleted afterwards. Ask for it before ``make_proxy``, so the
    cleanup runs after the proxies closed (a closing limiter still writes)."""
    import redis.asyncio as aioredis

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


# --- Key-leak scan over the whole run ----------------------------------------------

# Formatted log records of the whole test run, and the stderr lines of proxy
# subprocesses (``watch_output``), scanned for SECRETS when the session ends.
CAPTURED: list[str] = []
_OUTPUTS: list[list[str]] = []
# The test's own clients log what they send (the SDK logs request options, headers
# included, at debug level): holding a key is their job, not a leak by the proxy.
_CLIENT_LOGGERS = ("openai", "httpx", "httpcore")


def watch_output(lines: list[str]) -> list[str]:
    """Register a subprocess's collected output lines for the end-of-run key scan."""
    _OUTPUTS.append(lines)
    return lines


class _Capture(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(_CLIENT_LOGGERS):
            CAPTURED.append(self.format(record))


@pytest.fixture(scope="session", autouse=True)
def _no_key_in_logs() -> Iterator[None]:
    """Capture every log record of the run (the proxy's at debug level, so nothing is
    filtered out before it is made) and fail if any known key appears in one."""
    capture = _Capture()
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
    texts = CAPTURED + [line for lines in _OUTPUTS for line in lines]
    leaks = [text[:300] for text in texts if any(key in text for key in SECRETS)]
    assert not leaks, f"a key appeared in the logs: {leaks[:5]}"


def proxy_env() -> dict[str, str]:
    """Environment for running ``python -m proxy`` / ``bench`` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


class RedisServer:
    """A redis-server process this test owns: started, killed and restarted at will."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--enable-debug-command", "yes"),
            stdout=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        async with aioredis.Redis.from_url(self.url) as client:
            while True:
                with contextlib.suppress(OSError, aioredis.ConnectionError):
                    if await client.ping():
                        return
                assert time.monotonic() < deadline, "redis-server did not start"
                await asyncio.sleep(0.02)

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


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
