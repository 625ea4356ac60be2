"""What the official OpenTelemetry SDK costs per request, for comparison with the
proxy's own recording (``python -m bench.inproc --tracing``; docs/observability.md).

``pip install opentelemetry-sdk && python -m bench.otel_sdk``

Not a dependency of the proxy: the SDK is what proxy/ops/tracing.py does *not* use. One
request's spans as the proxy records them (a SERVER span and one CLIENT span with the
same attributes, two events), made with the SDK's tracer under
``ParentBased(TraceIdRatioBased(ratio))`` and its ``BatchSpanProcessor`` with an
exporter that does nothing: so the figure is the SDK's span cost alone, before any
OTLP encoding or sending. Process CPU time (the batch thread's included) per request.
"""

from __future__ import annotations

import time

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

REQUESTS = 20_000


class _Nowhere(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def per_request(ratio: float) -> float:
    """CPU µs per request under the given sample ratio."""
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(ratio)))
    provider.add_span_processor(BatchSpanProcessor(_Nowhere(), max_queue_size=1 << 20))
    tracer = provider.get_tracer("morngpt.proxy")
    server_kind, client_kind = trace.SpanKind.SERVER, trace.SpanKind.CLIENT
    start = time.process_time()
    for i in range(REQUESTS):
        with tracer.start_as_current_span(
            "chat m",
            kind=server_kind,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.request.model": "m",
                "gen_ai.request.max_tokens": 50,
                "morngpt.key_id": "k1",
                "morngpt.request_id": f"req_{i}",
            },
        ) as server:
            with tracer.start_as_current_span(
                "chat m",
                kind=client_kind,
                attributes={
                    "server.address": "127.0.0.1",
                    "server.port": 9000,
                    "morngpt.deployment": "d1",
                    "morngpt.attempt": 1,
                    "gen_ai.request.model": "m",
                },
            ) as client:
                client.set_attribute("http.response.status_code", 200)
                client.set_attribute("gen_ai.response.model", "m")
            server.add_event("first_token")
            server.set_attributes(
                {
                    "gen_ai.usage.input_tokens": 12,
                    "gen_ai.usage.output_tokens": 8,
                    "http.response.status_code": 200,
                    "morngpt.overhead_ms": 0.3,
                }
            )
            server.add_event("end_of_stream")
    provider.shutdown()  # the batch thread's work is counted too
    return (time.process_time() - start) / REQUESTS * 1e6


def main() -> None:
    for name, ratio in (("sampled out", 0.0), ("sampled", 1.0)):
        print(f"OpenTelemetry SDK, {name}: {per_request(ratio):.1f} µs CPU per request")


if __name__ == "__main__":
    main()
