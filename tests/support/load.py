"""The one load generator of the suite: concurrent clients sending chat requests until
stopped (the ledger, limiter, serve and adversity tests all use it)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Literal, NamedTuple

import aiohttp
import orjson

STREAM = orjson.dumps(
    {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
)
PLAIN = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "a b c"}]})

OnFailure = Literal["stop", "go on", "raise"]


class Answer(NamedTuple):
    """One answered request: the ``phase`` it started in, how long it took, its status."""

    phase: str
    latency: float
    status: int


class Load:
    """``clients`` concurrent clients sending chat requests to ``url`` (the proxy's
    address, without ``/v1``) until stopped, each request with its own X-Request-Id
    and ``headers``, bounded by ``deadline`` seconds.

    It keeps ``statuses`` (every answer's status, in order), ``completed`` (each
    request whose whole answer arrived, to when it did), ``answering`` (the requests
    whose answer has begun and not yet ended), ``failed`` (each request cut off, by a
    connection error or no answer within the deadline, to why) and
    ``slowest`` (the longest an answer took), and each ``Answer`` under the ``phase`` (a
    label the test sets) current when its request started.

    ``streams``: every other request is streamed (``stream_headers`` added to those);
    else all are plain. ``fresh_connections``: each request on a new connection (so a
    stopped listener shows at once), else keep-alive. ``on_failure``: at a failure a
    client ``"stop"``s (the proxy stopped listening), ``"go on"`` (as behind a load
    balancer), or ``"raise"``s (a hang fails the test, at the next ``reach``)."""

    def __init__(
        self,
        url: str,
        clients: int = 4,
        *,
        headers: dict[str, str] | None = None,
        streams: bool = True,
        stream_headers: dict[str, str] | None = None,
        fresh_connections: bool = True,
        deadline: float = 10.0,
        on_failure: OnFailure = "stop",
    ) -> None:
        self.url = url + "/v1/chat/completions"
        self.statuses: list[int] = []
        self.completed: dict[str, float] = {}
        self.answering: set[str] = set()
        self.failed: dict[str, str] = {}
        self.slowest = 0.0
        self.phase = ""
        self.answers: list[Answer] = []
        self.headers = headers or {}
        self.streams = streams
        self.stream_headers = stream_headers or {}
        self.fresh_connections = fresh_connections
        self.deadline = deadline
        self.on_failure = on_failure
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(clients)]

    async def reach(
        self, count: int, also: Callable[[], bool] = lambda: True, timeout: float = 30.0
    ) -> None:
        """Until ``count`` requests have been answered and ``also()`` holds."""
        deadline = time.monotonic() + timeout
        while len(self.statuses) < count or not also():
            for task in self._tasks:
                if task.done():
                    task.result()  # a client failed (on_failure="raise"): raise it here
            assert time.monotonic() < deadline, f"load stuck at {len(self.statuses)}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Each client finishes the request it is in, then stops."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _client(self, n: int) -> None:
        connector = aiohttp.TCPConnector(force_close=self.fresh_connections)
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                rid = f"load-{n}-{i}"
                stream = self.streams and i % 2 == 1
                headers = {"X-Request-Id": rid, **self.headers}
                if stream:
                    headers.update(self.stream_headers)
                phase, started = self.phase, time.monotonic()
                try:
                    async with asyncio.timeout(self.deadline):
                        async with http.post(
                            self.url, data=STREAM if stream else PLAIN, headers=headers
                        ) as resp:
                            self.answering.add(rid)
                            await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failed[rid] = repr(exc)
                    self.answering.discard(rid)
                    if self.on_failure == "raise":
                        raise
                    if self.on_failure == "stop":
                        return
                    await asyncio.sleep(0.05)  # (a refused connect is instant)
                    continue
                self.completed[rid] = time.monotonic()
                self.answering.discard(rid)
                latency = self.completed[rid] - started
                self.slowest = max(self.slowest, latency)
                self.answers.append(Answer(phase, latency, resp.status))
                self.statuses.append(resp.status)


def keyed_load(url: str, key: str, clients: int = 4, deadline: float = 5.0) -> Load:
    """Clients sending plain requests with ``key`` back to back on kept-alive
    connections; a request that hangs or fails fails the test."""
    return Load(
        url,
        clients,
        headers={"Authorization": f"Bearer {key}"},
        streams=False,
        fresh_connections=False,
        deadline=deadline,
        on_failure="raise",
    )
