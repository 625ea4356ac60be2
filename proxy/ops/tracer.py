"""The tracer: a ``Trace`` started per request, and finished ones exported as
OpenTelemetry spans over OTLP/HTTP (protobuf) by one background thread. What is traced
and the invariants (nothing on the request path waits for the collector; sampling
decided twice) are in tracing.py's docstring."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import socket
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from random import getrandbits
from time import perf_counter, sleep
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from .. import __version__
from ..config.schema import Tracing
from ..errors import ClientDisconnected
from . import metrics
from .tracing import HEADER, OPERATIONS, PROVIDERS, TRACESTATE, Attempt, Trace, parse

if TYPE_CHECKING:
    from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

    from ..exchange import Exchange
    from ..http.upstream import Upstream

log = logging.getLogger("proxy.tracing")


class Tracer:
    """Starts a ``Trace`` for each request and, as a ``Sink``, queues finished
    requests whose spans are to be exported (see the module invariants)."""

    def __init__(self, config: Tracing) -> None:
        # New traces whose id's low 64 bits fall below this are sampled (as the
        # OpenTelemetry TraceIdRatioBased sampler decides).
        self.bound = int(config.sample_ratio * (1 << 64))
        # Requests sampled out but kept for their error: at most max_error_traces in
        # each second (``window`` ends at that perf_counter()).
        self.max_errors = config.max_error_traces
        self.errors = 0
        self.window = 0.0
        self.limit = config.queue_size
        self.batch = config.batch_size
        self.queue: deque[Exchange] = deque()
        self.exporter = _Exporter(config, self.queue)
        self.full = metrics.TRACE_SPANS_DROPPED.labels("queue_full")

    def start(self, headers: Mapping[str, str]) -> Trace:
        """The trace of a request with these headers (its parent: their traceparent)."""
        given = headers.get(HEADER)
        context = None if given is None else parse(given)
        if context is not None:
            trace_id, parent_id, sampled = context
            # A valid parent: only traceparent changes on the way upstream.
            return Trace(trace_id, parent_id, sampled, headers.get(TRACESTATE, ""), _PARENT_ONLY)
        # The low half of the trace id decides; the rest is drawn only when kept.
        low = getrandbits(64)
        if low >= self.bound:
            return Trace("", "", False, "", _NONE)
        bits = (getrandbits(64) << 64 | low) or 1
        drop = _BOTH if given is not None or TRACESTATE in headers else _NONE
        return Trace(f"{bits:032x}", "", True, "", drop)

    def record(self, exchange: Exchange) -> None:
        trace = exchange.trace
        if trace is None:
            return
        trace.ended = now = perf_counter()
        if not trace.sampled:
            if not has_failed(exchange, trace) or not self._may_keep_error(now):
                return
            trace.identify()
        queue = self.queue
        if len(queue) >= self.limit:
            self.full.inc(1 + len(trace.attempts))
            return
        queue.append(exchange)
        if len(queue) == self.batch:
            self.exporter.wake.set()

    def _may_keep_error(self, now: float) -> bool:
        if now >= self.window:
            self.window = now + 1.0
            self.errors = 0
        self.errors += 1
        return self.errors <= self.max_errors

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The exporter thread runs inside; at the end it sends what is queued (bounded
        by ``export_timeout``)."""
        self.exporter.thread.start()
        try:
            yield
        finally:
            await self.exporter.stop()


def has_failed(exchange: Exchange, trace: Trace) -> bool:
    """Whether a request's trace is kept whatever the sampling: it ended in a 5xx, an
    upstream attempt was retried or failed over, or its stream broke mid-way. A
    client's mistake (4xx) or its going away is not an error of the proxy's."""
    status = exchange.status
    if status >= 500 or len(trace.attempts) > 1:
        return True
    return exchange.error not in (None, ClientDisconnected) and status < 400


_NONE: frozenset[str] = frozenset()
_PARENT_ONLY = frozenset((HEADER,))
_BOTH = frozenset((HEADER, TRACESTATE))


class _Exporter:
    """The thread that turns queued requests into spans and POSTs them, a batch at a
    time, every ``export_interval`` (sooner when a batch is full)."""

    def __init__(self, config: Tracing, queue: deque[Exchange]) -> None:
        self.config = config
        self.queue = queue
        url = urlsplit(config.endpoint)
        self.https = url.scheme == "https"
        self.host = url.hostname or ""
        self.port = url.port
        self.target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self.where = f"{url.scheme}://{self.host}" + (f":{url.port}" if url.port else "")
        self.conn: http.client.HTTPConnection | None = None
        self.failing = False
        self.resource = Resource(
            attributes=[
                _kv("service.name", config.service_name),
                _kv("service.version", __version__),
                _kv("service.instance.id", f"{socket.gethostname()}:{os.getpid()}"),
                _kv("telemetry.sdk.name", "morngpt-proxy"),
                _kv("telemetry.sdk.language", "python"),
            ]
        )
        self.scope = InstrumentationScope(name="morngpt.proxy", version=__version__)
        self.templates: dict[tuple[str, ...], bytes] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="trace-export", daemon=True)
        self.exported = metrics.TRACE_SPANS_EXPORTED
        self.failed = metrics.TRACE_SPANS_DROPPED.labels("export_failed")

    async def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        # Bounded: a hung collector costs at most one export_timeout per batch.
        await asyncio.to_thread(self.thread.join, self.config.export_timeout + 1)
        if self.thread.is_alive():
            log.warning("trace export to %s did not finish; spans not sent are lost", self.where)

    def _run(self) -> None:
        while not self.stopping:
            self.wake.wait(self.config.export_interval)
            self.wake.clear()
            self._drain()
        self._drain()
        if self.conn is not None:
            self.conn.close()

    def _drain(self) -> None:
        """Export full batches while there are any, then what is left."""
        queue, size = self.queue, self.config.batch_size
        while queue:
            batch = [queue.popleft() for _ in range(min(size, len(queue)))]
            if not self._post(batch) and self.stopping:
                self._drop(queue)  # shutting down: no second wait on a failing collector
            if len(batch) < size:
                return

    def _drop(self, queue: deque[Exchange]) -> None:
        while queue:
            exchange = queue.popleft()
            assert exchange.trace is not None
            self.failed.inc(1 + len(exchange.trace.attempts))

    def encode(self, batch: list[Exchange]) -> tuple[bytes, int]:
        """The OTLP export request of a batch of finished requests, and its span count."""
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self.resource)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(self.scope)
        for i, exchange in enumerate(batch, 1):
            self.add_spans(scope_spans.spans, exchange)
            if not i % _SLICE:
                # Let the event loop have the GIL: a request that comes in meanwhile
                # waits at most one slice (~1 ms), not the whole batch (or 5 ms, the
                # interpreter's switch interval). A sleep(0) costs ~20 µs of CPU here,
                # so not much more often than that.
                sleep(0)
        return request.SerializeToString(), len(scope_spans.spans)

    def _post(self, batch: list[Exchange]) -> bool:
        body, count = self.encode(batch)
        try:
            conn = self.conn or self._connect()
            conn.request("POST", self.target, body, {"Content-Type": "application/x-protobuf"})
            response = conn.getresponse()
            response.read()
            if not 200 <= response.status < 300:
                raise http.client.HTTPException(f"HTTP {response.status}")
        except (OSError, http.client.HTTPException) as exc:
            with contextlib.suppress(Exception):
                if self.conn is not None:
                    self.conn.close()
            self.conn = None
            self.failed.inc(count)
            if not self.failing:
                self.failing = True
                log.warning(
                    "trace export to %s failed (%s); spans are dropped until it works",
                    self.where,
                    exc or type(exc).__name__,
                )
            return False
        self.exported.inc(count)
        if self.failing:
            self.failing = False
            log.warning("trace export to %s works again", self.where)
        return True

    def _connect(self) -> http.client.HTTPConnection:
        timeout = self.config.export_timeout
        if self.https:
            self.conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout)
        else:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        return self.conn

    def add_spans(self, spans: RepeatedCompositeFieldContainer[Span], exchange: Exchange) -> None:
        """Add the SERVER span of a finished request and a CLIENT span per attempt."""
        trace = exchange.trace
        assert trace is not None
        wall = int(exchange.started_at * 1e9)

        def at(moment: float) -> int:  # perf_counter() → Unix nanoseconds
            return wall + int((moment - exchange.started) * 1e9)

        operation = OPERATIONS.get(exchange.endpoint, exchange.endpoint)
        model = exchange.model[:200]  # client-chosen text: bounded
        usage = exchange.usage
        end = at(trace.ended)
        status = exchange.status
        error = exchange.error_name or (str(status) if status >= 500 else "")
        span = spans.add()
        span.MergeFromString(self._server_template(exchange.endpoint, operation, model))
        span.trace_id = trace_id = bytes.fromhex(trace.trace_id)
        span.span_id = server_id = bytes.fromhex(trace.span_id)
        if trace.parent_id:
            span.parent_span_id = bytes.fromhex(trace.parent_id)
        span.trace_state = trace.state
        span.start_time_unix_nano = wall
        span.end_time_unix_nano = end
        overhead = (trace.ended - exchange.started - exchange.upstream_time) * 1000
        _add(
            span,
            ("gen_ai.request.max_tokens", trace.max_tokens),
            ("gen_ai.usage.input_tokens", usage.prompt_tokens if usage else None),
            ("gen_ai.usage.output_tokens", usage.completion_tokens if usage else None),
            ("http.response.status_code", status or None),
            ("error.type", error or None),
            ("morngpt.key_id", exchange.key_id),
            ("morngpt.team_id", exchange.team_id),
            ("morngpt.deployment", exchange.deployment or None),
            ("morngpt.attempts", exchange.attempts),
            ("morngpt.stream", exchange.stream),
            ("morngpt.usage_estimated", exchange.estimated or None),
        )
        _put(span.attributes, "morngpt.request_id", exchange.request_id)
        _put(span.attributes, "morngpt.overhead_ms", round(overhead, 3))
        if exchange.stream and exchange.first_byte is not None:
            span.events.add(time_unix_nano=at(exchange.first_byte), name="first_token")
            event = span.events.add(time_unix_nano=end, name="end_of_stream")
            _put(event.attributes, "morngpt.events", exchange.events)
        if status >= 500 or exchange.error not in (None, ClientDisconnected):
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = error
        last = len(trace.attempts)
        for number, attempt in enumerate(trace.attempts, 1):
            span = spans.add()
            self._fill_client_span(span, exchange, attempt, number, number == last, operation)
            span.trace_id = trace_id
            span.parent_span_id = server_id
            span.trace_state = trace.state
            # The answer the client gets is relayed until the request ends.
            ended = trace.ended if number == last and not attempt.error else attempt.end
            span.start_time_unix_nano = at(attempt.start)
            span.end_time_unix_nano = at(ended or trace.ended)

    def _fill_client_span(
        self,
        span: Span,
        exchange: Exchange,
        attempt: Attempt,
        number: int,
        final: bool,
        operation: str,
    ) -> None:
        upstream = attempt.upstream
        model = (upstream.model or exchange.model)[:200]
        status = attempt.status
        error = attempt.error or (str(status) if status >= 400 else "")
        usage = None
        if final and not attempt.error:
            if exchange.error not in (None, ClientDisconnected):
                error = exchange.error_name  # the answer broke after its headers
            usage = exchange.usage
        answered = final and not error and status < 400
        span.MergeFromString(self._client_template(upstream, operation, model))
        span.span_id = bytes.fromhex(attempt.span_id)
        _add(
            span,
            # The model the answer names; else the one the proxy asked the deployment for.
            ("gen_ai.response.model", ((usage and usage.model) or model) if answered else None),
            ("gen_ai.usage.input_tokens", usage.prompt_tokens if usage else None),
            ("gen_ai.usage.output_tokens", usage.completion_tokens if usage else None),
            ("http.response.status_code", status or None),
            ("error.type", error or None),
            ("morngpt.attempt", number),
        )
        if error:
            span.status.code = Status.STATUS_CODE_ERROR
            span.status.message = error

    # Templates: what a span's kind, name and constant attributes are for one
    # endpoint and model (server) or deployment and model (client), serialized once;
    # each span merges its template and adds the rest (~3x cheaper than building all).

    def _server_template(self, endpoint: str, operation: str, model: str) -> bytes:
        return self._template(
            ("server", endpoint, model),
            Span.SPAN_KIND_SERVER,
            f"{operation} {model}",
            lambda: (
                ("gen_ai.operation.name", operation),
                ("gen_ai.request.model", model),
                ("http.request.method", "POST"),
                ("url.path", f"/v1/{endpoint}"[:200]),
            ),
        )

    def _client_template(self, upstream: Upstream, operation: str, model: str) -> bytes:
        def attributes() -> tuple[tuple[str, Value], ...]:
            url = urlsplit(upstream.base)
            return (
                ("gen_ai.operation.name", operation),
                ("gen_ai.provider.name", PROVIDERS[upstream.deployment.kind]),
                ("gen_ai.request.model", model),
                ("server.address", url.hostname or ""),
                ("server.port", url.port or (443 if url.scheme == "https" else 80)),
                ("http.request.method", "POST"),
                ("morngpt.deployment", upstream.name),
            )

        key = ("client", upstream.name, upstream.base, operation, model)
        return self._template(key, Span.SPAN_KIND_CLIENT, f"{operation} {model}", attributes)

    def _template(
        self,
        key: tuple[str, ...],
        kind: Span.SpanKind.ValueType,
        name: str,
        attributes: Callable[[], tuple[tuple[str, Value], ...]],
    ) -> bytes:
        template = self.templates.get(key)
        if template is None:
            if len(self.templates) >= _TEMPLATES:  # model names are the client's: bounded
                self.templates.clear()
            span = Span(name=name, kind=kind, attributes=_attributes(*attributes()))
            template = self.templates[key] = span.SerializeToString()
        return template


_TEMPLATES = 4096
# Requests whose spans the exporter builds before it yields the GIL (see encode).
_SLICE = 64
Value = str | int | float | bool | None


def _kv(key: str, value: Value) -> KeyValue:
    if isinstance(value, bool):  # before int: a bool is an int
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _attributes(*pairs: tuple[str, Value]) -> list[KeyValue]:
    """Span attributes; a None value leaves its attribute out."""
    return [_kv(key, value) for key, value in pairs if value is not None]


def _add(span: Span, *pairs: tuple[str, Value]) -> None:
    """Add span attributes; a None value leaves its attribute out. Each (key, value)
    is serialized once as a fragment of a Span and kept; the span merges them all in
    one parse (serialized messages concatenated merge, repeated fields appending):
    ~3x cheaper than adding each attribute. Only for values of few distinct kinds
    (names, counts, statuses): the cache is cleared when it grows past a bound."""
    parts = []
    for key, value in pairs:
        if value is None:
            continue
        part = _FRAGMENTS.get((key, value))
        if part is None:
            if len(_FRAGMENTS) >= _MAX_FRAGMENTS:
                _FRAGMENTS.clear()
            part = _FRAGMENTS[key, value] = Span(attributes=[_kv(key, value)]).SerializeToString()
        parts.append(part)
    span.MergeFromString(b"".join(parts))


_FRAGMENTS: dict[tuple[str, Value], bytes] = {}
_MAX_FRAGMENTS = 8192


def _put(attributes: RepeatedCompositeFieldContainer[KeyValue], key: str, value: Value) -> None:
    """Add one attribute whose values seldom repeat (request ids, durations)."""
    slot = attributes.add(key=key).value
    if isinstance(value, bool):  # before int: a bool is an int
        slot.bool_value = value
    elif isinstance(value, int):
        slot.int_value = value
    elif isinstance(value, float):
        slot.double_value = value
    else:
        slot.string_value = str(value)
