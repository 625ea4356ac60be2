"""Traces: W3C Trace Context (https://www.w3.org/TR/trace-context/) at the proxy's
edge, and OpenTelemetry spans sent over OTLP/HTTP (protobuf) to Jaeger or any
OpenTelemetry collector.

Without ``tracing.endpoint`` a client's ``traceparent`` and ``tracestate`` go
upstream unchanged, like any other end-to-end header; with ``server.tracing`` on, a
request that arrives without a ``traceparent`` gets a new one (``trace_context``).

With ``tracing.endpoint`` the proxy is a participant in the trace: each request is a
SERVER span (its parent the client's ``traceparent``, when valid) and each upstream
attempt a CLIENT span under it, whose context goes upstream in ``traceparent`` (a
request sampled out at the start passes the client's context through as it came). Span
attributes follow the OpenTelemetry GenAI and HTTP semantic conventions, plus the
proxy's own under ``morngpt.`` (docs/observability.md lists them).

Invariants:
- The request path records plain values only: a ``Trace`` per request (ids, the
  sampling decision, one ``Attempt`` per upstream attempt); the ``Exchange`` holds
  the rest. Spans are built as protobuf (opentelemetry-proto) and sent by the
  exporter thread. (The OpenTelemetry SDK costs ~14 µs per request sampled out and
  ~63 µs sampled, before any export: bench/otel_sdk.py, docs/observability.md.)
- Nothing on the request path waits for the collector: a finished request goes into
  a bounded deque; when it is full its spans are dropped and counted
  (``morngpt_trace_spans_dropped_total{reason="queue_full"}``). A batch the collector
  refuses, fails or does not answer within ``export_timeout`` is dropped and counted
  (``reason="export_failed"``); the thread is the only one that ever waits.
- Sampling is decided twice: at the start, parent-based (a client's sampled flag
  decides for its trace) or else by ``sample_ratio`` on the trace id; at the end, a
  request with an error (a 5xx, a retried or failed-over attempt, a stream broken
  mid-way) is exported whatever the first decision was, up to ``max_error_traces``
  a second (an error storm must not make the exporter the bottleneck). A request
  sampled out at the start draws no ids unless it is kept at the end.
- Never a key or a header value in a span: the key *id*, names and numbers only.
"""

from __future__ import annotations

import logging
import os
import re
from random import getrandbits
from time import perf_counter
from typing import TYPE_CHECKING

from multidict import CIMultiDictProxy, istr

if TYPE_CHECKING:
    from ..http.upstream import Upstream
    from ..http.wire import RequestView

log = logging.getLogger("proxy.tracing")

# istr: looked up in every request's headers without lowering them again
HEADER: str = istr("traceparent")
TRACESTATE: str = istr("tracestate")
_PARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
# gen_ai.provider.name per deployment kind.
PROVIDERS = {"openai": "openai", "azure": "azure.ai.openai"}
# gen_ai.operation.name per endpoint (GenAI semantic conventions' well-known values).
OPERATIONS = {
    "chat/completions": "chat",
    "responses": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
}


def new_traceparent() -> str:
    """A fresh ``traceparent``: version 00, random trace and parent ids, sampled."""
    return f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"


def trace_context(headers: CIMultiDictProxy[str], ensure: bool) -> list[tuple[str, str]]:
    """The client's ``traceparent`` and ``tracestate`` headers, which go upstream per
    request beside the kept block (``Upstream.block`` leaves them out). With
    ``ensure``, a client that sent no ``traceparent`` gets a new one (its
    ``tracestate`` alone means nothing, so it goes)."""
    parents = headers.getall(HEADER, ())
    if not parents and ensure:
        return [(HEADER, new_traceparent())]
    states = headers.getall(TRACESTATE, ())
    if not parents and not states:  # most requests: no list built (called per request)
        return []
    return [(HEADER, v) for v in parents] + [(TRACESTATE, v) for v in states]


def parse(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``, else None."""
    match = _PARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or not int(trace_id, 16):
        return None
    if not int(parent_id, 16):
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def _span_id() -> str:
    return f"{getrandbits(64) or 1:016x}"


class Attempt:
    """One upstream attempt: a CLIENT span. It ends when its response headers came
    or it failed; the attempt whose answer the client gets ends with the request."""

    __slots__ = ("end", "error", "span_id", "start", "status", "upstream")

    def __init__(self, span_id: str, upstream: Upstream) -> None:
        self.span_id = span_id
        self.upstream = upstream
        self.start = perf_counter()
        self.end = 0.0
        self.status = 0
        self.error = ""


class Trace:
    """One request's trace context and what its spans need beyond the ``Exchange``."""

    __slots__ = (
        "attempts",
        "drop",
        "ended",
        "max_tokens",
        "parent_id",
        "sampled",
        "span_id",
        "state",
        "trace_id",
    )

    def __init__(
        self, trace_id: str, parent_id: str, sampled: bool, state: str, drop: frozenset[str]
    ) -> None:
        # Ids are made when first needed: at the start for a sampled request (they go
        # upstream), at the end for one kept for its error (``identify``); a request
        # sampled out and kept by no error never costs one. "" until then.
        self.trace_id = trace_id
        self.span_id = _span_id() if sampled else ""  # the request's SERVER span
        self.parent_id = parent_id  # "" for a trace this request started
        self.sampled = sampled  # the decision at the start (see module invariants)
        self.state = state  # the client's tracestate, kept on the spans
        self.drop = drop  # trace headers of the client's that must not go upstream
        self.attempts: list[Attempt] = []
        self.max_tokens: int | None = None
        self.ended = 0.0  # perf_counter() when the request was over

    def asked(self, view: RequestView) -> None:
        """Note what the request body asked for (``gen_ai.request.max_tokens``)."""
        for limit in (view.max_tokens, view.max_completion_tokens, view.max_output_tokens):
            if limit is not None:
                self.max_tokens = limit
                return

    def attempt(self, upstream: Upstream, headers: list[tuple[str, str]]) -> None:
        if not self.sampled:
            # Not recording: the client's trace context (if any) goes upstream as it
            # came, sampled flag and all, as through a proxy that does not trace.
            self.attempts.append(Attempt("", upstream))
            return
        span_id = _span_id()
        self.attempts.append(Attempt(span_id, upstream))
        if self.drop:
            headers[:] = [(k, v) for k, v in headers if k.lower() not in self.drop]
        headers.append((HEADER, f"00-{self.trace_id}-{span_id}-01"))

    def attempt_ended(self, outcome: int | BaseException) -> None:
        """The attempt last started got response headers with status ``outcome``, or
        failed with it (an exception)."""
        if not self.attempts:
            return
        attempt = self.attempts[-1]
        attempt.end = perf_counter()
        if isinstance(outcome, int):
            attempt.status = outcome
        else:
            attempt.error = type(outcome).__name__

    def identify(self) -> None:
        """Give a request sampled out at the start, and kept for its error, the ids
        its spans need."""
        if not self.trace_id:
            self.trace_id = f"{getrandbits(128) or 1:032x}"
        self.span_id = _span_id()
        for attempt in self.attempts:
            attempt.span_id = _span_id()
