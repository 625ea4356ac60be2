"""The upstream HTTP/1.1 client: keep-alive connection pools on bare asyncio protocols,
responses parsed by llhttp (``httptools``).

Why not aiohttp's client: per proxied request it cost about as much CPU as the whole
rest of the proxy (request/response objects, header merging, a writer task, tracing
hooks; ``docs/performance.md`` has the measurements). A proxy needs a small part of
it: send one request with a body we already hold, read the status and headers, then
hand body bytes on as they arrive, on pooled connections. That part is here; the
parsing (status line, headers, Content-Length and chunked framing) is llhttp's, the
same parser aiohttp uses.

Contracts:
- A response's body arrives through ``read_chunk`` (everything buffered so far, or
  ``b""`` at its end). The bytes that came before a failure are delivered before the
  failure is raised, so a relay can pass on complete events, then report the cut.
- Or through ``pump``: each read's body bytes handed to a callback in the
  connection's ``data_received``, without waking the reader's task, until the callback
  declines (it returns False: the task takes over, say to wait for a slow client) or
  the body ends. Same failure order: the bytes before a failure are pumped first.
- Reading is paused while more than ``_HIGH_WATER`` bytes wait unread (a slow client
  slows its upstream instead of growing the proxy).
- ``Response.close`` is the one way out: a response read to its end on a connection
  that may be kept alive returns the connection to its pool; anything else (a
  cancelled relay, a client gone) closes the connection, which stops the upstream's
  work on it.
- A request that went out on a pooled connection which the upstream closed without
  answering (the keep-alive race: its idle timer fired as the request arrived) is
  sent again at once on a new connection: no byte came back, so nothing was seen.
  Once: a new connection closed without an answer is the upstream's failure.
- The pool holds at most ``limit`` connections (and ``limit_per_host`` to one origin,
  0 = no such cap); a request beyond that waits for one. Idle connections are closed
  after ``keepalive`` seconds (checked when a connection is taken from the pool, and
  by the upstream's own timer; a connection closed by its upstream leaves the pool
  at once).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from .faults import ConnectFailed, ConnectTimeout, Disconnected, TLSFailed
from .h1_conn import Connection, Origin, Response


class Client:
    """The worker's one upstream client: a pool of keep-alive connections per origin."""

    def __init__(self, *, limit: int, limit_per_host: int = 0, keepalive: float = 30.0) -> None:
        self.limit = limit
        self.limit_per_host = limit_per_host
        self.keepalive = keepalive
        self.in_use = 0  # connections leased to a request (connecting ones included)
        self.closed = False
        self._origins: set[Origin] = set()
        self.busy: set[Connection] = set()  # connections serving a request
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        *,
        block: str = "",
        connect_timeout: float | None = None,
        first_byte: float | None = None,
        idle: float | None = None,
    ) -> Response:
        """Send a request and wait for its response headers. Raises ``ConnectFailed``
        (``ConnectTimeout`` after ``connect_timeout``), ``Disconnected``, or
        ``TimeoutError`` when no response headers came within ``first_byte`` seconds
        (waiting for a connection included). ``idle``: see ``Response.read_chunk``.
        ``block``: header lines made once by ``header_lines`` and sent before
        ``headers``."""
        head = _head(method, target, origin.host_header, block, headers, body)
        conn = self._pooled(origin)
        loop = asyncio.get_running_loop() if conn is None else conn.loop
        deadline = None if first_byte is None else loop.time() + first_byte
        fresh = False  # after the keep-alive race, only a new connection is trusted
        while True:
            if conn is None:
                async with asyncio.timeout_at(deadline):
                    conn = await self._connection(origin, connect_timeout, fresh)
            reused = conn.served > 0
            response = conn.send(head, body, idle)
            # One timer handle rather than an asyncio.timeout: ~1 µs, not ~6.
            timer = None if deadline is None else loop.call_at(deadline, response._expire)
            try:
                await response.started
            except Disconnected as exc:
                response.close()
                # The keep-alive race: nobody's failure, nothing seen. The other idle
                # connections are as old, so the loop goes round with a new one (no
                # `continue` here: mypyc does not compile one inside `try`).
                if not reused or exc.answered:
                    raise
                fresh = True
                conn = None
            except BaseException:
                response.close()
                raise
            else:
                return response
            finally:
                if timer is not None:
                    timer.cancel()

    def _has_room(self, origin: Origin) -> bool:
        return self.in_use < self.limit and (
            not self.limit_per_host or origin.in_use < self.limit_per_host
        )

    def _pooled(self, origin: Origin) -> Connection | None:
        """A fresh idle connection to ``origin``, leased, when there is room and one
        (no wait); None otherwise."""
        if self.closed:
            raise ConnectFailed("the upstream client is closed")
        if not self._has_room(origin):
            return None
        idle = origin.idle
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if not conn.closing and conn.loop.time() - conn.idle_since < self.keepalive:
                self.in_use += 1
                origin.in_use += 1
                conn.leased = True
                return conn
            conn.close()
        return None

    async def _connection(
        self, origin: Origin, connect_timeout: float | None, fresh: bool = False
    ) -> Connection:
        """A leased connection to ``origin``: waits for room, then takes a pooled one
        (unless ``fresh``) or connects."""
        loop = asyncio.get_running_loop()
        while not self._has_room(origin):
            waiter = loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        conn = None if fresh else self._pooled(origin)
        if conn is not None:
            return conn
        self.in_use += 1
        origin.in_use += 1
        self._origins.add(origin)
        try:
            async with asyncio.timeout(connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl else None,
                )
        except BaseException as exc:
            self._release(origin)
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout(f"no connection within {connect_timeout}s") from None
            if isinstance(exc, ssl.SSLError | ssl.CertificateError):
                raise TLSFailed(str(exc)) from None
            if isinstance(exc, OSError):
                raise ConnectFailed(str(exc)) from None
            raise
        conn.leased = True
        return conn

    def _release(self, origin: Origin) -> None:
        """A lease on a connection of ``origin`` ended: its room goes to whoever waits."""
        self.in_use -= 1
        origin.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        # Every waiter looks again: each may want another origin (per-host caps).
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _idle(self, conn: Connection, origin: Origin) -> None:
        conn.idle_since = conn.loop.time()
        origin.idle.append(conn)

    def idle(self) -> int:
        """Idle connections in the pools."""
        return sum(len(origin.idle) for origin in self._origins)

    async def close(self) -> None:
        """Close every connection, idle or busy; later requests fail."""
        self.closed = True
        for origin in self._origins:
            while origin.idle:
                origin.idle.pop().close()
        for conn in list(self.busy):
            conn.close()
        self._wake()
        await asyncio.sleep(0)  # let the transports report themselves lost


def header_lines(headers: list[tuple[str, str]]) -> str:
    """``headers`` as the lines of a request head. Raises ``ValueError`` on a line break
    in a name or value (it would end the head early)."""
    lines = []
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"a line break in header {name!r}")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines)


def _head(
    method: str,
    target: str,
    host: str,
    block: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
) -> bytes:
    length = "" if body is None else f"Content-Length: {len(body)}\r\n"
    head = (
        f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n{block}{header_lines(headers)}{length}\r\n"
    )
    return head.encode("utf-8", "surrogateescape")
