"""Clients that misbehave on purpose, over raw sockets: headers one byte at a time,
bodies that never finish, thousands of idle connections, pipelined requests, a
reader too slow for its stream, and clients that leave at every point of an
exchange. The proxy must keep serving everyone else, hold nothing for long, and
leave no request, slot or upstream call behind."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config.load import quick_start
from tests.support.env import UPSTREAM_KEY
from tests.support.figures import count
from tests.support.inproc import MakeProxy, Proxy, with_server
from tests.support.rawhttp import (
    CHAT,
    STREAM,
    RawServer,
    closed_by_peer,
    connect,
    post,
    read_reply,
    read_request,
)

IDLE = 1.0  # server.idle_timeout in these tests
BODY_TIMEOUT = 0.5


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    config = quick_start(upstream.url, UPSTREAM_KEY)
    return await make_proxy(with_server(config, idle_timeout=IDLE, body_timeout=BODY_TIMEOUT))


def port_of(proxy: Proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


async def served(proxy: Proxy) -> None:
    """A well-behaved client still gets its answer (bounded: no hang allowed)."""
    async with asyncio.timeout(5), aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=CHAT) as resp:
            assert resp.status == 200
            await resp.read()


def connections(proxy: Proxy) -> int:
    """Client connections the proxy holds open right now."""
    server = proxy.runner.server
    assert server is not None
    return len(server.connections)


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - server state has no event to wait on
            await asyncio.sleep(0.02)


# Slowloris and bodies that never finish -----------------------------------------------


async def test_headers_one_byte_at_a_time_are_cut_off(proxy: Proxy) -> None:
    """A request head trickling in never completes; the connection is closed once
    idle_timeout has passed since it opened, and nobody else waits meanwhile."""
    reader, writer = await connect(port_of(proxy))
    request = post("/v1/chat/completions", CHAT)
    started = time.monotonic()

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError):
            for byte in request[:-4]:  # never the blank line that ends the head
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    await served(proxy)
    assert await closed_by_peer(reader, timeout=10)
    assert time.monotonic() - started < 10  # aiohttp's own default would be an hour
    trickling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await trickling
    writer.close()
    assert proxy.recorder.exchanges[-1].status == 200  # only the good request got in
    count(faults=1, served=1)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_that_never_finishes_is_a_408(
    proxy: Proxy, upstream: FakeUpstream, framing: str
) -> None:
    if framing == "chunked":
        head = "POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n"
        data = (head + "\r\n").encode() + b"20\r\n" + b'{"model": "m1", "messages": '
    else:
        data = post("/v1/chat/completions", CHAT)[:-10]  # ten bytes short, forever
    reader, writer = await connect(port_of(proxy))
    writer.write(data)
    reply = await read_reply(reader, timeout=10)
    writer.close()
    assert reply.status == 408
    assert b'"code":"request_timeout"' in reply.body
    assert upstream.received == []
    await served(proxy)
    count(faults=1, served=1)


# Many idle connections ------------------------------------------------------------------


async def test_thousands_of_idle_connections_cost_nobody_and_are_closed(proxy: Proxy) -> None:
    port = port_of(proxy)
    idle = await asyncio.gather(*(connect(port) for _ in range(2000)))
    await until(lambda: connections(proxy) >= 2000)
    started = time.monotonic()
    await asyncio.gather(*(served(proxy) for _ in range(20)))
    assert time.monotonic() - started < 5  # generous: the point is "not stuck behind them"
    # Every idle one is closed by the proxy after idle_timeout.
    closed = await asyncio.gather(*(closed_by_peer(reader, timeout=10) for reader, _ in idle))
    assert all(closed)
    for _, writer in idle:
        writer.close()
    await until(lambda: connections(proxy) == 0)
    count(faults=2000, served=20)


# Pipelining -------------------------------------------------------------------------------


async def test_pipelined_requests_are_answered_in_order(proxy: Proxy) -> None:
    ids = ("pipe-1", "pipe-2", "pipe-3", "pipe-4")
    batch = b"".join(
        post("/v1/chat/completions", body, f"X-Request-Id: {rid}")
        for rid, body in zip(ids, (CHAT, STREAM, b"{broken", CHAT), strict=True)
    )
    reader, writer = await connect(port_of(proxy))
    writer.write(batch)  # four requests in one write, before any answer
    replies = [await read_reply(reader) for _ in ids]
    writer.close()
    assert [r.headers["x-request-id"] for r in replies] == list(ids)
    assert [r.status for r in replies] == [200, 200, 400, 200]
    assert replies[1].body.endswith(b"data: [DONE]\n\n")
    count(faults=1, served=4)


# A reader too slow for its stream ------------------------------------------------------

_BIG_EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"x" * 65000 + b'"}}]}\n\n'
_EVENTS = 1600  # ~100 MB in all


async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    """An upstream that streams ~100 MB as fast as its reader lets it."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    for _ in range(_EVENTS):
        writer.write(_BIG_EVENT)
        await writer.drain()  # blocks while the proxy does not read: back-pressure
        firehose.sent += len(_BIG_EVENT)  # type: ignore[attr-defined]
    writer.write(b"data: [DONE]\n\n")
    await writer.drain()


def rss() -> int:
    """This process's resident memory, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_slow_reader_holds_the_upstream_back_instead_of_the_proxy_buffering(
    make_proxy: MakeProxy,
) -> None:
    firehose.sent = 0  # type: ignore[attr-defined]
    async with RawServer(firehose) as fire:
        proxy = await make_proxy(quick_start(fire.url, None))
        reader, writer = await connect(port_of(proxy))
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        before = rss()
        writer.write(post("/v1/chat/completions", STREAM))
        await reader.readuntil(b"\r\n\r\n")
        # The client reads nothing for a while: the proxy must stop reading upstream.
        await until(lambda: firehose.sent > 0)  # type: ignore[attr-defined]
        stalled_at = -1
        while stalled_at != firehose.sent:  # type: ignore[attr-defined]
            stalled_at = firehose.sent  # type: ignore[attr-defined]
            await asyncio.sleep(0.5)  # until the upstream has been blocked for 0.5 s
        held = rss() - before
        total = len(_BIG_EVENT) * _EVENTS
        # Buffers along the way (sockets, the proxy's reads) hold a few MB, not 100.
        assert stalled_at < total / 4, (stalled_at, total)
        assert held < 40 * 1024 * 1024, held
        # Then it reads everything, slowly at first: nothing lost, nothing reordered.
        received = 0
        tail = b""
        async with asyncio.timeout(30):
            while not tail.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                chunk = await reader.read(1 << 20)
                assert chunk, "the proxy closed the stream early"
                received += len(chunk)
                tail = (tail + chunk)[-64:]
        writer.close()
    # chunked framing adds a few bytes per write; the events themselves all arrived
    assert received >= total
    [exchange] = proxy.recorder.exchanges
    assert (exchange.status, exchange.error_name, exchange.events) == (200, "", _EVENTS)
    count(faults=1, served=1)


# Clients that leave at every point ----------------------------------------------------

_LINGER_RESET = struct.pack("ii", 1, 0)


async def leave(writer: asyncio.StreamWriter, reset: bool) -> None:
    if reset:  # RST instead of FIN
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET
        )
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


SLOW_STREAM = "X-Fake-Gap-Ms: 100"
SLOW_ANSWER = "X-Fake-Delay-Ms: 5000"


async def request_line(port: int, reset: bool) -> bool:
    _, writer = await connect(port)
    writer.write(b"POST /v1/chat/compl")
    await leave(writer, reset)
    return False  # never reached the handler


async def mid_headers(port: int, reset: bool) -> bool:
    _, writer = await connect(port)
    writer.write(post("/v1/chat/completions", CHAT)[:40])
    await leave(writer, reset)
    return False


async def mid_body(port: int, reset: bool) -> bool:
    _, writer = await connect(port)
    writer.write(post("/v1/chat/completions", CHAT)[:-5])
    await asyncio.sleep(0.1)  # the handler is reading the body
    await leave(writer, reset)
    return True


async def waiting_for_the_answer(port: int, reset: bool) -> bool:
    _, writer = await connect(port)
    writer.write(post("/v1/chat/completions", CHAT, SLOW_ANSWER))
    await asyncio.sleep(0.2)  # the upstream has it and is "thinking"
    await leave(writer, reset)
    return True


async def after_the_stream_headers(port: int, reset: bool) -> bool:
    reader, writer = await connect(port)
    writer.write(post("/v1/chat/completions", STREAM, SLOW_STREAM))
    await reader.readuntil(b"\r\n\r\n")
    await leave(writer, reset)
    return True


async def mid_stream(port: int, reset: bool) -> bool:
    reader, writer = await connect(port)
    writer.write(post("/v1/chat/completions", STREAM, SLOW_STREAM))
    await reader.readuntil(b"\r\n\r\n")
    await reader.readuntil(b"\n\n")  # the first event
    await leave(writer, reset)
    return True


async def after_the_answer(port: int, reset: bool) -> bool:
    reader, writer = await connect(port)
    writer.write(post("/v1/chat/completions", STREAM))
    await read_reply(reader)
    await leave(writer, reset)
    return True


POINTS: list[Callable[[int, bool], Awaitable[bool]]] = [
    request_line,
    mid_headers,
    mid_body,
    waiting_for_the_answer,
    after_the_stream_headers,
    mid_stream,
    after_the_answer,
]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_clients_leaving_at_every_point_leave_nothing_behind(
    proxy: Proxy, upstream: FakeUpstream, reset: bool
) -> None:
    port = port_of(proxy)
    reached = 0
    for _ in range(3):
        for point in POINTS:
            reached += await point(port, reset)
    # Every request that reached the handler finished (one ledger record each) and
    # gave back what it held; the upstream calls of the ones that left were ended.
    await until(lambda: len(proxy.recorder.exchanges) == reached)
    await until(lambda: connections(proxy) == 0)
    state = proxy.state
    assert state.traffic.inflight == 0
    assert all(u.inflight == 0 for route in state.router.all() for u in route.upstreams)
    assert len(upstream.disconnects) >= 9  # thinking, after headers, mid-stream (x3)
    errors = sorted(ex.error_name for ex in proxy.recorder.exchanges)
    assert errors.count("") == 3  # the ones that left after a complete answer
    assert errors.count("client_disconnected") == reached - 3
    await served(proxy)
    count(faults=len(POINTS) * 3, served=1)
