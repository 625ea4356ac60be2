"""Responses written by the proxy itself, below aiohttp's ``web.Response`` (issue #17).

The handlers see a request as an ``Incoming``: one aiohttp parsed (``Incoming.of``),
whose connection aiohttp keeps (keep-alive, pipelining, timeouts, drain), or one that
front.py's connection protocol parsed itself. What this module replaces is the last
step of a proxied answer: instead of a ``web.Response`` (its ``CIMultiDict`` of
headers, ``prepare``, the ``on_response_prepare`` signal, aiohttp's serializer and
``write_eof``), the head is formatted once as a string and written to the transport
with the body in one ``write``; the handler then returns a ``Sent`` (its status and
``keep_alive``), which front.py reads and ``for_aiohttp`` turns into a response whose
``prepare`` and ``write_eof`` do nothing, for aiohttp's server.

Invariants (what the answer has in common with aiohttp's own, checked by the suite):
- The same head aiohttp would write for a ``web.Response`` with these headers: the
  status line in the request's HTTP version, the given headers in order, then
  ``Content-Length``, ``Content-Type`` (``application/octet-stream`` when none was
  given and the body is not empty), ``Date``, ``Server: morngpt``, ``Connection``
  where the version needs it (``close`` for 1.1 without keep-alive, ``keep-alive``
  for 1.0 with it), and the CORS headers ``ingress.install`` adds for an allowed
  origin.
- No header value with a control character is written (the same rule as aiohttp's
  serializer): such a response goes the ordinary way, which refuses it (a 500; on a
  front.py connection, a ``ProxyError``, which is a 500 too).
- Statuses without a body (1xx, 204, 304) and HEAD go the ordinary way; on a front.py
  connection (POST only) their head is written here, without framing or body.
- Used only where nothing else decorates responses: an app whose
  ``on_response_prepare`` holds anything but ``ingress``'s own decoration (recorded
  by ``ingress.install``) gets ``None`` from ``send`` and answers the ordinary way.
- A client already gone raises ``ConnectionResetError`` as aiohttp's writer does; a
  large body waits for the client to drain as aiohttp's ``write_eof`` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from http import HTTPStatus
from time import time
from typing import Final

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import HttpVersion, HttpVersion10, HttpVersion11
from multidict import CIMultiDictProxy

from ..errors import ProxyError
from . import ingress

# aiohttp's versions, as C statics once compiled (an imported name is a dict lookup).
_HTTP10: Final = HttpVersion10
_HTTP11: Final = HttpVersion11
_REASONS: Final = {s.value: s.phrase for s in HTTPStatus}
_STATUS_LINES: Final = {
    status: f"HTTP/1.1 {status} {reason}" for status, reason in _REASONS.items()
}
# The control bytes, CR and LF among them, but tab: what aiohttp's serializer refuses
# in a header. A head is checked on its bytes in one ``bytes.translate`` deleting
# these: it holds one CR and one LF per line end and no other, so exactly two bytes a
# line end go (counting CR and LF apart as well cost two more scans, ~3,500
# instructions a response: callgrind, bench/RESULTS.md).
_CONTROL: Final = bytes([*range(0x09), *range(0x0A, 0x20), 0x7F])
# Bodies above this many bytes wait for the client to take them before the handler
# goes on (the transport's default high-water mark), as aiohttp's write_eof does.
_HIGH = 64 * 1024


class Sent:
    """What a handler returns once the whole answer was written here: its status, and
    whether the connection stays open (decided when the head was written). front.py
    reads ``keep_alive``; a handler aiohttp serves returns ``for_aiohttp`` of it. A
    plain object: an aiohttp ``StreamResponse`` per answer cost ~8,000 instructions."""

    __slots__ = ("keep_alive", "status")

    def __init__(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive


# A handler's answer: written here (``Sent``), or an aiohttp response still to send.
Answer = web.StreamResponse | Sent


class _Written(web.StreamResponse):
    """A ``Sent`` as aiohttp's server takes it: ``prepare`` and ``write_eof`` do
    nothing, and it keeps the connection open as ``Sent`` says."""

    def __init__(self, status: int, keep_alive: bool) -> None:
        super().__init__(status=status)
        self._keep_alive = keep_alive
        self._eof_sent = True

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        return None


def for_aiohttp(answer: Answer) -> web.StreamResponse:
    """``answer`` as the handler of a request aiohttp parsed returns it."""
    return _Written(answer.status, answer.keep_alive) if isinstance(answer, Sent) else answer


class Incoming:
    """A request as the proxy's handlers see it: what they read of it and how they
    answer it, whether it came through aiohttp (``of``, ``request`` set) or through
    front.py's own parser (``request`` None: no aiohttp to fall back to, so every
    answer is written here)."""

    __slots__ = (
        "cross",
        "drain",
        "headers",
        "keep_alive",
        "lean",
        "method",
        "path",
        "query",
        "read",
        "remote",
        "request",
        "transport",
        "version",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: CIMultiDictProxy[str],
        remote: str | None,
        transport: asyncio.Transport | None,
        drain: Callable[[], Awaitable[None]],
        read: Callable[[], Awaitable[bytes]],
        keep_alive: bool,
        cross: ingress.Cross | None,
        version: HttpVersion = HttpVersion11,
        lean: bool = True,
        request: web.Request | None = None,
    ) -> None:
        self.method = method
        self.path = path  # the route's tail: "chat/completions"
        self.query = query  # as it came, still percent-encoded
        self.headers = headers
        self.remote = remote
        self.transport = transport
        self.drain = drain
        self.read = read  # the body, within the size and time limits
        self.keep_alive = keep_alive
        self.cross = cross  # CORS, None: off
        self.version = version
        self.lean = lean  # whether answers may be written here at all
        self.request = request

    @classmethod
    def of(cls, request: web.Request, path: str, read: Callable[[], Awaitable[bytes]]) -> Incoming:
        """A request aiohttp parsed; its answers are written here only where nothing
        but ``ingress``'s own decoration hooks the app's ``on_response_prepare``."""
        app = request.app
        signal = app.on_response_prepare
        decoration = app.get(ingress.DECORATION)
        alone = decoration is not None and len(signal) == 1 and signal[0] is decoration.prepare
        return cls(
            request.method,
            path,
            request.rel_url.raw_query_string,
            request.headers,
            request.remote,
            request.transport,
            request.writer.drain,
            read,
            request.keep_alive,
            decoration.cross if decoration is not None else None,
            request.version,
            alone,
            request,
        )


def head(
    call: Incoming, status: int, headers: Mapping[str, str], framing: str | None, typed: bool
) -> tuple[bytes, bool] | None:
    """The response head aiohttp would write, and whether the connection stays open;
    None when this response must go the ordinary way (see the module invariants).
    ``framing`` is the ``Content-Length`` or ``Transfer-Encoding`` line (None: the
    status has no body); ``typed`` whether a missing ``Content-Type`` is to be given
    aiohttp's default."""
    if not call.lean:
        return None
    if call.request is not None and (_bodiless(status) or call.method == "HEAD"):
        return None
    version = call.version
    keep_alive = call.keep_alive
    first = _STATUS_LINES.get(status) if version == _HTTP11 else None
    if first is None:
        first = f"HTTP/{version[0]}.{version[1]} {status} {_REASONS.get(status, '')}"
    lines = [first]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    if framing is not None:
        lines.append(framing)
        if typed and "Content-Type" not in headers:
            lines.append("Content-Type: application/octet-stream")
    lines.append(_DATE.now())
    lines.append(_SERVER_LINE)
    if keep_alive:
        if version == _HTTP10:
            lines.append("Connection: keep-alive")
    elif version == _HTTP11:
        lines.append("Connection: close")
    cross = call.cross
    if cross is not None:
        origin = call.headers.get("Origin")
        if origin is not None and cross.allows(origin):
            lines.extend(cross.lines(origin))
    lines.append("\r\n")
    data = "\r\n".join(lines).encode()
    # A CR and a LF after each line and the blank one, and no other control byte.
    if len(data) - len(data.translate(None, _CONTROL)) != 2 * len(lines):
        if call.request is None:  # aiohttp's serializer refuses these (a 500): so do we
            raise ProxyError("The proxy failed to handle this request.")
        return None
    return data, keep_alive


class _DateLine:
    """The Date line of the current second (aiohttp's text), made once a second: calling
    aiohttp's helper (interpreted) and formatting the line cost ~2,000 instructions a
    response (callgrind, bench/RESULTS.md). An object, not a global rebound each
    second: a module's ``Final`` names are C statics once compiled, others a dict
    lookup each."""

    __slots__ = ("line", "second")

    def __init__(self) -> None:
        self.second = 0
        self.line = ""

    def now(self) -> str:
        second = int(time())
        if second != self.second:
            self.second, self.line = second, f"Date: {rfc822_formatted_time()}"
        return self.line


_DATE: Final = _DateLine()
_SERVER_LINE: Final = f"Server: {ingress.SERVER}"


def _bodiless(status: int) -> bool:
    return status < 200 or status in (204, 304)


def _transport(call: Incoming) -> asyncio.Transport:
    transport = call.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("Cannot write to closing transport")
    return transport


async def send(call: Incoming, status: int, headers: Mapping[str, str], body: bytes) -> Sent | None:
    """Write the whole answer (head and body, one write) to the client; None when this
    response must go the ordinary way (see the module invariants)."""
    if _bodiless(status):
        made = head(call, status, headers, None, False)
        body = b""
    else:
        made = head(call, status, headers, f"Content-Length: {len(body)}", bool(body))
    if made is None:
        return None
    transport = _transport(call)
    transport.write(made[0] + body)
    if transport.get_write_buffer_size() > _HIGH:
        await call.drain()
    return Sent(status, made[1])


async def deliver(call: Incoming, response: web.Response) -> Answer:
    """``response`` (a ``web.Response`` made whole) written by ``send`` where it can,
    else returned for aiohttp to send."""
    body = response.body
    assert body is None or isinstance(body, bytes)
    try:
        sent = await send(call, response.status, response.headers, body or b"")
    except ConnectionResetError:  # the client is gone: nobody to answer
        return Sent(response.status, False)
    return response if sent is None else sent


class Chunked:
    """A chunked response (a stream) written by the proxy: the head goes out with the
    first write, each write is one chunk frame, ``write_eof`` the last frame and the
    terminator together. ``response`` is what the handler returns. What is written
    is a list of parts (a read's events, kept apart), made one frame in one copy:
    joining them, framing the join and putting the head before it were three copies
    of a long stream's read (~13 KB each)."""

    __slots__ = ("_drain", "_head", "response", "transport")

    def __init__(self, call: Incoming, head: bytes, status: int, keep_alive: bool):
        self._head = head
        self._drain = call.drain
        self.transport = call.transport
        self.response = Sent(status, keep_alive)

    @classmethod
    def start(cls, call: Incoming, status: int, headers: Mapping[str, str]) -> Chunked | None:
        """None when this response must go the ordinary way (HTTP/1.0, which has no
        chunked framing, included)."""
        if call.version != _HTTP11:
            return None
        made = head(call, status, headers, "Transfer-Encoding: chunked", False)
        return None if made is None else cls(call, made[0], status, made[1])

    def _out(self, parts: list[bytes], end: bytes) -> asyncio.Transport:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        transport.write(frame(parts, end, self._head))
        self._head = b""
        return transport

    async def write(self, parts: list[bytes]) -> None:
        transport = self._out(parts, b"\r\n")
        if transport.get_write_buffer_size() > _HIGH:
            await self._drain()

    async def drain(self) -> None:
        await self._drain()

    async def write_eof(self, parts: list[bytes]) -> None:
        self._out(parts, b"\r\n0\r\n\r\n")


def frame(parts: list[bytes], end: bytes, before: bytes = b"") -> bytes:
    """``parts`` in one chunk frame, ``end`` after it (its CRLF, and the terminator
    where it is the last) and ``before`` before it. When ``parts`` hold no byte, no
    frame (an empty one would end the stream): ``before`` and the terminator, if
    ``end`` has one."""
    size = 0
    for part in parts:
        size += len(part)
    if not size:
        return before + end[2:]
    return b"".join([before, b"%x\r\n" % size, *parts, end])


class Ordinary:
    """``Chunked``'s interface over aiohttp's own ``StreamResponse`` (prepared), for
    the responses ``Chunked.start`` leaves to it."""

    __slots__ = ("_writer", "response", "transport")

    def __init__(self, request: web.Request, response: web.StreamResponse) -> None:
        self._writer = request.writer
        self.transport = request.transport
        self.response = response

    async def write(self, parts: list[bytes]) -> None:
        await self._writer.write(b"".join(parts))

    async def drain(self) -> None:
        await self._writer.drain()

    async def write_eof(self, parts: list[bytes]) -> None:
        await self.response.write_eof(b"".join(parts))
