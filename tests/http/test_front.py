"""The API listener's own connection protocol (``proxy/http/front.py``): which requests
it takes and which connections it hands to aiohttp, at request boundaries, without a
byte lost or answered twice; bodies that arrive late or are never read; drain.

The rest of the edge (slow clients, pipelining, refusals, clients that leave) is
checked through it by tests/adversity/test_hostile_clients.py and test_client_input.py.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp.web_protocol import RequestHandler

from bench.fake_upstream import FakeUpstream
from proxy.config.load import quick_start
from proxy.http.front import Front
from tests.support.env import UPSTREAM_KEY
from tests.support.inproc import MakeProxy, MakeUpstream, Proxy, with_server
from tests.support.rawhttp import CHAT, STREAM, closed_by_peer, connect, post, read_reply

BODY_TIMEOUT = 0.5


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    config = quick_start(upstream.url, UPSTREAM_KEY)
    return await make_proxy(with_server(config, body_timeout=BODY_TIMEOUT))


def port_of(proxy: Proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def kinds(proxy: Proxy) -> list[str]:
    """Who serves each open client connection: "front" or "aiohttp"."""
    server = proxy.runner.server
    assert server is not None
    return sorted(
        "front" if isinstance(c, Front) else "aiohttp" if isinstance(c, RequestHandler) else "?"
        for c in server.connections
    )


async def settle() -> None:
    await asyncio.sleep(0.05)


def chat(*headers: str, path: str = "/v1/chat/completions", version: str = "HTTP/1.1") -> bytes:
    head = [f"POST {path} {version}", *headers, f"Content-Length: {len(CHAT)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + CHAT


# What the front takes, and what it leaves to aiohttp. Each request is answered the same
# either way (test_lean.py compares the bytes); here: by whom.
TAKEN = {
    "plain": chat("Host: p", "Content-Type: application/json"),
    "identity coding": chat("Host: p", "Content-Encoding: identity"),
    "query": chat("Host: p", path="/v1/chat/completions?api-version=2024-06-01"),
    "lower-case names": b"POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n"
    + f"content-length: {len(CHAT)}\r\n\r\n".encode()
    + CHAT,
    "upper-case Content-Length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
    + f"CONTENT-LENGTH: {len(CHAT)}\r\n\r\n".encode()
    + CHAT,
    # llhttp takes leading zeros without end; int() refuses more than 4300 digits
    "Content-Length of 5001 digits": b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n"
    + b"Content-Length: "
    + f"{len(CHAT):05001d}".encode()
    + b"\r\n\r\n"
    + CHAT,
}
HANDED = {
    "HTTP/1.0": chat("Host: p", version="HTTP/1.0"),
    "no Host": chat(),
    "two Hosts": chat("Host: p", "Host: q"),
    "two Content-Lengths": chat("Host: p", f"Content-Length: {len(CHAT)}"),
    # found by their usual spellings first: a second in another spelling is still one
    "two Content-Lengths, two spellings": chat("Host: p", f"content-length: {len(CHAT)}"),
    "two Content-Lengths, odd spellings": chat("Host: p", f"CONTENT-length: {len(CHAT)}"),
    "no Content-Length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\n\r\n",
    "two Content-Types": chat("Host: p", "Content-Type: a/b", "Content-Type: a/b"),
    "gzip": chat("Host: p", "Content-Encoding: gzip"),
    "Expect": chat("Host: p", "Expect: 100-continue"),
    "escaped path": chat("Host: p", path="/v1/chat%2Fcompletions"),
    "unknown route": chat("Host: p", path="/v1/.hidden"),
    "folded header": chat("Host: p", "X-A: a", " b"),
    "space before colon": chat("Host : p"),
    "GET": b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n",
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\r\n\r\n",
}


@pytest.mark.parametrize("case", list(TAKEN) + list(HANDED))
async def test_who_serves_which_request(proxy: Proxy, case: str) -> None:
    reader, writer = await connect(port_of(proxy))
    writer.write(TAKEN.get(case) or HANDED[case])
    reply = await read_reply(reader)
    await settle()
    if case in TAKEN:
        assert reply.status == 200
        assert kinds(proxy) == ["front"]
    else:
        assert reply.status != 500
        assert kinds(proxy) in (["aiohttp"], [])  # [] where aiohttp closed it
    writer.close()


async def test_a_connection_is_handed_over_between_requests(proxy: Proxy) -> None:
    """Requests before a GET are the front's, the GET and everything after aiohttp's;
    pipelined, all in one write, each is answered once and in order."""
    get = b"GET /healthz HTTP/1.1\r\nHost: p\r\n\r\n"
    one = post("/v1/chat/completions", CHAT, "X-Request-Id: one")
    two = post("/v1/chat/completions", STREAM, "X-Request-Id: two")
    three = post("/v1/chat/completions", CHAT, "X-Request-Id: three")
    reader, writer = await connect(port_of(proxy))
    writer.write(one + two + get + three)
    replies = [await read_reply(reader) for _ in range(4)]
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert [r.headers.get("x-request-id") for r in replies] == ["one", "two", None, "three"]
    assert replies[1].body.endswith(b"data: [DONE]\n\n")
    assert replies[2].body == b'{"status": "ok"}'
    assert kinds(proxy) == ["aiohttp"]
    assert len(proxy.recorder.exchanges) == 3
    writer.close()


async def test_a_client_sending_the_same_headers_has_them_parsed_once(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    """Requests whose headers differ only in Content-Length share one parse of them
    (``Door.known``); each still gets its own body, length and answer."""
    bodies = [CHAT, CHAT[:-1] + b', "user": "a longer body"}', STREAM]
    reader, writer = await connect(port_of(proxy))
    for n, body in enumerate(bodies):
        writer.write(post("/v1/chat/completions", body))
        reply = await read_reply(reader)
        assert reply.status == 200, reply.body
        assert (b"data: [DONE]" in reply.body) == (n == 2)
    writer.write(post("/v1/chat/completions", CHAT, "X-Other: 1"))
    assert (await read_reply(reader)).status == 200
    writer.close()
    got = [r.body for r in upstream.received]
    assert got[:2] == bodies[:2]
    assert got[3] == CHAT
    assert got[2].startswith(STREAM[:-1])  # and the usage option the proxy asks for
    door = proxy.runner.server.door  # type: ignore[union-attr]
    assert len(door.known) == 2  # the first three requests' heads, then the fourth's
    assert all("Content-Length" not in known.headers for known in door.known.values())
    # Large blocks are parsed every time, never kept (what a listener holds is bounded).
    reader, writer = await connect(port_of(proxy))
    writer.write(post("/v1/chat/completions", CHAT, f"X-Large: {'a' * 5000}"))
    assert (await read_reply(reader)).status == 200
    writer.close()
    assert len(door.known) == 2


async def test_a_known_head_with_other_digits_is_judged_on_them(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    """A head taken before, but for its Content-Length digits, is taken without
    llhttp (``Door.known``); what the digits say is still read from this head: a
    length over the limit goes to aiohttp (its 413), and what else makes it differ
    (spaces around the digits, a second value) is parsed again."""
    config = quick_start(upstream.url, UPSTREAM_KEY)
    proxy = await make_proxy(with_server(config, max_body_bytes=len(CHAT) + 10))
    door = proxy.runner.server.door  # type: ignore[union-attr]

    def head(value: str, *extra: str) -> bytes:
        lines = ["POST /v1/chat/completions HTTP/1.1", "Host: p", *extra]
        return ("\r\n".join([*lines, f"Content-Length:{value}"]) + "\r\n\r\n").encode()

    reader, writer = await connect(port_of(proxy))
    writer.write(head(f" {len(CHAT)}") + CHAT)
    assert (await read_reply(reader)).status == 200
    assert len(door.known) == 1
    writer.write(head(f" 0{len(CHAT)}") + CHAT)  # the same key: taken as known
    assert (await read_reply(reader)).status == 200
    assert kinds(proxy) == ["front"]
    writer.write(head(f" {len(CHAT) + 11}") + CHAT + b"x" * 11)  # over the limit
    assert (await read_reply(reader)).status == 413
    await settle()
    assert kinds(proxy) in (["aiohttp"], [])
    writer.close()
    for value in (f"  {len(CHAT)}", f" {len(CHAT)} ", f"\t{len(CHAT)}", f" {len(CHAT)}, 5"):
        reader, writer = await connect(port_of(proxy))
        writer.write(head(value) + CHAT)
        reply = await read_reply(reader)
        await settle()
        if value.endswith(", 5"):  # not one length: aiohttp's (it refuses it)
            assert reply.status == 400
            assert kinds(proxy) in (["aiohttp"], [])
        else:
            assert reply.status == 200
            assert kinds(proxy) == ["front"]
        writer.close()
    assert len(door.known) == 4  # one head per spacing, the refused one not
    # What a known head says of the connection is kept with it: Connection: close is
    # honoured every time.
    for _ in range(2):
        reader, writer = await connect(port_of(proxy))
        writer.write(head(f" {len(CHAT)}", "Connection: close") + CHAT)
        assert (await read_reply(reader)).status == 200
        assert await closed_by_peer(reader, timeout=5)
        writer.close()
    assert len(door.known) == 5


async def test_a_client_sending_the_same_headers_has_one_upstream_block(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    """What a client's headers become upstream is made once per headers object the
    front hands out (``Upstream.block``); X-Request-Id and the trace context still go
    per request, and other headers make another block."""
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    sent = [["X-Custom: a"]] * 3 + [["X-Custom: b"], ["X-Custom: a", f"traceparent: {parent}"]]
    reader, writer = await connect(port_of(proxy))
    for headers in sent:
        writer.write(post("/v1/chat/completions", CHAT, *headers))
        assert (await read_reply(reader)).status == 200
    writer.close()
    got = [r.headers for r in upstream.received]
    assert [h["X-Custom"] for h in got] == ["a", "a", "a", "b", "a"]
    assert len({h["X-Request-Id"] for h in got}) == 5
    assert all(h.getall("X-Forwarded-For") == ["127.0.0.1"] for h in got)
    assert all(h.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"] for h in got)
    assert [h.getall("traceparent", []) for h in got] == [[]] * 4 + [[parent]]
    [deployment] = proxy.state.router.route("m1").upstreams
    assert len(deployment.upstream.blocks) == 3


async def test_a_body_that_comes_in_pieces(proxy: Proxy) -> None:
    data = post("/v1/chat/completions", CHAT)
    head_end = data.index(b"\r\n\r\n") + 4
    reader, writer = await connect(port_of(proxy))
    for piece in (data[: head_end - 3], data[head_end - 3 : head_end + 5], data[head_end + 5 :]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    reply = await read_reply(reader)
    assert reply.status == 200
    assert kinds(proxy) == ["front"]
    writer.write(data)  # and the connection serves the next one
    assert (await read_reply(reader)).status == 200
    writer.close()


async def test_a_body_the_proxy_did_not_read_closes_the_connection(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    """A refused caller's body is not read (keys on, no key: 401 at once); what is
    left of it is not taken for the next request: the connection closes."""
    proxy = await make_proxy(quick_start(upstream.url, UPSTREAM_KEY), auth=True)
    body = b'{"model": "m1", "messages": [{"role": "user", "content": "' + b"x" * 300_000
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: p\r\nContent-Length: {len(body) + 5}"
    reader, writer = await connect(port_of(proxy))
    writer.write(head.encode() + b"\r\n\r\n" + body[:1000])
    reply = await read_reply(reader)
    assert reply.status == 401
    with contextlib.suppress(ConnectionError):
        writer.write(body[1000:])
    assert await closed_by_peer(reader, timeout=5)
    writer.close()
    assert upstream.received == []


async def test_a_late_body_is_a_408_and_the_connection_closes(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    reader, writer = await connect(port_of(proxy))
    writer.write(post("/v1/chat/completions", CHAT)[:-10])
    reply = await read_reply(reader)
    assert reply.status == 408
    assert await closed_by_peer(reader, timeout=5)
    writer.close()
    assert upstream.received == []
    [exchange] = proxy.recorder.exchanges
    assert exchange.status == 408


async def test_drain_closes_idle_connections_and_lets_streams_finish(
    make_proxy: MakeProxy, make_upstream: MakeUpstream
) -> None:
    upstream = await make_upstream(gap_ms=50)  # every event 50 ms apart
    proxy = await make_proxy(quick_start(upstream.url, UPSTREAM_KEY))
    idle_reader, idle_writer = await connect(port_of(proxy))
    idle_writer.write(post("/v1/chat/completions", CHAT))
    assert (await read_reply(idle_reader)).status == 200
    busy_reader, busy_writer = await connect(port_of(proxy))
    busy_writer.write(post("/v1/chat/completions", STREAM))
    await busy_reader.readuntil(b"\r\n\r\n")  # the stream has begun
    cleanup = asyncio.create_task(proxy.runner.cleanup())
    assert await closed_by_peer(idle_reader, timeout=2)
    rest = await asyncio.wait_for(busy_reader.read(), 10)  # to its end, then closed
    assert rest.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    await cleanup
    idle_writer.close()
    busy_writer.close()
