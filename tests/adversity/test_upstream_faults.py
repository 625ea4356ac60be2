"""Every way an upstream can fail, one table: what the client sees (through the
official SDK), what the usage ledger holds (exactly one row, with the error class),
and that the next request is served again without anyone stepping in.

Retries and failover over several deployments are routing's subject
(tests/routing/test_routing.py); here each request gets one attempt, so the fault itself is
what the client sees. A keep-alive connection the upstream closed is the exception:
that one must never be seen at all.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import msgspec
import openai
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model, Routing, Timeouts
from proxy.http import relay
from tests.support.env import free_port
from tests.support.figures import Relays, count
from tests.support.inproc import MakeProxy, Proxy
from tests.support.ledger import ledger_rows
from tests.support.rawhttp import CHAT, CHAT_ANSWER, Handler, RawServer, read_request, response

MESSAGES = [{"role": "user", "content": "a b c"}]
TIMEOUTS = Timeouts(connect=2.0, first_byte=0.5, idle=0.5)


@dataclass(frozen=True)
class Fault:
    """One upstream fault: how to cause it, and what must follow."""

    sees: str  # HTTP status the SDK raises with, or "stream" for an error event
    says: str  # words in the error message the client gets
    error: str  # the ledger row's error class
    headers: dict[str, str] = field(default_factory=dict)  # x-fake-* behaviour
    stream: bool = False
    upstream: str = "fake"  # fake | refused | html | endless-event | relay fault (below)


FAULTS = {
    "refused": Fault("502", "connect", "UpstreamUnavailable", upstream="refused"),
    "reset-before-headers": Fault(
        "502", "closed the connection", "UpstreamUnavailable", {"x-fake-cut": "headers"}
    ),
    "reset-mid-stream": Fault(
        "stream", "broke mid-stream", "UpstreamError", {"x-fake-cut": "3"}, stream=True
    ),
    "stall-before-headers": Fault(
        "504", "did not answer", "UpstreamTimeout", {"x-fake-stall": "before"}
    ),
    "stall-mid-stream": Fault(
        "stream", "stalled", "UpstreamTimeout", {"x-fake-stall": "3"}, stream=True
    ),
    "black-hole": Fault("504", "did not answer", "UpstreamTimeout", upstream="pause"),
    "reset-mid-body": Fault(
        "502", "broke mid-response", "UpstreamError", {"x-fake-chunks": "2000"}, upstream="cut"
    ),
    "drip-one-byte-per-second": Fault("504", "did not answer", "UpstreamTimeout", upstream="drip"),
    "gigantic-body": Fault("502", "exceeded", "UpstreamProtocolError", {"x-fake-chunks": "300000"}),
    "gigantic-event": Fault(
        "stream", "exceeded", "UpstreamProtocolError", stream=True, upstream="endless-event"
    ),
    "malformed-json": Fault(
        "502", "malformed response", "UpstreamProtocolError", {"x-fake-malformed": "json"}
    ),
    "malformed-sse": Fault(
        "stream",
        "malformed stream event",
        "UpstreamProtocolError",
        {"x-fake-malformed": "sse"},
        stream=True,
    ),
    "wrong-content-type": Fault(
        "502", "text/html", "UpstreamProtocolError", stream=True, upstream="html"
    ),
}


def _raw_handler(kind: str) -> Handler:
    """An upstream whose first request gets ``kind`` and every later one a proper
    answer (so that the recovery request finds a working upstream)."""
    served = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        nonlocal served
        while await read_request(reader) is not None:
            served += 1
            if served > 1:
                writer.write(response(CHAT_ANSWER))
            elif kind == "html":
                writer.write(response(b"<html>maintenance</html>", "text/html"))
            else:  # an event that never ends, larger than the proxy will hold
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
                writer.write(b'data: {"x": "' + b"x" * (relay.MAX_EVENT + 1))
            await writer.drain()

    return handle


@contextlib.asynccontextmanager
async def upstream_for(
    fault: Fault, fake: FakeUpstream, relays: Relays
) -> AsyncIterator[tuple[str, object]]:
    """The base URL the deployment uses for ``fault``, and a handle to heal it."""
    if fault.upstream == "refused":
        port = free_port()
        yield f"http://127.0.0.1:{port}/v1", port
    elif fault.upstream in ("pause", "cut", "drip"):  # faults of the network in between
        relay_ = await relays.to(fake.port)
        if fault.upstream == "pause":
            relay_.pause()  # connects, then nothing comes back: a black hole
        elif fault.upstream == "cut":
            relay_.cut_after(4000, up=False)  # a reset after the headers, mid-body
        else:
            relay_.drip(1.0)  # one byte per second, from the first byte of the headers
        yield f"http://127.0.0.1:{relay_.port}/v1", relay_
    elif fault.upstream in ("html", "endless-event"):
        async with RawServer(_raw_handler(fault.upstream)) as raw:
            yield raw.url, raw
    else:
        yield fake.url, None


async def heal(fault: Fault, handle: object, stack: contextlib.AsyncExitStack) -> None:
    """Make the upstream healthy again (the proxy must notice by itself)."""
    if fault.upstream == "refused":
        assert isinstance(handle, int)
        await stack.enter_async_context(FakeUpstream(port=handle))
    elif fault.upstream == "drip":
        handle.drip(0)  # type: ignore[attr-defined]
    elif fault.upstream == "pause":
        handle.resume()  # type: ignore[attr-defined]


def one_model(url: str) -> cfg.Config:
    deployment = Deployment(base_url=url, name="up", timeouts=TIMEOUTS)
    config = cfg.Config(
        models=[Model(name="*", deployments=[deployment])],
        routing=Routing(max_attempts=1),
    )
    return resolve(config)


async def provoke(client: openai.AsyncOpenAI, fault: Fault) -> str:
    """Send the faulty request; returns how the SDK failed, as ``status: message``."""
    try:
        if not fault.stream:
            await client.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers=fault.headers
            )
            return "no error"
        stream = await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, extra_headers=fault.headers
        )
        async for _ in stream:
            pass
    except openai.APIStatusError as exc:
        return f"{exc.status_code}: {exc.message}"
    except openai.APIError as exc:  # the error event that ended a stream
        return f"stream: {exc.message}"
    return "no error"


@pytest.mark.parametrize("name", list(FAULTS))
async def test_upstream_fault(
    name: str,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    relays: Relays,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fault = FAULTS[name]
    # Small limits, so "gigantic" stays quick; the code path is the same.
    monkeypatch.setattr(relay, "MAX_BODY", 1024 * 1024)
    monkeypatch.setattr(relay, "MAX_EVENT", 64 * 1024)
    async with contextlib.AsyncExitStack() as stack:
        url, handle = await stack.enter_async_context(upstream_for(fault, upstream, relays))
        proxy = await make_proxy(one_model(url))
        async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
            outcome = await provoke(client, fault)
            assert outcome.startswith(f"{fault.sees}: "), outcome
            assert fault.says in outcome, outcome
            await heal(fault, handle, stack)
            reply = await client.chat.completions.create(model="m1", messages=MESSAGES)
            assert reply.choices[0].message.content
        rows = await closed_ledger(proxy)
    assert [(r["error"], r["status"] >= 400) for r in rows] == [
        (fault.error, fault.sees != "stream"),
        (None, False),
    ]
    count(faults=1, served=2)


async def closed_ledger(proxy: Proxy) -> list[dict[str, object]]:
    """Stop the proxy (its ledger drains on the way out); the rows in start order."""
    await proxy.runner.cleanup()
    rows = await ledger_rows(proxy.state.config.database)
    return sorted(rows, key=lambda r: r["started_at"])  # type: ignore[arg-type, return-value]


# The upstream closes idle keep-alive connections ------------------------------------


async def test_a_pooled_connection_the_upstream_closed_is_retried_unseen(
    make_proxy: MakeProxy,
) -> None:
    """Uvicorn (vLLM) closes an idle keep-alive connection after 5 s, the proxy keeps
    them longer: a request can go out on a connection the upstream is closing. Each
    connection here answers once and closes on the next request, as the upstream's
    idle timer would. No client may see it, and it is no failure of the deployment
    (four at once used to take it out of rotation: 502s, then 503s)."""
    warm = asyncio.Event()

    async def once_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if await read_request(reader) is None:
            return
        if n < 4:  # hold the first answers until four connections are open
            await asyncio.wait_for(warm.wait(), 10)
        writer.write(response(CHAT_ANSWER))
        await writer.drain()
        await read_request(reader)  # the next request on it: closed unanswered

    async with RawServer(once_per_connection) as raw:
        proxy = await make_proxy(one_model(raw.url))  # one attempt: nothing to hide behind

        async def ask() -> int:
            async with aiohttp.ClientSession() as http:
                async with http.post(proxy.base + "/chat/completions", data=CHAT) as resp:
                    await resp.read()
                    return resp.status

        first = [asyncio.create_task(ask()) for _ in range(4)]
        async with asyncio.timeout(10):
            while raw.accepted < 4:  # noqa: ASYNC110 - the raw server has no event for it
                await asyncio.sleep(0.01)
        warm.set()
        assert await asyncio.gather(*first) == [200] * 4
        for _ in range(3):  # each burst finds the pool's connections closed
            assert await asyncio.gather(*(ask() for _ in range(4))) == [200] * 4
        [deployment] = proxy.state.router.wildcard.upstreams  # type: ignore[union-attr]
        assert (deployment.healthy, deployment.failures) == (True, 0)
        assert all(ex.attempts == 1 for ex in proxy.recorder.exchanges)
    count(faults=12, served=16)


# A slow drip past the headers ---------------------------------------------------------

EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}]}\n\n'


async def unframed_stream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
) -> None:
    """A stream without chunked framing (it ends with the connection), so every byte
    is payload; a second event only once the first has gone out."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    writer.write(EVENT)
    await writer.drain()
    await asyncio.sleep(0.3)  # apart, so the relay sends them apart
    writer.write(EVENT * 10)
    await writer.drain()
    await read_request(reader)  # until the proxy goes


async def test_a_stream_dripping_one_byte_per_second_is_not_cut(
    make_proxy: MakeProxy, relays: Relays
) -> None:
    """The idle timeout is per gap: bytes arriving once a second keep a stream open
    past it (there is no total cap), a complete event goes to the client when it is
    done, and the client leaving ends the upstream call. (A drip before the headers is
    the table's ``drip-one-byte-per-second``: first_byte bounds it.)"""
    async with RawServer(unframed_stream) as raw:
        drip = await relays.to(raw.port)
        deployment = Deployment(
            base_url=f"http://127.0.0.1:{drip.port}/v1", timeouts=Timeouts(idle=1.5)
        )
        proxy = await make_proxy(
            resolve(cfg.Config(models=[Model(name="*", deployments=[deployment])]))
        )
        body = msgspec.json.encode({"model": "m1", "messages": MESSAGES, "stream": True})
        async with aiohttp.ClientSession() as http:
            async with http.post(proxy.base + "/chat/completions", data=body) as resp:
                assert await resp.content.readuntil(b"\n\n") == EVENT
                drip.drip(1.0)  # the second event comes one byte per second
                before = drip.bytes_down
                async with asyncio.timeout(15):
                    while drip.bytes_down < before + 4:  # noqa: ASYNC110 - counting bytes
                        await asyncio.sleep(0.05)
                # 3 s > idle 1.5 s since the last event, and the stream is not over.
                assert proxy.recorder.exchanges == []
                assert raw.accepted == 1
        async with asyncio.timeout(5):
            while not proxy.recorder.exchanges:  # noqa: ASYNC110 - the handler's finally
                await asyncio.sleep(0.01)
    [exchange] = proxy.recorder.exchanges
    assert exchange.error_name == "client_disconnected"
    count(faults=1, served=1)
