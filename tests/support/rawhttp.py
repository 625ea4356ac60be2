"""HTTP/1.1 over raw asyncio sockets, for what aiohttp and the SDK will not do on
purpose: headers one byte at a time, pipelined requests, half-sent bodies, and
upstreams that misbehave below the HTTP layer (``RawServer``).

Every read is bounded by a deadline, so a hung exchange fails its test instead of
stalling it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson

CHAT = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "a b c"}]})
STREAM = orjson.dumps(
    {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
)


def post(path: str, body: bytes, *headers: str, close: bool = False) -> bytes:
    """The bytes of one POST request."""
    lines = [f"POST {path} HTTP/1.1", "Host: proxy", f"Content-Length: {len(body)}"]
    lines += ["Content-Type: application/json", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    raw_head: bytes = field(default=b"", repr=False)


async def read_reply(reader: asyncio.StreamReader, timeout: float = 10.0) -> Reply:
    """One response: the head, then the body by Content-Length or chunked encoding."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        reply = Reply(int(status_line.split()[1]), headers, raw_head=head)
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            await reader.readexactly(2)
            reply.body = b"".join(parts)
        elif "content-length" in headers:
            reply.body = await reader.readexactly(int(headers["content-length"]))
        return reply


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request (head and Content-Length body) as sent; None at end of stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


def response(body: bytes, content_type: str = "application/json", status: int = 200) -> bytes:
    """A keep-alive response with a Content-Length."""
    head = (
        f"HTTP/1.1 {status} OK\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


CHAT_ANSWER = orjson.dumps(
    {
        "id": "chatcmpl-raw",
        "object": "chat.completion",
        "created": 0,
        "model": "m1",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """A loopback TCP server running ``handler(reader, writer, n)`` for its n-th
    connection (from 0): an upstream scripted below the HTTP layer."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0
        self.requests = 0  # handlers count what they read here
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        n, self.accepted = self.accepted, self.accepted + 1
        try:
            await self.handler(reader, writer, n)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def roundtrip(port: int, data: bytes, timeout: float = 10.0) -> Reply:
    """Send ``data`` on a new connection and read one reply."""
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_reply(reader, timeout)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the other side closes the connection within ``timeout`` seconds
    (whatever it sends first is read and dropped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True
