"""Every Prometheus metric the proxy exports (the sink that records finished requests
is metrics_sink.py).

All metric objects live here, under the ``morngpt_`` prefix, so the other parts of the
proxy only import and update them; each says who updates it. Labels stay
low-cardinality: configured model and deployment names, status class, stream flag,
small fixed sets of kinds — never an API key, key id or request id.

Invariants:
- Multi-worker aggregation uses prometheus-client's multiprocess mode. It is chosen
  when ``prometheus_client`` is first imported, by ``PROMETHEUS_MULTIPROC_DIR``: the
  supervising parent sets it (``shared_dir``) before it spawns the workers, and each
  worker imports this module fresh (multiprocessing "spawn"). A single worker runs in
  plain single-process mode. ``MULTIPROCESS`` records which one this process is in.
- Every gauge names its multiprocess aggregation explicitly; ``live*`` modes drop a
  dead worker's series once the parent calls ``forget_worker``.
- ``MetricsSink.record`` is on the request path: label children are cached per label
  set, and it only adds to plain numbers; ``MetricsSink.fold`` moves them into the
  metrics every ``FOLD_SECONDS`` and before each scrape (see its docstring).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric

from ..config.schema import Config
from ..errors import (
    ProxyError,
)

ENV = "PROMETHEUS_MULTIPROC_DIR"
MULTIPROCESS = ENV in os.environ
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Buckets for LLM traffic: a cached embedding answers in milliseconds, a long
# generation streams for minutes. 2 s is an edge because the p95 SLO is "under 2 s".
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
# The proxy's own time: tens of microseconds when all is well.
OVERHEAD_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1
)  # fmt: skip

# --- Requests (updated by MetricsSink from every finished exchange) -----------------

REQUESTS = Counter(
    "morngpt_requests_total",
    "Proxied requests, by outcome.",
    ("model", "deployment", "status_class", "stream"),
)
REQUEST_DURATION = Histogram(
    "morngpt_request_duration_seconds",
    "Time from request received to response complete (streams: until the last event).",
    ("model", "deployment", "stream"),
    buckets=LATENCY_BUCKETS,
)
TTFT = Histogram(
    "morngpt_time_to_first_token_seconds",
    "Time from request received to the first byte of the answer sent to the client.",
    ("model", "deployment", "stream"),
    buckets=TTFT_BUCKETS,
)
OVERHEAD = Histogram(
    "morngpt_proxy_overhead_seconds",
    "Time spent in the proxy itself: request duration minus time waiting on the upstream.",
    ("stream",),
    buckets=OVERHEAD_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "morngpt_upstream_duration_seconds",
    "Time spent waiting on the upstream (headers and body) per request sent to it.",
    ("deployment",),
    buckets=LATENCY_BUCKETS,
)
TOKENS = Counter(
    "morngpt_tokens_total",
    "Tokens the upstreams reported, by kind (prompt, completion).",
    ("model", "deployment", "kind"),
)
# MetricsSink counts the final outcome of each exchange; failover calls
# ``count_upstream_error`` for each failed attempt it retried (not the final one).
UPSTREAM_ERRORS = Counter(
    "morngpt_upstream_errors_total",
    "Failed upstream attempts, by kind (timeout, unavailable, broken, protocol, "
    "stream_error, http_5xx, http_429).",
    ("deployment", "kind"),
)
# Set from the worker's in-flight count (state.Traffic.publish): at each scrape of
# the worker and twice a second.
INFLIGHT = Gauge(
    "morngpt_inflight_requests",
    "Proxied requests being served now.",
    multiprocess_mode="livesum",
)
# Updated by MetricsSink; one series per live worker (label pid when there are
# several), to show every worker serves and how evenly SO_REUSEPORT spreads load.
WORKER_REQUESTS = Gauge(
    "morngpt_worker_requests",
    "Requests finished by this worker process since it started.",
    multiprocess_mode="liveall",
)

# --- Deployments (set by their owner, health.DeploymentState, from its creation) ----

DEPLOYMENT_HEALTHY = Gauge(
    "morngpt_deployment_healthy",
    "1 if the deployment is in rotation, 0 while passive health has it out (the "
    "minimum over workers: 0 as soon as one worker took it out).",
    ("model", "deployment"),
    multiprocess_mode="livemin",
)
DEPLOYMENT_INFLIGHT = Gauge(
    "morngpt_deployment_inflight",
    "Requests in flight to the deployment.",
    ("model", "deployment"),
    multiprocess_mode="livesum",
)

# --- Keys and limits (#4) -------------------------------------------------------------

# "parallel": the key's max parallel requests were all in flight.
RATELIMIT_KINDS = ("requests", "tokens", "parallel")
RATELIMITED = Counter(
    "morngpt_ratelimited_requests_total",
    "Requests refused with 429, by the limit that refused them (requests, tokens, parallel).",
    ("kind",),
)
# Exactly one backend is 1 in each worker; set it with ``set_limiter_backend``.
# "local" means the in-process fallback while the configured Redis is unreachable;
# "memory" means no Redis is configured (the embedded default, not an incident).
LIMITER_BACKENDS = ("redis", "local", "memory")
LIMITER_BACKEND = Gauge(
    "morngpt_limiter_backend",
    "1 for the rate-limit backend in use (redis; local = fallback while Redis is "
    "unreachable; memory = no Redis configured).",
    ("backend",),
    multiprocess_mode="livemax",
)

# What each bucket.lua call the limiter made was for (ratelimit/shared.py): a request's
# admission, a lease for a key's next requests, or a settlement (slot release, token
# debt, budget, lease given back). Per second, ÷ requests: Redis calls per request.
LIMITER_CALLS = ("admission", "lease", "settlement")
LIMITER_REDIS_CALLS = Counter(
    "morngpt_limiter_redis_calls_total",
    "Rate limiter calls to Redis (bucket.lua), by what they were for "
    "(admission, lease, settlement).",
    ("call",),
)

# --- Cost and budgets (#10) -----------------------------------------------------------

COST = Counter(
    "morngpt_cost_total",
    "What requests cost, in the unit of the configured prices (the ledger holds the "
    "exact amounts; this counter is a float).",
    ("model",),
)
BUDGET_REJECTIONS = Counter(
    "morngpt_budget_rejections_total",
    "Requests refused with 429 insufficient_quota: the key's budget could not take "
    "their worst-case cost.",
)
BUDGET_ALERTS = Counter(
    "morngpt_budget_alerts_total",
    "Keys that passed limits.budget_alert_share of their budget (once per key, period "
    "and worker; the key id is in the proxy.budget log line).",
)

# --- Usage ledger (#5) ----------------------------------------------------------------

USAGE_QUEUE_DEPTH = Gauge(
    "morngpt_usage_queue_depth",
    "Usage records waiting in memory for the batch writer.",
    multiprocess_mode="livesum",
)
USAGE_SPOOLED = Gauge(
    "morngpt_usage_spooled_records",
    "Usage records in the local spool file, waiting for the database to come back.",
    multiprocess_mode="livesum",
)
USAGE_WRITTEN = Counter(
    "morngpt_usage_written_records_total",
    "Usage records written to the database.",
)
USAGE_REJECTED = Counter(
    "morngpt_usage_rejected_records_total",
    "Usage records the database refused for their data, set aside in the dead-letter file.",
)
USAGE_DROPPED = Counter(
    "morngpt_usage_dropped_records_total",
    "Usage records lost (queue and spool full, or unwritable).",
)

# --- Traces (updated by the trace exporter, proxy/ops/tracing.py) ------------------------

TRACE_SPANS_EXPORTED = Counter(
    "morngpt_trace_spans_exported_total",
    "Spans the OTLP collector accepted.",
)
# queue_full: the export queue was full when the request ended (the collector is slow
# or down); export_failed: the collector refused the batch, failed, or did not answer.
TRACE_DROP_REASONS = ("queue_full", "export_failed")
TRACE_SPANS_DROPPED = Counter(
    "morngpt_trace_spans_dropped_total",
    "Spans that were to be exported but were dropped, by reason.",
    ("reason",),
)


def upstream_error_kind(error: type[BaseException] | None, status: int) -> str | None:
    """The ``morngpt_upstream_errors_total`` kind for an attempt's outcome, if it failed
    because of the upstream: the error class's ``upstream_kind`` (errors.py), or for
    an answer without one, by the upstream's HTTP ``status``."""
    if error is not None:
        return error.upstream_kind if issubclass(error, ProxyError) else None
    if status >= 500:
        return "http_5xx"
    if status == 429:
        return "http_429"
    return None


def count_upstream_error(
    deployment: str, error: type[BaseException] | None, status: int = 0
) -> None:
    """Count one failed upstream attempt (routing calls this for attempts it retried)."""
    kind = upstream_error_kind(error, status)
    if kind is not None:
        UPSTREAM_ERRORS.labels(deployment, kind).inc()


def set_limiter_backend(backend: str) -> None:
    """Mark ``backend`` (one of ``LIMITER_BACKENDS``) as the one in use in this worker."""
    for name in LIMITER_BACKENDS:
        LIMITER_BACKEND.labels(name).set(1 if name == backend else 0)


def declare(config: Config) -> None:
    """Start the series that other issues' events update, so dashboards and alerts see
    them (at their resting values) before the first event: no request rate-limited, no
    limiter backend chosen yet. (Deployment series start with their state.)"""
    for model in config.models:
        COST.labels(model.name)
    for kind in RATELIMIT_KINDS:
        RATELIMITED.labels(kind)
    for backend in LIMITER_BACKENDS:
        LIMITER_BACKEND.labels(backend)
    for call in LIMITER_CALLS:
        LIMITER_REDIS_CALLS.labels(call)
    for reason in TRACE_DROP_REASONS:
        TRACE_SPANS_DROPPED.labels(reason)


# --- Exposition -------------------------------------------------------------------------


def _registry() -> CollectorRegistry:
    if not MULTIPROCESS:
        return REGISTRY
    registry = CollectorRegistry()
    # Reads every worker's files at each scrape. (prometheus_client leaves it untyped.)
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


_SCRAPE_REGISTRY = _registry()


def families() -> list[Metric]:
    """Every worker's metrics as metric families. Reads files in multiprocess mode: run
    it off the event loop."""
    return list(_SCRAPE_REGISTRY.collect())


def scrape() -> bytes:
    """The metrics of every worker in Prometheus text format. Reads files in
    multiprocess mode: run it off the event loop."""
    return generate_latest(_SCRAPE_REGISTRY)


_DIR_PREFIX = "morngpt-metrics-"


@contextlib.contextmanager
def shared_dir() -> Iterator[str]:
    """For the supervising parent: a fresh directory where workers spawned inside the
    block keep their metrics (``PROMETHEUS_MULTIPROC_DIR``); removed afterwards."""
    _sweep_stale_dirs()
    path = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{os.getpid()}-")
    previous = os.environ.get(ENV)
    os.environ[ENV] = path
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop(ENV, None)
        else:
            os.environ[ENV] = previous
        shutil.rmtree(path, ignore_errors=True)


def _sweep_stale_dirs() -> None:
    """Remove directories left by supervisors that were killed (SIGKILL skips cleanup);
    each name carries its supervisor's pid."""
    for stale in Path(tempfile.gettempdir()).glob(f"{_DIR_PREFIX}*-*"):
        owner = stale.name.removeprefix(_DIR_PREFIX).partition("-")[0]
        if owner.isdigit() and not _is_alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def forget_worker(pid: int, path: str) -> None:
    """For the supervising parent: drop a dead worker's live gauges (its counters and
    histograms stay, so totals never go down)."""
    multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
