"""Overload at twice the capacity: the proxy sheds the excess with fast 503s (with
Retry-After) and admitted requests keep their latency, instead of everything queueing
without bound behind an upstream that is already full.

Capacity here is an upstream that serves ``SLOTS`` requests at a time, ``SERVICE``
seconds each, and queues the rest (as vLLM does), with ``server.max_inflight`` set to
the same ``SLOTS``. The default run offers 2x for a few seconds; ``-m slow`` runs it
longer and also shows what happens without the bound."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import pytest
from aiohttp import web

from proxy.config.load import quick_start
from tests.support.env import free_port
from tests.support.figures import count, measure
from tests.support.inproc import MakeProxy, with_server
from tests.support.rawhttp import CHAT, CHAT_ANSWER

SLOTS = 8
SERVICE = 0.2  # seconds per request
CAPACITY = SLOTS / SERVICE  # requests per second


class QueueingUpstream:
    """``SLOTS`` requests at a time, the rest wait in line: a full GPU server."""

    def __init__(self) -> None:
        self.slots = asyncio.Semaphore(SLOTS)
        self.port = free_port()

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        async with self.slots:
            await asyncio.sleep(SERVICE)
        return web.Response(body=CHAT_ANSWER, content_type="application/json")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture
async def full_upstream() -> AsyncIterator[QueueingUpstream]:
    upstream = QueueingUpstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", upstream.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    try:
        yield upstream
    finally:
        await runner.cleanup()


@dataclass
class Outcome:
    latencies: dict[int, list[float]] = field(default_factory=dict)  # status → seconds
    retry_after: set[str] = field(default_factory=set)
    codes: set[str] = field(default_factory=set)

    def p99(self, status: int) -> float:
        values = sorted(self.latencies.get(status, []))
        return values[min(len(values) - 1, math.ceil(0.99 * len(values)) - 1)]

    def share(self, status: int) -> float:
        return len(self.latencies.get(status, [])) / sum(map(len, self.latencies.values()))


async def offer(url: str, rate: float, seconds: float) -> Outcome:
    """Open-loop load: a request every 1/rate seconds whatever happened to the last."""
    outcome = Outcome()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def one(at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            started = time.perf_counter()
            async with asyncio.timeout(30):
                async with http.post(url + "/chat/completions", data=CHAT) as resp:
                    body = await resp.read()
            outcome.latencies.setdefault(resp.status, []).append(time.perf_counter() - started)
            if resp.status == 503:
                outcome.retry_after.add(resp.headers.get("Retry-After", ""))
                outcome.codes.add(msgspec.json.decode(body)["error"]["code"])

        start = time.perf_counter() + 0.1
        total = int(rate * seconds)
        await asyncio.gather(*(one(start + i / rate) for i in range(total)))
    return outcome


async def overload(make_proxy: MakeProxy, upstream: QueueingUpstream, seconds: float) -> Outcome:
    config = with_server(quick_start(upstream.url, None), max_inflight=SLOTS)
    proxy = await make_proxy(config)
    outcome = await offer(proxy.base, 2 * CAPACITY, seconds)
    count(faults=1, served=sum(map(len, outcome.latencies.values())))
    return outcome


def check_shed(outcome: Outcome, label: str) -> None:
    measure(
        f"overload {label}",
        f"{ {s: len(v) for s, v in sorted(outcome.latencies.items())} }, p99 of 503s "
        f"{outcome.p99(503) * 1000:.1f} ms, p99 of 200s {outcome.p99(200) * 1000:.1f} ms "
        f"(service {SERVICE * 1000:.0f} ms)",
    )
    assert set(outcome.latencies) == {200, 503}, {s: len(v) for s, v in outcome.latencies.items()}
    # Twice the capacity: about half is shed (the share is generous for a busy box).
    assert 0.3 < outcome.share(503) < 0.7, outcome.share(503)
    assert outcome.retry_after == {"1"}
    assert outcome.codes == {"service_unavailable"}
    # Shed fast; admitted within their service time plus (generous) slack: no queue.
    assert outcome.p99(503) < 0.5, outcome.p99(503)
    assert outcome.p99(200) < SERVICE + 0.8, outcome.p99(200)


async def test_twice_the_capacity_is_shed_fast_and_admitted_requests_keep_their_p99(
    make_proxy: MakeProxy, full_upstream: QueueingUpstream
) -> None:
    check_shed(await overload(make_proxy, full_upstream, seconds=3.0), "2x for 3 s")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_long_overload_without_and_with_the_bound(
    make_proxy: MakeProxy, full_upstream: QueueingUpstream
) -> None:
    bounded = await overload(make_proxy, full_upstream, seconds=20.0)
    check_shed(bounded, "2x for 20 s")
    # Without the bound every request waits in the upstream's line, which grows as
    # long as the overload lasts.
    unbounded_proxy = await make_proxy(quick_start(full_upstream.url, None))
    unbounded = await offer(unbounded_proxy.base, 2 * CAPACITY, 10.0)
    assert set(unbounded.latencies) == {200}
    measure("overload 2x for 10 s, no bound", f"p99 of 200s {unbounded.p99(200):.2f} s")
    assert unbounded.p99(200) > 5 * bounded.p99(200), (unbounded.p99(200), bounded.p99(200))
