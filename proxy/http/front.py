"""The API listener's connections: the hot path parsed by the proxy, the rest by aiohttp
(issue #17; docs/performance.md, "The front door").

aiohttp stays the server: its ``AppRunner`` and sites own the listener, its
``RequestHandler`` serves the ops endpoints, the console, the admin API, preflights
and anything unusual. ``Front``, the protocol every new connection starts with, takes
the plain proxied request: ``POST /v1/<route>`` in HTTP/1.1 with a ``Host`` and one
``Content-Length`` (at most ``max_body_bytes``), no ``Transfer-Encoding``, ``Expect``,
``Upgrade`` or ``Content-Encoding`` (but ``identity``), none of aiohttp's
``SINGLETON_HEADERS`` twice, no NUL in a value, at most ``_MAX_HEADERS`` headers, a
head within ``max_header_bytes``, an ASCII target without ``%`` in its path or a
fragment. Its head is parsed by llhttp (``httptools``, as h1.py parses answers), and
the handler runs without aiohttp's ``Request``, routing and response machinery.

At the first request it does not take (or bytes that are not one) the connection is
handed to aiohttp for good, at a request boundary: a ``RequestHandler`` made as
aiohttp's server makes one is put on the transport (``set_protocol``) and given every
byte not consumed yet, so aiohttp's parser, limits and the JSON refusals (ingress.py)
see that request as if aiohttp had had the connection from the start.

Invariants (aiohttp's server contracts, kept; the suite runs through both):
- Requests of a connection are served one at a time, in order (pipelined ones wait;
  reading pauses while more than ``_HELD`` bytes wait).
- A connection without a complete request head for ``idle_timeout`` is closed.
- The handler reads the body within ``body_timeout`` (its 408); the socket is not
  read while more than ``_HELD`` bytes of a body wait that the handler has not asked
  for (it authenticates first); a connection whose body was not all read is closed
  after the answer.
- A client that goes cancels its handler, and so the upstream call.
- Drain: ``Door.pre_shutdown`` closes idle connections and marks busy ones to close
  after their answer; ``Door.shutdown`` waits for their handlers up to the grace
  period, then cancels them.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Coroutine
from typing import Any, Final, NamedTuple, cast

import httptools
from aiohttp import web
from aiohttp.http_parser import SINGLETON_HEADERS as _SINGLETONS
from aiohttp.web_protocol import RequestHandler
from multidict import CIMultiDict, CIMultiDictProxy

from ..config.schema import Server
from . import ingress
from .lean import Answer, Incoming

log = logging.getLogger("proxy")

_START: Final = b"POST /v1/"
_LENGTH: Final = b"\r\ncontent-length:"
_HEAD_END: Final = b"\r\n\r\n"
# Headers whose presence leaves the request to aiohttp (framing, codings, upgrades).
_AIOHTTP_HEADERS = frozenset(("expect", "upgrade"))  # and Content-Encoding but identity
_MAX_HEADERS = 100  # aiohttp refuses more than 128
# Bytes a connection holds for requests (or a body) nobody asked for yet before it
# stops reading from the socket.
_HELD: Final = 64 * 1024
# Request heads whose parse a listener keeps, without their length's digits
# (``Door.known``): a keep-alive client sends the same head again but for the length,
# and the clients of a listener send few kinds; past this many, it starts again. Only
# heads up to _KNOWN_BYTES are kept (an SDK's are under 1 KB), so that clients sending
# many large ones cannot make it hold more than a few MB.
_KNOWN: Final = 256
_KNOWN_BYTES: Final = 4096


class Hot(NamedTuple):
    """What an app serves through ``Front`` (``app[HOT]``, set by app.py): the route
    tails of ``POST /v1/...`` it takes, what makes the handler that answers an
    ``Incoming`` once the app has started (every answer written by lean.py; it returns
    lean's ``Sent``), and the limits."""

    route: re.Pattern[str]
    bind: Callable[[web.Application], Callable[[Incoming], Coroutine[Any, Any, Answer]]]
    settings: Server


HOT = web.AppKey("hot", Hot)


class _Known:
    """What a head the front takes says, but its length (``Door.known``)."""

    __slots__ = ("headers", "keep_alive", "query", "tail")

    def __init__(
        self, tail: str, query: str, headers: CIMultiDictProxy[str], keep_alive: bool
    ) -> None:
        self.tail = tail  # of the path, after /v1/
        self.query = query
        self.headers = headers  # but Content-Length
        self.keep_alive = keep_alive


class Door:
    """What the ``Front`` connections of one listener share."""

    def __init__(
        self, aiohttp: Callable[[], RequestHandler], app: web.Application, hot: Hot
    ) -> None:
        self.aiohttp = aiohttp  # makes the handler a connection is handed to
        self.hot = hot
        self.handler = hot.bind(app)  # the app has started (the runner's server)
        self.settings = hot.settings
        self.max_header_bytes = hot.settings.max_header_bytes
        self.max_body_bytes = hot.settings.max_body_bytes
        self.loop = asyncio.get_running_loop()
        self.idle_timeout = hot.settings.idle_timeout
        self.cross = app[ingress.DECORATION].cross
        self.fronts: set[Front] = set()
        self.known: dict[bytes, _Known] = {}  # a head without its length's digits

    def pre_shutdown(self) -> None:
        for front in list(self.fronts):
            front.closing = True
            if front.task is None and front.transport is not None:
                front.transport.close()

    async def shutdown(self, timeout: float | None) -> None:  # noqa: ASYNC109 (aiohttp's)
        tasks = [f.task for f in self.fronts if f.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
        for front in list(self.fronts):
            if front.transport is not None:
                front.transport.close()


class Front(asyncio.Protocol):
    """One client connection while its requests are the hot path's (module doc)."""

    __slots__ = (
        "body",
        "closing",
        "door",
        "drainer",
        "idle_since",
        "paused",
        "peer",
        "pending",
        "reading",
        "scanned",
        "task",
        "timer",
        "transport",
        "url",
    )

    def __init__(self, door: Door) -> None:
        self.door = door
        self.transport: asyncio.Transport | None = None
        self.pending: bytes | bytearray = b""  # received, not consumed
        self.scanned = 0  # how far ``pending`` holds no head's end
        self.task: asyncio.Task[Answer] | None = None
        self.body: _Body | None = None  # of the request being served
        self.closing = False
        self.paused = False  # writing (the client's buffer is full)
        self.reading = True
        self.drainer: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.idle_since = 0.0
        self.peer: str | None = None
        self.url = b""

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        peer = transport.get_extra_info("peername")
        self.peer = str(peer[0]) if isinstance(peer, (list, tuple)) else peer
        door = self.door
        door.fronts.add(self)
        self.idle_since = door.loop.time()
        self.timer = door.loop.call_later(door.idle_timeout, self._idle)

    def data_received(self, data: bytes) -> None:
        body = self.body
        if body is not None and body.missing:
            data = body.feed(data)
            if not data:
                return
        pending = self.pending
        if not pending:
            pending = self.pending = data
        else:  # a head in pieces, or pipelined requests: grown in place, not copied
            if isinstance(pending, bytes):
                pending = self.pending = bytearray(pending)
            pending += data
        if self.task is None:
            self._next()
        elif len(pending) > _HELD:
            self.pause_reading()

    # eof_received: asyncio's default (the transport closes, as aiohttp's handler lets it)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.transport = None
        self.door.fronts.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()  # a client that goes cancels its upstream call
        if self.body is not None:
            self.body.lost()
        drainer = self.drainer
        if drainer is not None and not drainer.done():
            drainer.set_exception(ConnectionResetError("Connection lost"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        drainer = self.drainer
        if drainer is not None:
            self.drainer = None
            if not drainer.done():
                drainer.set_result(None)

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("Cannot write to closing transport")
        if self.paused:
            drainer = self.drainer
            if drainer is None or drainer.done():
                drainer = self.drainer = self.door.loop.create_future()
            await drainer

    def pause_reading(self) -> None:
        if self.reading and self.transport is not None:
            self.reading = False
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.reading and self.transport is not None:
            self.reading = True
            self.transport.resume_reading()

    # -- requests --------------------------------------------------------------------------

    def _next(self) -> None:
        """With no request being served: take the next one, hand the connection to
        aiohttp, or wait for more bytes."""
        pending = self.pending
        if not pending:
            return
        if not pending.startswith(_START):
            if len(pending) < len(_START) and _START.startswith(pending):
                return
            return self._hand_over()
        scanned = self.scanned  # where a head's end may begin, after what was searched
        end = pending.find(_HEAD_END, scanned)
        if end < 0:
            if len(pending) > self.door.max_header_bytes or pending.find(b"\n\n", scanned) >= 0:
                self._hand_over()
            else:
                self.scanned = max(0, len(pending) - len(_HEAD_END) + 1)
            return
        self.scanned = 0
        size = end + len(_HEAD_END)
        call = self._take(bytes(pending[:size]))
        if call is None:
            return self._hand_over()
        assert self.body is not None
        self.pending = self.body.feed(bytes(pending[size:]))
        door = self.door
        self.task = task = door.loop.create_task(door.handler(call))
        task.add_done_callback(self._served)

    def _take(self, head: bytes) -> Incoming | None:
        """The request of this head if the front takes it (module doc), its body
        (``self.body``) waiting for its bytes. A head that differs from one taken
        before only in its Content-Length digits is taken as that one was
        (``Door.known``): llhttp's verdict and everything read off the head depend
        on the rest of it, not on which digits the length has."""
        door = self.door
        if len(head) > door.max_header_bytes:
            return None
        at = _length_at(head)
        if at < 0:
            return None
        line = head.index(b"\r\n", at + len(_LENGTH))
        spaced = head[at + len(_LENGTH) : line]  # the value, with the spaces around it
        value = spaced.lstrip(b" \t")
        start = line - len(value)
        value = value.rstrip(b" \t")
        if not value.isdigit():
            return None
        # NUL where the digits were (no head the front takes has one): the spaces
        # around them stay where they were in the key
        key = head[:start] + b"\0" + head[start + len(value) :]
        known = door.known.get(key)
        if known is None:
            known = self._parse(head, head[head.index(b"\r\n") : at] + head[line:])
            if known is None:
                return None
            if len(key) <= _KNOWN_BYTES:
                if len(door.known) >= _KNOWN:
                    door.known.clear()
                door.known[key] = known
        # llhttp takes any number of leading zeros, int() at most 4300 digits
        value = value.lstrip(b"0") or b"0"
        if len(value) > 18:
            return None  # more than any body limit; aiohttp refuses it
        length = int(value)
        if length > door.max_body_bytes:
            return None
        body = self.body = _Body(self, length)
        return Incoming(
            "POST",
            known.tail,
            known.query,
            known.headers,
            self.peer,
            self.transport,
            self.drain,
            body.read,
            known.keep_alive and not self.closing,
            door.cross,
        )

    def _parse(self, head: bytes, block: bytes) -> _Known | None:
        """What ``head`` says if the front takes it, checked by llhttp (``block``:
        its header lines without the request line and Content-Length's)."""
        if head.find(b"\0") >= 0:
            return None
        parser = httptools.HttpRequestParser(self)  # it validates; the fields are split here
        try:
            parser.feed_data(head)
        except httptools.HttpParserError:
            return None
        if parser.get_http_version() != "1.1":
            return None
        headers = _headers(block)
        if headers is None:
            return None
        url = self.url
        path, _, query = url.partition(b"?")
        if path.find(b"%") >= 0 or url.find(b"#") >= 0 or not url.isascii():
            return None
        tail = path[len(_START) - len("POST ") :].decode()
        if self.door.hot.route.fullmatch(tail) is None:
            return None
        return _Known(tail, query.decode(), headers, parser.should_keep_alive())

    def on_url(self, url: bytes) -> None:  # httptools' callback
        self.url = url

    def _served(self, task: asyncio.Task[Answer]) -> None:
        self.task = None
        body, self.body = self.body, None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("unexpected error answering a request", exc_info=exc)
        transport = self.transport
        if transport is None:
            return
        done = exc is None and body is not None and not body.missing
        if not done or self.closing or not task.result().keep_alive:
            transport.close()
        else:
            self.idle_since = self.door.loop.time()
            self.resume_reading()
            self._next()

    def _idle(self) -> None:
        """The idle deadline: close a connection that has had no complete request head
        for ``idle_timeout`` (checked, not re-armed, per request)."""
        door = self.door
        self.timer = None
        if self.transport is None:
            return
        if self.task is None and self.body is None:
            left = self.idle_since + door.idle_timeout - door.loop.time()
            if left <= 0:
                self.transport.close()
                return
        else:
            left = door.idle_timeout
        self.timer = door.loop.call_later(left, self._idle)

    def _hand_over(self) -> None:
        """Give the connection, and the bytes not consumed, to aiohttp for good."""
        transport = self.transport
        assert transport is not None
        assert self.task is None
        self.door.fronts.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None
        handler = self.door.aiohttp()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.paused:
            handler.pause_writing()
        if not self.reading:
            transport.resume_reading()
        pending, self.pending = self.pending, b""
        handler.data_received(bytes(pending))


def _length_at(head: bytes) -> int:
    """Where ``head``'s Content-Length line starts (at its CRLF), -1 without one.
    ``head`` has passed llhttp or is about to (``Front._take``), which refuses a
    second Content-Length (any spelling: smuggling, as aiohttp refuses it), an empty
    one, one with a character not a digit and one that overflows; so the first line
    found is the one, and the usual spellings are looked for before the head is
    lowered to find any other."""
    at = head.find(b"\r\nContent-Length:")
    if at < 0:
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            at = head.lower().find(_LENGTH)
    return at


def _headers(block: bytes) -> CIMultiDictProxy[str] | None:
    """The fields of ``block`` (a head's lines but its request line and length), None
    for a request the front leaves to aiohttp (module doc). llhttp refused folded
    lines, bare LFs, controls and "name :" already: one field a line."""
    text = block.decode("utf-8", "surrogateescape")  # per value, as aiohttp decodes
    fields = [line.partition(":") for line in text.split("\r\n")[1:-2]]
    if len(fields) >= _MAX_HEADERS:  # Content-Length besides
        return None
    names = [name.lower() for name, _, _ in fields]
    once = [name for name in names if name in _SINGLETONS]
    if len(once) != len(set(once)) or "host" not in once or "transfer-encoding" in once:
        return None  # aiohttp refuses a second one of these (smuggling), or decides
    if not _AIOHTTP_HEADERS.isdisjoint(names):
        return None
    # as aiohttp's parser has them: no whitespace around a value
    headers = CIMultiDict((name, value.strip(" \t")) for name, _, value in fields)
    coding = headers.get("Content-Encoding")
    if coding is not None and coding.lower() != "identity":
        return None
    return CIMultiDictProxy(headers)


class _Body:
    """The body of the request being served, as it arrives."""

    __slots__ = ("front", "missing", "parts", "waiter")

    def __init__(self, front: Front, length: int) -> None:
        self.front = front
        self.missing = length
        self.parts: list[bytes] = []
        self.waiter: asyncio.Future[None] | None = None

    def feed(self, data: bytes) -> bytes:
        """Take what belongs to the body; returns the rest (the next requests)."""
        missing = self.missing
        if not missing:
            return data
        if len(data) <= missing:
            self.parts.append(data)
            self.missing = missing - len(data)
            rest = b""
        else:
            self.parts.append(data[:missing])
            self.missing = 0
            rest = data[missing:]
        if self.missing:
            if self.waiter is None and sum(map(len, self.parts)) > _HELD:
                self.front.pause_reading()  # nobody asked for it yet
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        return rest

    def lost(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("Connection lost"))

    async def read(self) -> bytes:
        if self.missing:
            door = self.front.door
            self.waiter = door.loop.create_future()
            self.front.resume_reading()
            try:
                async with asyncio.timeout(door.settings.body_timeout):
                    await self.waiter
            except TimeoutError:
                raise ingress.late_body(door.settings.body_timeout) from None
        parts = self.parts
        return parts[0] if len(parts) == 1 else b"".join(parts)
