"""One upstream HTTP/1.1 connection (an asyncio protocol fed to llhttp) and the
``Response`` read from it; the pools that lease connections are ``h1.Client``.

The contracts of reading a body (``read_chunk``, ``pump``), pausing above
``_HIGH_WATER`` unread bytes and ``Response.close`` are in h1.py's docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict

from .faults import Disconnected

# Unread body bytes above which reading from the upstream pauses.
_HIGH_WATER: Final = 256 * 1024
# The most bytes a response may take before its headers are complete (llhttp itself
# sets no bound, and an upstream that never ends its headers must not grow us).
MAX_HEAD = 64 * 1024
_DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
# The header names the proxy reads of a response, lowered: the framing, the content
# type, and those the client gets (relay.PASS_HEADERS). They are found once the head
# is complete, by lowering only the names as long as one of them (READ_SIZES, written
# out where it is used: mypyc compares a literal tuple's ints inline).
READ: Final = frozenset(
    (
        b"content-length",
        b"transfer-encoding",
        b"content-type",
        b"retry-after",
        b"retry-after-ms",
        b"x-should-retry",
        b"openai-processing-ms",
        b"openai-version",
    )
)
READ_SIZES = (11, 12, 14, 17, 20)


class Origin:
    """Where requests to one upstream origin go: host, port, TLS, and its idle pool."""

    __slots__ = ("host", "host_header", "idle", "in_use", "port", "ssl")

    def __init__(self, url: str, ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        tls = parts.scheme == "https"
        self.port = parts.port or (443 if tls else 80)
        self.ssl: ssl.SSLContext | None = None
        if tls:
            self.ssl = ssl.create_default_context(cafile=ca_file)
        default = 443 if tls else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if self.port == default else f"{name}:{self.port}"
        self.idle: deque[Connection] = deque()
        self.in_use = 0  # connections to this origin leased to a request


class Response:
    """One upstream response: status and headers, then its body as it arrives."""

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_error",
        "_headers",
        "_idle",
        "_lines",
        "_loop",
        "_relay",
        "_since",
        "_size",
        "_timer",
        "_waiter",
        "content_type",
        "fields",
        "started",
        "status",
    )

    def __init__(self, conn: Connection, idle: float | None) -> None:
        self._conn: Connection | None = conn
        self._idle = idle
        self._loop = conn.loop
        # pump's callback while it runs; None: bytes wait for read_chunk.
        self._relay: Callable[[bytes], bool] | None = None
        self._since = 0.0  # loop time at which the current read began to wait
        self._timer: asyncio.TimerHandle | None = None
        self.started: asyncio.Future[None] = self._loop.create_future()
        self.status = 0
        self._lines: dict[bytes, bytes] = {}  # the header lines (Connection.lines)
        self.fields: dict[bytes, bytes] = {}  # those of READ, by lowered name
        self._headers: CIMultiDict[str] | None = None
        self.content_type = _DEFAULT_CONTENT_TYPE
        self._chunks = conn.body  # llhttp appends the body's chunks to it
        self._size = 0
        self._complete = False
        self._error: Disconnected | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def headers(self) -> CIMultiDict[str]:
        """The header lines, the first value of each name as it was spelt, made when
        first asked for (the relay reads ``fields``, those of ``READ``)."""
        made = self._headers
        if made is None:
            lines = self._lines.items()
            made = self._headers = CIMultiDict((k.decode("latin-1"), text_of(v)) for k, v in lines)
        return made

    def body_if_complete(self) -> bytes | None:
        """The whole body when all of it has arrived already (no wait), else None."""
        if self._complete and self._error is None:
            return self._take()
        return None

    async def read_chunk(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some), or
        ``b""`` at the end of the body. Raises ``Disconnected`` when it was cut, once
        the bytes before the cut have been read, and ``TimeoutError`` when it waited
        ``idle`` seconds for the next bytes."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()
        return self._take()

    async def pump(self, relay: Callable[[bytes], bool]) -> None:
        """Hand the body to ``relay`` read by read, as it arrives: called in the
        connection's ``data_received``, so the caller's task is not woken per read.
        Returns when ``relay`` returns False (it declined to go on: those bytes are
        its own, it just wants the task back) or at the end of the body; raises as
        ``read_chunk`` does, after ``relay`` had the bytes that came before the cut.
        ``relay`` must not raise."""
        self._relay = relay
        try:
            while True:
                if self._chunks:  # came before the pump began, or before a failure
                    if not relay(self._take()):
                        return
                    continue
                if self._relay is None:  # declined in data_received
                    return
                if self._error is not None:
                    raise self._error
                if self._complete:
                    return
                await self._wait()
        finally:
            self._relay = None

    async def _wait(self) -> None:
        """Until something arrives (or ends, or fails), or ``idle`` seconds pass."""
        loop = self._loop
        waiter = self._waiter = loop.create_future()
        if self._idle is not None:
            # One lazily re-armed timer per response, not one per read (~2.5 µs).
            self._since = loop.time()
            if self._timer is None:
                self._timer = loop.call_at(self._since + self._idle, self._check_idle)
        try:
            await waiter
        finally:
            self._waiter = None

    def is_complete(self) -> bool:
        """Whether the whole body has arrived and been read: the next ``read_chunk``
        returns ``b""`` without waiting."""
        return self._complete and self._error is None and not self._chunks

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def _take(self) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.transport.resume_reading()
        self._size = 0
        return data

    def close(self) -> None:
        """Done with it: the connection goes back to its pool when the response was
        read to its end and may be kept, and is closed otherwise. Idempotent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _check_idle(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done() or self._idle is None:
            return  # nobody waits: the next wait arms the timer again
        loop = self._loop
        due = self._since + self._idle
        if loop.time() >= due:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = loop.call_at(due, self._check_idle)

    def _expire(self) -> None:
        """The first-byte deadline passed."""
        if not self.started.done():
            self.started.set_exception(TimeoutError())

    # Called by the connection.

    def _fed(self, size: int) -> None:
        """The end of a read that brought body bytes (``size``: the read's, framing
        included): they go to the pump's callback, or wake the reader."""
        self._size += size
        if self._size > _HIGH_WATER and self._conn is not None:
            self._conn.transport.pause_reading()
        relay = self._relay
        if relay is None:
            self._wake()
        elif relay(self._take()):
            self._since = self._loop.time()  # the idle wait starts again
        else:
            self._relay = None
            self._wake()

    def _end(self, error: Disconnected | None = None) -> None:
        if self._complete or self._error is not None:
            return
        if error is None:
            self._complete = True
        else:
            self._error = error
        if not self.started.done():
            if error is None:
                self.started.set_result(None)
            else:
                self.started.set_exception(error)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class Pool(Protocol):
    """What a connection needs of the client that leased it (``h1.Client``)."""

    busy: set[Connection]
    closed: bool

    def _idle(self, conn: Connection, origin: Origin) -> None: ...
    def _release(self, origin: Origin) -> None: ...


class Connection(asyncio.Protocol):
    """One connection to an upstream: at most one request on it at a time."""

    def __init__(self, client: Pool, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        # Held, not asked for per request: in Python 3.11 ``asyncio.get_running_loop``
        # checks the process id, and glibc's ``getpid`` is a system call (~0.2 µs).
        self.loop = asyncio.get_running_loop()
        # The current response's unread body: llhttp calls ``on_body`` once per chunk
        # of it, a C call straight to the list (a method of ours was ~0.35 µs per
        # event of a stream); what it means is seen once per read (data_received).
        self.body: list[bytes] = []
        self.on_body = self.body.append
        # Its header lines, as llhttp reads them: a C call straight to the dict too
        # (a method of ours that decoded each line into a CIMultiDict cost ~1,600
        # instructions a line, ``__setitem__``, a slot wrapper, ~840; callgrind,
        # bench/RESULTS.md). The first value of a name repeated as it was spelt.
        self.lines: dict[bytes, bytes] = {}
        self.on_header = self.lines.setdefault
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport
        self.response: Response | None = None
        self.served = 0  # requests sent on it before the current one
        self.idle_since = 0.0
        self.closing = False
        self.received = False  # a byte of the current response arrived
        self.head = 0
        self.framed = False  # the response has Content-Length or chunked framing
        self.done = False  # the current response's message is complete
        self.keep = False
        self.leased = False  # counted in the pool's in_use

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, head: bytes, body: bytes | None, idle: float | None) -> Response:
        self.body.clear()  # what the last response's reader left unread
        self.response = response = Response(self, idle)
        self.received = self.framed = self.done = False
        self.lines.clear()
        self.head = 0  # bytes of the response before its headers were complete
        self.client.busy.add(self)
        if body:
            self.transport.writelines((head, body))
        else:
            self.transport.write(head)
        return response

    def finish(self) -> None:
        """The response's reader is done with it."""
        self.client.busy.discard(self)
        reusable = self.done and self.keep and not self.closing and not self.client.closed
        self.response = None
        if reusable:
            self.served += 1
            self.client._idle(self, self.origin)
        else:
            self.close()
        self._unlease()

    def _unlease(self) -> None:
        if self.leased:
            self.leased = False
            self.client._release(self.origin)

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.response is None or self.done:
            self.close()  # bytes nobody asked for: this connection cannot be trusted
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail("The upstream sent a malformed HTTP response.")
            return
        response = self.response
        if response is None:
            return
        if self.body:
            response._fed(len(data))
        elif not response.started.done():
            self.head += len(data)  # all of it is still head
            if self.head > MAX_HEAD:
                self._fail(f"The upstream's response headers exceeded {MAX_HEAD} bytes.")

    def _fail(self, reason: str) -> None:
        self.keep = False
        self.close()
        if not self.done and self.response is not None:
            self.response._end(Disconnected(reason, answered=True))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.client.busy.discard(self)
        with contextlib.suppress(ValueError):
            self.origin.idle.remove(self)
        response = self.response
        if response is not None and not self.done:
            if response.started.done() and not self.framed:
                response._end()  # a body delimited by the end of the connection
            else:
                response._end(
                    Disconnected("The upstream closed the connection.", answered=self.received)
                )
        self._unlease()

    # llhttp's callbacks, while a response is current (data_received checks).

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        lines = self.lines
        status = self.parser.get_status_code()
        if status < 200:  # 1xx: informational, the real response follows
            lines.clear()
            return
        response.status = status
        self.keep = self.parser.should_keep_alive()
        read: dict[bytes, bytes] = {}
        for name, value in lines.items():
            if len(name) in (11, 12, 14, 17, 20):  # READ_SIZES
                key = name.lower()
                if key in READ and key not in read:
                    read[key] = value
        response._lines, response.fields = dict(lines), read
        self.framed = b"content-length" in read or b"transfer-encoding" in read
        kind = read.get(b"content-type")
        if kind:
            response.content_type = text_of(kind).partition(";")[0].strip().lower()
        response.started.set_result(None)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if not self.response.started.done():
            return  # the end of a 1xx: the real response follows
        self.done = True
        self.response._end()


def text_of(value: bytes) -> str:
    """A header value: UTF-8 (mypyc's own decode, not the codec lookup), bytes that are
    not kept as surrogate escapes."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value.decode("utf-8", "surrogateescape")
