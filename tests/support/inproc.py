"""The proxy as a real aiohttp server in the test's own process (the ``make_proxy``
and ``proxy`` fixtures build them), and what tests read from it."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol

import msgspec
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.exchange import Exchange
from proxy.state import STATE, State


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
        self.state.sinks.add(self.recorder)


class MakeProxy(Protocol):
    """``make_proxy(config, auth=False)``: auth stays off unless a test is about keys."""

    def __call__(self, config: cfg.Config, *, auth: bool = False) -> Awaitable[Proxy]: ...


def with_server(config: cfg.Config, **server: object) -> cfg.Config:
    return msgspec.structs.replace(config, server=msgspec.structs.replace(config.server, **server))


class MakeUpstream(Protocol):
    """``make_upstream(**options)``: a started ``FakeUpstream(**options)``
    (bench/fake_upstream.py), closed after the test."""

    def __call__(self, **options: Any) -> Awaitable[FakeUpstream]: ...
