"""Streaming fidelity probes: time to first event, gaps between events, and how many
paced streams can run at once without a stall.

The client is a bare asyncio ``Protocol`` (one connection per stream, ``Connection:
close``): it notes when bytes holding SSE ``data:`` lines arrive and counts them, and
that is all it does, so thousands of concurrent streams cost it little CPU and what it
measures is the server's timing, not its own. A *stall* is a gap between two arrivals
longer than twice the upstream's own pause between events (the issue's definition).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import cast
from urllib.parse import urlsplit

_EVENT = b"data:"
_DONE = b"[DONE]"


@dataclass
class Trace:
    """What one stream looked like from the client."""

    sent: float = 0.0
    arrivals: list[float] = field(default_factory=list)
    events: int = 0
    status_ok: bool = False
    done: bool = False

    @property
    def ttft(self) -> float | None:
        return self.arrivals[0] - self.sent if self.arrivals else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.arrivals)]


class _Probe(asyncio.Protocol):
    def __init__(self, request: bytes, finished: asyncio.Future[Trace]) -> None:
        self.request = request
        self.finished = finished
        self.trace = Trace()
        self.tail = b""  # the last bytes of the previous read: markers may straddle reads
        self.head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.trace.sent = perf_counter()
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        now = perf_counter()
        if self.head:
            self.trace.status_ok = data.startswith(b"HTTP/1.1 200")
            self.head = False
        seen = self.tail + data
        count = seen.count(_EVENT)
        if count:
            self.trace.arrivals.append(now)
            self.trace.events += count
        if _DONE in seen:
            self.trace.done = True
        self.tail = data[-5:]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_result(self.trace)


@dataclass(frozen=True)
class Target:
    """Where streams go: host, port and the ``/v1`` path prefix of a base URL."""

    host: str
    port: int
    prefix: str
    key: str

    @classmethod
    def of(cls, base_url: str, key: str) -> Target:
        parts = urlsplit(base_url)
        assert parts.hostname is not None
        assert parts.port is not None
        return cls(parts.hostname, parts.port, parts.path.rstrip("/"), key)

    def request(self, body: bytes, chunks: int, gap_ms: float) -> bytes:
        head = (
            f"POST {self.prefix}/chat/completions HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            "Content-Type: application/json\r\n"
            f"Authorization: Bearer {self.key}\r\n"
            f"x-fake-chunks: {chunks}\r\n"
            f"x-fake-gap-ms: {gap_ms:g}\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return head.encode() + body


async def stream(target: Target, request: bytes, timeout: float = 30.0) -> Trace:  # noqa: ASYNC109
    """Run one stream to its end (or until ``timeout``) and return its trace."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[Trace] = loop.create_future()
    transport, probe = await loop.create_connection(
        lambda: _Probe(request, finished), target.host, target.port
    )
    try:
        async with asyncio.timeout(timeout):
            return await finished
    except TimeoutError:
        return probe.trace
    finally:
        transport.close()


async def sequential(target: Target, request: bytes, count: int) -> list[Trace]:
    """``count`` streams one after another (for time to first event at concurrency 1)."""
    return [await stream(target, request) for _ in range(count)]


async def concurrent(target: Target, request: bytes, count: int, ramp: float) -> list[Trace]:
    """``count`` streams at once, their starts spread evenly over ``ramp`` seconds (a
    thousand connects in the same millisecond would measure the accept queue)."""

    async def one(i: int) -> Trace:
        await asyncio.sleep(ramp * i / count)
        try:
            return await stream(target, request)
        except OSError:
            return Trace()  # refused or reset: counted as a broken stream

    return list(await asyncio.gather(*(one(i) for i in range(count))))


@dataclass(frozen=True)
class Fidelity:
    """Summary of a set of streams; times in milliseconds."""

    streams: int
    broken: int
    stalled: int
    ttft_p50: float
    ttft_p99: float
    gap_p50: float
    gap_p99: float
    gap_max: float

    @classmethod
    def of(cls, traces: Sequence[Trace], expected_events: int, gap_ms: float) -> Fidelity:
        ok = [t for t in traces if t.status_ok and t.done and t.events == expected_events]
        ttfts = [t.ttft * 1000 for t in ok if t.ttft is not None]
        gaps = [g * 1000 for t in ok for g in t.gaps()]
        stall = 2 * gap_ms
        stalled = sum(1 for t in ok if any(g * 1000 > stall for g in t.gaps())) if gap_ms else 0
        return cls(
            streams=len(traces),
            broken=len(traces) - len(ok),
            stalled=stalled,
            ttft_p50=percentile(ttfts, 50),
            ttft_p99=percentile(ttfts, 99),
            gap_p50=percentile(gaps, 50),
            gap_p99=percentile(gaps, 99),
            gap_max=max(gaps, default=float("nan")),
        )

    @property
    def clean(self) -> bool:
        """Every stream complete and none stalled."""
        return self.broken == 0 and self.stalled == 0


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
