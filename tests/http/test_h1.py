"""The upstream HTTP/1.1 client (proxy/http/h1.py) against scripted raw upstreams: pooling,
framing, cuts, the keep-alive race, back-pressure, limits and closing. What the
proxy makes of it end to end is in test_proxy.py and adversity/test_upstream_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools

import pytest

from proxy.http import h1
from proxy.http.faults import ConnectFailed, Disconnected
from proxy.http.h1_conn import READ, READ_SIZES, Origin
from proxy.http.relay import PASS_HEADERS, response_headers
from tests.support.env import free_port
from tests.support.rawhttp import RawServer, closed_by_peer, read_request, response

OK = response(b'{"ok":true}')


@functools.cache  # one per server, as one per deployment in the proxy
def origin(server: RawServer) -> Origin:
    return Origin(f"http://127.0.0.1:{server.port}")


async def get(client: h1.Client, server: RawServer, body: bytes | None = None) -> bytes:
    async with await client.request(origin(server), "POST", "/v1/x", [], body) as answer:
        return await answer.read()


async def test_connections_are_kept_and_reused() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while request := await read_request(reader):
            seen.append(request)
            writer.write(OK)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        target = origin(server)
        for _ in range(3):
            async with await client.request(
                target, "POST", "/v1/x?a=1", [("X-Test", "é")], b"{}"
            ) as answer:
                assert answer.status == 200
                assert answer.content_type == "application/json"
                assert await answer.read() == b'{"ok":true}'
        assert server.accepted == 1
        assert client.idle() == 1
        await client.close()
    head = seen[0].split(b"\r\n")
    assert head[0] == b"POST /v1/x?a=1 HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in head
    assert "X-Test: é".encode() in head  # header values go out as UTF-8
    assert seen[0].endswith(b"Content-Length: 2\r\n\r\n{}")


async def test_a_body_left_unread_never_reaches_the_next_response() -> None:
    """A response whose body came whole but was closed unread (a discarded error, say)
    leaves its connection reusable; the next response on it has only its own body."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        count = 0
        while await read_request(reader):
            count += 1
            writer.write(response(b"first" if count == 1 else b"second"))

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        answer = await client.request(origin(server), "POST", "/v1/x", [], b"")
        for _ in range(500):  # until the whole body is in (nothing is read of it)
            if answer._complete:
                break
            await asyncio.sleep(0.01)
        answer.close()
        assert client.idle() == 1
        assert await get(client, server) == b"second"
        assert server.accepted == 1
        await client.close()


async def test_chunks_arrive_as_they_are_sent() -> None:
    sent = asyncio.Event()
    more = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n")
        writer.write(b"Transfer-Encoding: chunked\r\n\r\n6\r\ndata: \r\n")
        sent.set()
        await more.wait()
        writer.write(b"3\r\n1\n\n\r\n0\r\n\r\n")

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            assert answer.content_type == "text/event-stream"
            assert await answer.read_chunk() == b"data: "  # before the rest was even sent
            more.set()
            assert await answer.read_chunk() == b"1\n\n"
            assert await answer.read_chunk() == b""
        assert client.idle() == 1  # read to its end: the connection is kept
        await client.close()


async def test_pump_hands_each_read_over_until_declined_or_ended() -> None:
    """``pump`` gives each read to its callback (from data_received) until the callback
    declines (then read_chunk has the rest) or the body ends (the connection is kept);
    the bytes before a cut are pumped, then the cut is raised."""
    step = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for part in (b"1\r\na\r\n", b"1\r\nb\r\n", b"1\r\nc\r\n"):
            await step.wait()
            step.clear()
            writer.write(part)
        await step.wait()
        if n == 0:
            writer.write(b"0\r\n\r\n")
        else:
            writer.write(b"1\r\nd\r\n")  # then the connection breaks
            writer.close()
        await read_request(reader)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        got: list[bytes] = []

        def relay(data: bytes) -> bool:
            got.append(data)
            step.set()
            return data != b"b"  # declines after the second read

        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            step.set()
            await answer.pump(relay)
            assert got == [b"a", b"b"]
            assert await answer.read_chunk() == b"c"
            step.set()
            assert await answer.read_chunk() == b""
        assert client.idle() == 1
        got.clear()
        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            step.set()
            await answer.pump(relay)  # declined at b"b"
            with pytest.raises(Disconnected):
                await answer.pump(lambda data: relay(data) or True)
            assert got == [b"a", b"b", b"c", b"d"]
        await client.close()


async def test_a_body_delimited_by_close_ends_there_and_the_connection_goes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall of it")
        await writer.drain()

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        assert await get(client, server) == b"all of it"
        assert client.idle() == 0
        await client.close()


async def test_a_cut_body_delivers_what_came_then_raises() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        await writer.drain()

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            assert await answer.read_chunk() == b"part"
            with pytest.raises(Disconnected) as cut:
                await answer.read_chunk()
            assert cut.value.answered
        await client.close()


@pytest.mark.parametrize("framing", [b"CONTENT-LENGTH: 100", b"transfer-encoding: CHUNKED"])
async def test_framing_is_known_in_any_case_and_values_decode_as_utf8(framing: bytes) -> None:
    # A cut body is a cut, not a body delimited by close, whatever the case of the
    # header that framed it; values are UTF-8, bytes that are not kept as escapes.
    body = b"part" if framing.startswith(b"C") else b"4\r\npart\r\n"
    head = b"HTTP/1.1 200 OK\r\nX-Name: caf\xc3\xa9\r\nX-Odd: caf\xe9\r\n"

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(head + framing + b"\r\n\r\n" + body)
        await writer.drain()

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            assert answer.headers["x-name"] == "café"
            assert answer.headers["X-ODD"] == "caf\udce9"
            assert await answer.read_chunk() == b"part"
            with pytest.raises(Disconnected):
                await answer.read_chunk()
        await client.close()


async def test_headers_are_looked_up_lowered_and_the_client_gets_those_it_may() -> None:
    lines = (
        b"retry-after: 7\r\nOPENAI-PROCESSING-MS: 12\r\nX-Dup: a\r\nx-dup: b\r\nX-Dup: c\r\n"
        b"Retry-After: 8\r\n"
        b"Content-Type: Application/JSON; charset=utf-8\r\nSet-Cookie: no\r\n"
    )

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 429 Too Many Requests\r\n" + lines + b"Content-Length: 2\r\n\r\n{}")

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            assert (answer.status, answer.content_type) == (429, "application/json")
            # The first value of a name: in ``fields`` by its lowered name, in
            # ``headers`` each spelling's first.
            assert answer.fields[b"retry-after"] == b"7"
            assert answer.headers.getall("X-DUP") == ["a", "b"]
            assert answer.headers.getall("retry-after") == ["7", "8"]
            assert response_headers(answer, {"X-Request-Id": "r"}) == {
                "Content-Type": "Application/JSON; charset=utf-8",
                "Retry-After": "7",
                "OpenAI-Processing-Ms": "12",
                "X-Request-Id": "r",
            }
            assert await answer.read() == b"{}"
        await client.close()


def test_the_headers_the_client_gets_are_found_at_once() -> None:
    assert {lowered for _, lowered in PASS_HEADERS} <= READ
    assert set(READ_SIZES) == {len(name) for name in READ}


async def test_the_keep_alive_race_is_retried_unseen() -> None:
    """The first connection answers once, then closes on the next request without a
    word, as an upstream whose idle timer fired just then does."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader):
            if n == 0 and server.requests == 1:
                return  # closed without answering
            server.requests += 1
            writer.write(OK)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        assert await get(client, server) == b'{"ok":true}'
        assert await get(client, server) == b'{"ok":true}'
        assert server.accepted == 2
        await client.close()


async def test_a_new_connection_closed_without_an_answer_is_not_retried() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        with pytest.raises(Disconnected) as closed:
            await get(client, server)
        assert not closed.value.answered
        assert server.accepted == 1
        await client.close()


async def test_garbage_is_a_disconnect_and_the_connection_is_dropped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await reader.read()

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        with pytest.raises(Disconnected):
            await get(client, server)
        await client.close()
    assert client.in_use == 0


async def test_an_informational_response_is_skipped() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        assert await get(client, server) == b'{"ok":true}'
        await client.close()


async def test_reading_pauses_while_the_reader_lags() -> None:
    big = b"x" * (4 * 1024 * 1024)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(response(big))
        await writer.drain()

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        async with await client.request(origin(server), "POST", "/", [], b"") as answer:
            await asyncio.sleep(0.2)  # the upstream sends; nobody reads
            (conn,) = client.busy
            assert not conn.transport.is_reading()
            assert len(await answer.read()) == len(big)  # and all of it comes
        await client.close()


async def test_the_pool_limit_makes_requests_wait_for_a_connection() -> None:
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader):
            await release.wait()
            writer.write(OK)

    async with RawServer(handler) as server:
        client = h1.Client(limit=1)
        first = asyncio.create_task(get(client, server))
        second = asyncio.create_task(get(client, server))
        await asyncio.sleep(0.1)
        assert client.in_use == 1
        assert not first.done()
        assert not second.done()
        release.set()
        assert await first == await second == b'{"ok":true}'
        assert server.accepted == 1
        # An idle connection to one origin does not hold the room another one needs.
        other = Origin(f"http://localhost:{server.port}")
        async with await client.request(other, "POST", "/", [], b"") as answer:
            assert answer.status == 200
        await client.close()


class StreamUntilClosed:
    """An upstream that starts a chunked answer (one byte of it), then waits for the
    proxy to close the connection; ``gone`` is set when it did."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
        if await closed_by_peer(reader, 5):
            self.gone.set()


async def test_an_unfinished_response_closes_its_connection() -> None:
    """A relay that stops reading (the client left) must stop the upstream's work."""
    upstream = StreamUntilClosed()
    async with RawServer(upstream) as server:
        client = h1.Client(limit=8)
        answer = await client.request(origin(server), "POST", "/", [], b"")
        assert await answer.read_chunk() == b"a"
        answer.close()
        await asyncio.wait_for(upstream.gone.wait(), 5)
        assert client.idle() == 0
        await client.close()


async def test_idle_connections_expire() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader):
            writer.write(OK)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8, keepalive=0.05)
        await get(client, server)
        await asyncio.sleep(0.1)
        await get(client, server)
        assert server.accepted == 2
        await client.close()


async def test_closing_the_client_closes_busy_connections() -> None:
    upstream = StreamUntilClosed()
    async with RawServer(upstream) as server:
        client = h1.Client(limit=8)
        answer = await client.request(origin(server), "POST", "/", [], b"")
        await client.close()
        await asyncio.wait_for(upstream.gone.wait(), 5)
        assert await answer.read_chunk() == b"a"  # what came before the close
        with pytest.raises(Disconnected):
            await answer.read_chunk()
        with pytest.raises(ConnectFailed):
            await get(client, server)


async def test_line_breaks_in_headers_never_go_out() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        with pytest.raises(ValueError, match="line break"):
            await client.request(origin(server), "GET", "/", [("X-A", "1\r\nX-B: 2")], None)
        assert server.accepted == 0
        await client.close()


async def test_a_refused_connection_is_a_connect_failure() -> None:
    client = h1.Client(limit=8)
    with pytest.raises(ConnectFailed):
        await client.request(Origin(f"http://127.0.0.1:{free_port()}"), "GET", "/", [], None)
    assert client.in_use == 0
    await client.close()


async def test_first_byte_and_idle_deadlines() -> None:
    """No headers within first_byte: TimeoutError, and the connection is dropped. A
    body read waiting longer than idle: TimeoutError; a slow but steady body is fine."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        if n == 0:
            await reader.read()  # never answers
            return
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(4):  # a chunk every 0.05 s: never idle for 0.15 s
            await asyncio.sleep(0.05)
            writer.write(b"1\r\na\r\n")
        await reader.read()  # then silence

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        with pytest.raises(TimeoutError):
            await client.request(origin(server), "POST", "/", [], b"", first_byte=0.1)
        assert client.in_use == 0
        answer = await client.request(origin(server), "POST", "/", [], b"", idle=0.15)
        got = b""
        with pytest.raises(TimeoutError):
            while True:
                got += await answer.read_chunk()
        assert got == b"aaaa"
        answer.close()
        answer = await client.request(origin(server), "POST", "/", [], b"", idle=0.15)
        pumped: list[bytes] = []
        with pytest.raises(TimeoutError):  # the same through pump: each read re-arms it
            await answer.pump(lambda data: pumped.append(data) is None)
        assert b"".join(pumped) == b"aaaa"
        answer.close()
        await client.close()


async def test_endless_headers_are_cut_off() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Long: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # 1.6 MB of one header value, never ended
                writer.write(b"a" * 16384)
                await writer.drain()

    async with RawServer(handler) as server:
        client = h1.Client(limit=8)
        with pytest.raises(Disconnected, match="exceeded"):
            await get(client, server)
        await client.close()
