"""Shared fixtures: a fake upstream, the proxy as a real server on loopback, the
official OpenAI SDK as the client. Fixtures that start something also stop it."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

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
async def make_proxy() -> AsyncIterator[MakeProxy]:
    runners: list[web.AppRunner] = []

    async def make(config: cfg.Config) -> Proxy:
        runner = await start(with_server(config, host="127.0.0.1", port=0, grace_period=5.0))
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


def proxy_env() -> dict[str, str]:
    """Environment for running ``python -m proxy`` / ``bench`` in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
