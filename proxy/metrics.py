"""Every Prometheus metric the proxy exports, and the sink that records finished requests.

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
  metrics once per event-loop iteration (see its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from bisect import bisect_left
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

from .config import WILDCARD, Config
from .errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from .exchange import Exchange

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
# Updated by the proxy handler around each request.
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

# --- Traces (updated by the trace exporter, proxy/tracing.py) ------------------------

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

# Exchange.error class names → upstream error kind; anything else is not the upstream's.
_UPSTREAM_KINDS = {
    UpstreamTimeout.__name__: "timeout",
    UpstreamUnavailable.__name__: "unavailable",
    UpstreamProtocolError.__name__: "protocol",
    UpstreamError.__name__: "broken",
    "UpstreamStreamError": "stream_error",  # the upstream ended its stream with an error
}
_STATUS_CLASSES = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")
_STREAM = ("false", "true")


def upstream_error_kind(error: str, status: int) -> str | None:
    """The ``morngpt_upstream_errors_total`` kind for an attempt's outcome, if it failed
    because of the upstream (``error`` is an error class name, ``status`` the upstream's
    HTTP status)."""
    kind = _UPSTREAM_KINDS.get(error)
    if kind is None and not error:
        if status >= 500:
            kind = "http_5xx"
        elif status == 429:
            kind = "http_429"
    return kind


def count_upstream_error(deployment: str, error: Exception | str, status: int = 0) -> None:
    """Count one failed upstream attempt (routing calls this for attempts it retried)."""
    name = error if isinstance(error, str) else type(error).__name__
    kind = upstream_error_kind(name, status)
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
    for reason in TRACE_DROP_REASONS:
        TRACE_SPANS_DROPPED.labels(reason)


class _Sum:
    """A counter child's increments gathered since the last fold."""

    __slots__ = ("child", "n", "unit")

    def __init__(self, child: Counter, unit: float = 1) -> None:
        self.child = child
        self.n = 0  # in 1/unit: cost is gathered in exact nano-units
        self.unit = unit

    def fold(self) -> None:
        if self.n:
            self.child.inc(self.n / self.unit)
            self.n = 0


class _Observations:
    """A histogram child's observations gathered since the last fold: a count per
    bucket and their sum. Folding adds them to the child's bucket and sum values
    directly (``_upper_bounds``, ``_buckets``, ``_sum``: prometheus-client has no
    public way to add several observations at once; tests/test_metrics.py checks
    the result against ``observe``)."""

    __slots__ = ("bounds", "buckets", "counts", "sum", "total")

    def __init__(self, child: Histogram) -> None:
        self.bounds = child._upper_bounds
        self.buckets = child._buckets
        self.sum = child._sum
        self.counts: dict[int, int] = {}
        self.total = 0.0

    def observe(self, value: float) -> None:
        # The first bucket whose bound is >= value, as Histogram.observe picks it.
        at = bisect_left(self.bounds, value)
        counts = self.counts
        counts[at] = counts.get(at, 0) + 1
        self.total += value

    def fold(self) -> None:
        if self.counts:
            for at, n in self.counts.items():
                self.buckets[at].inc(n)
            self.sum.inc(self.total)
            self.counts.clear()
            self.total = 0.0


class _Series:
    """What one (model, deployment, status, stream) updates. Children shared with
    other series (overhead per stream flag, upstream duration per deployment, ...)
    share one gatherer."""

    __slots__ = (
        "completion", "cost", "duration", "overhead", "parts", "pending", "prompt",
        "requests", "ttft", "upstream",
    )  # fmt: skip

    def __init__(
        self, sink: MetricsSink, model: str, deployment: str, status_class: str, stream: str
    ) -> None:
        self.pending = 0  # requests recorded since the last fold
        self.requests = REQUESTS.labels(model, deployment, status_class, stream)
        self.duration = sink.observations_of(REQUEST_DURATION.labels(model, deployment, stream))
        self.ttft = sink.observations_of(TTFT.labels(model, deployment, stream))
        self.overhead = sink.observations_of(OVERHEAD.labels(stream))
        self.upstream = sink.observations_of(UPSTREAM_DURATION.labels(deployment))
        self.prompt = sink.sum_of(TOKENS.labels(model, deployment, "prompt"))
        self.completion = sink.sum_of(TOKENS.labels(model, deployment, "completion"))
        self.cost = sink.sum_of(COST.labels(model), unit=1e9)  # nano-units (pricing.py)
        self.parts: tuple[_Sum | _Observations, ...] = (
            self.duration, self.ttft, self.overhead, self.upstream,
            self.prompt, self.completion, self.cost,
        )  # fmt: skip


class MetricsSink:
    """Records every finished exchange in the request metrics (a ``Sink``).

    ``record`` only gathers, in plain Python numbers; the first record of an event-loop
    iteration schedules ``fold`` for the next one, which adds what was gathered to
    the metrics. prometheus-client takes a lock per increment (and writes an mmap in
    multiprocess mode): about 12 per request when each request updates the metrics
    itself, one per touched value per iteration this way, shared by the several
    requests that finish in one iteration under load. Nothing is lost or counted
    twice; a scrape sees a request at most one loop iteration after it finished.
    """

    __slots__ = ("_dirty", "_observations", "_scheduled", "_sums", "models", "series")

    def __init__(self, config: Config) -> None:
        # Model names clients send are free text; only configured ones become labels.
        self.models = frozenset(m.name for m in config.models if m.name != WILDCARD)
        self.series: dict[tuple[str, str, int, bool], _Series] = {}
        # One gatherer per metric child, whichever series update it.
        self._sums: dict[Counter, _Sum] = {}
        self._observations: dict[Histogram, _Observations] = {}
        self._dirty: list[_Series] = []  # series with requests since the last fold
        self._scheduled = False

    def record(self, exchange: Exchange) -> None:
        duration = exchange.duration
        model = exchange.model if exchange.model in self.models else WILDCARD
        status = exchange.status
        key = (model, exchange.deployment, status, exchange.stream)
        series = self.series.get(key)
        if series is None:
            series = self._add(key)
        if not series.pending:
            self._dirty.append(series)
        series.pending += 1
        series.duration.observe(duration)
        series.overhead.observe(duration - exchange.upstream_time)
        ttft = exchange.ttft
        if ttft is not None and status < 400:
            series.ttft.observe(ttft)
        if exchange.upstream_time:
            series.upstream.observe(exchange.upstream_time)
        usage = exchange.usage
        if usage is not None:
            series.prompt.n += usage.prompt_tokens
            series.completion.n += usage.completion_tokens
        series.cost.n += exchange.cost
        if exchange.deployment and (exchange.error or status >= 429):
            count_upstream_error(exchange.deployment, exchange.error, status)
        if not self._scheduled:
            self._schedule()

    def fold(self) -> None:
        """Add everything gathered since the last fold to the metrics."""
        self._scheduled = False
        finished = 0
        for series in self._dirty:
            finished += series.pending
            series.requests.inc(series.pending)
            series.pending = 0
            for part in series.parts:
                part.fold()
        self._dirty.clear()
        if finished:
            WORKER_REQUESTS.inc(finished)

    def _schedule(self) -> None:
        try:
            asyncio.get_running_loop().call_soon(self.fold)
        except RuntimeError:  # called outside an event loop: nothing to wait for
            self.fold()
            return
        self._scheduled = True

    def _add(self, key: tuple[str, str, int, bool]) -> _Series:
        model, deployment, status, stream = key
        status_class = _STATUS_CLASSES[status // 100] if 100 <= status < 600 else "unknown"
        series = _Series(self, model, deployment, status_class, _STREAM[stream])
        self.series[key] = series
        return series

    def sum_of(self, child: Counter, unit: float = 1) -> _Sum:
        found = self._sums.get(child)
        if found is None:
            found = self._sums[child] = _Sum(child, unit)
        return found

    def observations_of(self, child: Histogram) -> _Observations:
        found = self._observations.get(child)
        if found is None:
            found = self._observations[child] = _Observations(child)
        return found


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
