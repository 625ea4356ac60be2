"""What operators see: ``metrics`` (every Prometheus metric) and ``metrics_sink`` (the
sink that records finished requests), ``tracing`` and ``tracer`` (W3C trace context,
OpenTelemetry spans), ``accesslog``, ``endpoints`` (``/metrics`` and the ops token) and
``redact`` (log records reduced before they are formatted)."""
