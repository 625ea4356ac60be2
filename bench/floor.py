"""The floor: what any proxy written on this event loop pays at the least.

A byte pipe, not a proxy: each client connection gets its own upstream connection,
and whatever one side sends is written to the other as it is, with no parsing, no
pooling, no headers, no accounting. Per request that is a read and a write each way
and the loop's own work around them, nothing else. ``bench.inproc --subject floor``
measures it beside the proxy and the thin relay: how much of their CPU per request
is the proxy's own code and how much any Python design on uvloop would pay anyway
(docs/performance.md). It is only right for one request in flight per connection
from clients that wait for each answer, as bench.inproc's do.
"""

from __future__ import annotations

import asyncio
from typing import cast


class _Side(asyncio.Protocol):
    """One end of the pipe: what it reads goes to ``peer`` (buffered until it exists)."""

    def __init__(self, peer: asyncio.Transport | None = None) -> None:
        self.peer = peer
        self.early: list[bytes] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class _Downstream(_Side):
    """The client's end: opens its upstream connection when the client connects."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.address = (host, port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        upstream, _ = await loop.create_connection(lambda: _Side(self.transport), *self.address)
        for data in self.early:
            upstream.write(data)
        self.early.clear()
        self.peer = cast(asyncio.Transport, upstream)


class Pipe:
    """A listening byte pipe to ``host:port`` (``addresses`` and ``cleanup`` as
    aiohttp's ``AppRunner``, so bench.inproc treats it as any other subject)."""

    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.addresses = [s.getsockname() for s in server.sockets]

    @classmethod
    async def start(cls, host: str, port: int) -> Pipe:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Downstream(host, port), "127.0.0.1", 0)
        return cls(server)

    async def cleanup(self) -> None:
        self.server.close()
