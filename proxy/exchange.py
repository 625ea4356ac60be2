"""One proxied request's facts, and the two seams the rest of the product plugs into.

The handler fills an ``Exchange`` as the request goes: who asked (``admit``), which
deployment served it, when the first byte came, how it ended and the token usage. Two
seams see it:

- ``Gate.authenticate`` runs on the headers before the body is read; ``Gate.admit``
  runs before anything goes upstream (model permission, rate limits, budgets). Each
  raises a ``ProxyError`` to refuse; ``admit`` returns a ``Grant`` whose headers
  go on the response and whose ``settle`` runs once the exchange is over (reconcile
  token buckets, release concurrency slots).
- ``Sink.record`` receives every finished exchange (usage ledger, metrics, access log).
  It is synchronous and must not block: it runs in ``finally``, even when the client
  vanished and the handler is being cancelled.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from os import register_at_fork, urandom
from time import perf_counter, time
from typing import TYPE_CHECKING, Final, Protocol

from .errors import outcome_of
from .http.wire import RequestView, Usage

if TYPE_CHECKING:
    from .ops.tracing import Trace

# This process's random half of ``unique_hex``: 64 bits, so that no two processes
# (workers, replicas, restarts) share one in practice.
_PROCESS = urandom(8).hex()
_serial: Final = itertools.count()
_TOP: Final = 1 << 64  # hex() of a counter below it with this bit set: "0x1" and 16 digits


def _reseed() -> None:
    global _PROCESS
    _PROCESS = urandom(8).hex()


register_at_fork(after_in_child=_reseed)  # a forked child must not repeat its parent


def made_request_id(uid: str) -> str:
    """The request id the proxy makes for the exchange with ``uid`` (when the client
    sent none): the usage ledger on PostgreSQL relies on the form (store.py)."""
    return "req_" + uid


def unique_hex() -> str:
    """32 hex digits no other call of any process returns: the process's random half,
    then a counter. No system call per request (os.urandom costs ~2 µs)."""
    return _PROCESS + hex(_TOP | next(_serial))[3:]  # a format spec costs twice as much


class Exchange:
    """Mutable record of one request, filled in as it is served."""

    __slots__ = (
        "attempts",
        "body_bytes",
        "cost",
        "deployment",
        "endpoint",
        "error",
        "estimated",
        "events",
        "first_byte",
        "key_id",
        "model",
        "request_id",
        "started",
        "started_at",
        "status",
        "stream",
        "team_id",
        "trace",
        "uid",
        "upstream_time",
        "usage",
    )

    def __init__(self, request_id: str | None, endpoint: str) -> None:
        # Unique per exchange, unlike request_id (a client may send and reuse its own):
        # the usage ledger's idempotency key (32 hex digits, a valid uuid).
        self.uid = uid = unique_hex()
        # The client's, else made from the uid (PostgreSQL's ledger then stores none).
        self.request_id = request_id or made_request_id(uid)
        self.endpoint = endpoint
        self.started = perf_counter()
        self.started_at = time()
        self.model = ""
        self.deployment = ""
        # Upstream requests sent for this exchange (retries and failovers included).
        self.attempts = 0
        self.key_id: str | None = None
        self.team_id: str | None = None  # the key's team, when it has one
        self.stream = False
        self.status = 0
        # perf_counter() when the first byte of the answer went to the client: the
        # first stream event for streams, the response headers otherwise.
        self.first_byte: float | None = None
        # Seconds spent waiting on the upstream (headers and body, every attempt and the
        # backoff between them), for overhead.
        self.upstream_time = 0.0
        self.usage: Usage | None = None
        # True when usage was not reported by the upstream (cut stream, client gone).
        self.estimated = False
        # How it failed: an error class (errors.py: ``UpstreamTimeout``,
        # ``ClientDisconnected``...; any class for an unexpected exception), or None.
        self.error: type[BaseException] | None = None
        # Size of the request body and data events relayed to the client: what the
        # usage ledger estimates tokens from when the upstream never reported usage.
        self.body_bytes = 0
        self.events = 0
        # What the exchange cost, in nano-units of the price unit (pricing.py), set when
        # it is over, before the grant settles and the sinks record it.
        self.cost = 0
        # The request's trace when tracing.endpoint is set (tracing.py), else None.
        self.trace: Trace | None = None

    @property
    def error_name(self) -> str:
        """``error`` as the access log, the usage ledger and traces write it ("" for none)."""
        return "" if self.error is None else outcome_of(self.error)

    @property
    def duration(self) -> float:
        return perf_counter() - self.started

    @property
    def ttft(self) -> float | None:
        return None if self.first_byte is None else self.first_byte - self.started

    def overhead_ms(self) -> str:
        """The proxy's own time so far (elapsed minus upstream waits), in milliseconds
        with 3 decimals: the value of the ``OVERHEAD_HEADER`` response header."""
        return millis(perf_counter() - self.started - self.upstream_time)


def millis(seconds: float) -> str:
    """``seconds`` in milliseconds with 3 decimals, as ``f"{ms:.3f}"`` writes them but
    for how a half is rounded: the whole, then 3 digits (3,068 instructions a call
    with a float's format spec, 1,746 so; callgrind)."""
    us = int(seconds * 1_000_000 + 0.5)
    if us < 0:  # (a clock that went back: as it is)
        return f"{seconds * 1000:.3f}"
    return f"{us // 1000}.{str(1000 + us % 1000)[1:]}"


# On every proxied response (and the proxy's own error answers), for load tests.
OVERHEAD_HEADER: Final = "X-Proxy-Overhead-Ms"


class Caller(Protocol):
    """Who is asking, as ``Gate.authenticate`` found from the headers alone."""

    @property
    def id(self) -> str | None: ...

    @property
    def allowed_models(self) -> frozenset[str] | None:
        """The model names this caller may use; None means all of them."""
        ...

    @property
    def team_id(self) -> str | None:
        """The team the caller belongs to (None: none)."""
        ...


class Anonymous:
    """The caller when nobody is checked (``OpenGate``)."""

    id = None
    allowed_models = None
    team_id = None


ANONYMOUS: Final = Anonymous()


def may_use(caller: Caller, model: str) -> bool:
    models = caller.allowed_models
    return models is None or model in models


class Grant(Protocol):
    """What ``Gate.admit`` hands back: response headers and a settle-once callback."""

    @property
    def headers(self) -> Mapping[str, str]: ...

    def settle(self, exchange: Exchange) -> None:
        """Called exactly once when the exchange is over, on every path."""


class OpenGrant:
    """The grant of a request that nothing limits: no headers, nothing to settle."""

    __slots__ = ("headers",)

    def __init__(self) -> None:
        self.headers: Mapping[str, str] = {}

    def settle(self, exchange: Exchange) -> None:
        pass


OPEN: Final[Grant] = OpenGrant()


class Gate(Protocol):
    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        """Who is asking, from the headers only: runs before the body is read, so a
        caller without a valid key costs no body read. Raises ``Unauthorized``."""
        ...

    async def admit(self, caller: Caller, view: RequestView, exchange: Exchange) -> Grant:
        """May ``caller`` send this request now (model permission, limits)? Raises a
        ``ProxyError`` to refuse."""
        ...


class Sink(Protocol):
    def record(self, exchange: Exchange) -> None: ...


class OpenGate:
    """Lets everyone in: no keys, no limits (the quick-start default)."""

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        return ANONYMOUS

    async def admit(self, caller: Caller, view: RequestView, exchange: Exchange) -> Grant:
        return OPEN


class Sinks:
    """Fans one finished exchange out to every registered sink."""

    __slots__ = ("sinks",)

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self.sinks: list[Sink] = list(sinks)

    def add(self, sink: Sink) -> None:
        """One more listener (tests and benchmarks count or keep exchanges this way)."""
        self.sinks.append(sink)

    def record(self, exchange: Exchange) -> None:
        for sink in self.sinks:
            sink.record(exchange)
