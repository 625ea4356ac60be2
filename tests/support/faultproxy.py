"""A TCP relay that injects faults between the proxy and what it talks to (Redis,
PostgreSQL, an upstream): asyncpg's ``TCPFuzzingProxy`` idea, written for these tests.

    async with FaultProxy(port_of_redis) as relay:
        url = f"redis://127.0.0.1:{relay.port}/0"   # the proxy connects through it
        relay.pause()                    # accepts, forwards nothing: a black hole
        relay.refuse()                   # resets every connection, and each new one at
                                         # once: a server that is down
        relay.resume()                   # (ends a pause or a refusal)
        relay.cut_on(b"EVALSHA")         # resets the connection in the middle of the
                                         # next client chunk holding these bytes
        relay.cut_on(b"COMMIT", after=True)  # lets it through, resets on the answer
        relay.cut_after(4000, up=False)  # resets once 4000 more bytes came back
        relay.drip(0.01)                 # server → client one byte per 10 ms (a delay)

Invariants:
- Bytes are relayed in order, unchanged, or not at all: a fault never alters a byte,
  it only delays, holds back or cuts.
- A cut is a TCP reset (SO_LINGER 0) on both sides, so each side sees a broken
  connection, not a clean end.
- Every connection and task it made is gone after ``close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable

_CHUNK = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)


class _Link:
    """One client connection and its server connection."""

    def __init__(self, client: asyncio.StreamWriter, server: asyncio.StreamWriter) -> None:
        self.client = client
        self.server = server
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.client, self.server):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            writer.transport.abort()


class _Trigger:
    """A one-shot cut: when a chunk going ``up`` (client → server) or down holds
    ``pattern``, forward the bytes before it and half of the pattern (mid-message), then
    reset the connection; or, with a ``budget``, once that many bytes went through; or,
    ``after``, see below."""

    def __init__(self, pattern: bytes, up: bool, after: bool, budget: int | None) -> None:
        self.pattern = pattern
        self.up = up
        self.budget = budget
        # Forward the whole chunk, then reset when the server answers it (the request
        # was acted on, the client never learns the outcome).
        self.after = after
        self.link: _Link | None = None  # the connection an ``after`` trigger let through
        self.fired = asyncio.Event()


class FaultProxy:
    """A loopback TCP relay to ``target_port`` with switchable faults (see the module
    docstring). ``port`` is where clients connect."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.links: set[_Link] = set()
        self.accepted = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.faults = 0  # faults injected (cuts, pauses, triggers fired), for the figures
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._drip = 0.0
        self._drip_after = 0  # server → client bytes relayed at full speed before a drip
        self._closed = False
        self._refusing = False
        self._trigger: _Trigger | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> FaultProxy:
        """Listen on a free loopback port (``port``)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop listening and reset every connection, including ones still being set
        up (a client may reconnect while the relay closes)."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        self._flowing.set()
        while self._handlers:
            for link in list(self.links):
                link.reset()
                for task in link.tasks:
                    task.cancel()  # (a pump may be asleep in a drip)
            # Not cancelled: a handler ends once its pumps have, and asyncio's server
            # (3.11) would report a cancelled handler as an error.
            await asyncio.wait(self._handlers, timeout=0.1)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        self.links.clear()

    # -- faults -------------------------------------------------------------------------

    def pause(self) -> None:
        """Accept connections and read from them, but forward nothing either way."""
        self.faults += 1
        self._flowing.clear()

    def refuse(self) -> None:
        """Reset every connection, and each new one as soon as it is accepted."""
        self.faults += 1
        self._refusing = True
        for link in list(self.links):
            link.reset()

    def resume(self) -> None:
        self._refusing = False
        self._flowing.set()

    def drip(self, interval: float, after: int = 0) -> None:
        """Server → client bytes go one at a time, ``interval`` seconds apart (0: off),
        once ``after`` more bytes went through at full speed."""
        if interval:
            self.faults += 1
        self._drip = interval
        self._drip_after = self.bytes_down + after

    def cut_on(self, pattern: bytes, *, up: bool = True, after: bool = False) -> asyncio.Event:
        """Arm a one-shot cut on the next chunk holding ``pattern`` (see ``_Trigger``);
        the returned event is set when it fired."""
        self._trigger = _Trigger(pattern, up, after, None)
        return self._trigger.fired

    def cut_after(self, budget: int, *, up: bool = True) -> asyncio.Event:
        """Arm a one-shot cut once ``budget`` more bytes went that way (mid-message)."""
        self._trigger = _Trigger(b"", up, False, budget)
        return self._trigger.fired

    # -- relaying -----------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._handlers.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            _Link(writer, writer).reset()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _Link(writer, writer).reset()
            return
        link = _Link(writer, up_writer)
        if self._closed:  # closed while this one was connecting
            link.reset()
            return
        self.links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer, up=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, up=False)),
        ]
        try:
            await asyncio.gather(*link.tasks, return_exceptions=True)
        finally:
            self.links.discard(link)
            for side in (writer, up_writer):
                side.close()

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool
    ) -> None:
        count: Callable[[int], None] = self._count_up if up else self._count_down
        try:
            while chunk := await reader.read(_CHUNK):
                await self._flowing.wait()
                if await self._fire(link, writer, chunk, up):
                    return
                if not up and self._drip:
                    await self._dribble(writer, chunk)
                else:
                    writer.write(chunk)
                    await writer.drain()
                    count(len(chunk))
            writer.write_eof()
        except (OSError, RuntimeError):  # the other side is gone (reset or closed)
            link.reset()

    async def _fire(
        self, link: _Link, writer: asyncio.StreamWriter, chunk: bytes, up: bool
    ) -> bool:
        """Apply an armed trigger to ``chunk``; True when the connection was cut."""
        trigger = self._trigger
        if trigger is None:
            return False
        if trigger.link is link and not up:  # the answer to what the trigger let through
            self._cut(link, trigger)
            return True
        if trigger.link is not None or trigger.up != up:
            return False
        if trigger.budget is not None:
            if len(chunk) <= trigger.budget:
                trigger.budget -= len(chunk)
                return False
            keep = trigger.budget
        else:
            at = chunk.find(trigger.pattern)
            if at < 0:
                return False
            if trigger.after:  # it goes through whole; the server's answer never will
                trigger.link = link
                return False
            keep = at + len(trigger.pattern) // 2
        writer.write(chunk[:keep])
        await writer.drain()
        self._cut(link, trigger)
        return True

    def _cut(self, link: _Link, trigger: _Trigger) -> None:
        self._trigger = None
        self.faults += 1
        link.reset()
        trigger.fired.set()

    async def _dribble(self, writer: asyncio.StreamWriter, chunk: bytes) -> None:
        fast = max(0, min(len(chunk), self._drip_after - self.bytes_down))
        if fast:
            writer.write(chunk[:fast])
            await writer.drain()
            self.bytes_down += fast
        for i in range(fast, len(chunk)):
            writer.write(chunk[i : i + 1])
            await writer.drain()
            self.bytes_down += 1
            await asyncio.sleep(self._drip)

    def _count_up(self, n: int) -> None:
        self.bytes_up += n

    def _count_down(self, n: int) -> None:
        self.bytes_down += n
