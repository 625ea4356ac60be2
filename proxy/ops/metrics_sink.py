"""The sink that turns finished requests into the metrics of metrics.py.

``MetricsSink.record`` is on the request path: label children are cached per label
set, and it only adds to plain numbers; ``MetricsSink.fold`` moves them into the
metrics ``FOLD_SECONDS`` after the first request it has not folded, and before every
scrape of its worker (see the class's docstring).
"""

from __future__ import annotations

import asyncio
from typing import Final

from prometheus_client import (
    Counter,
    Histogram,
)

from ..config.base import WILDCARD
from ..config.schema import Config
from ..exchange import Exchange
from .metrics import (
    COST,
    OVERHEAD,
    REQUEST_DURATION,
    REQUESTS,
    TOKENS,
    TTFT,
    UPSTREAM_DURATION,
    WORKER_REQUESTS,
    count_upstream_error,
)

STATUS_CLASSES = ("unknown", "1xx", "2xx", "3xx", "4xx", "5xx")
# How long a finished request's numbers wait to be added to the metrics: one fold
# takes all the requests that finish meanwhile (a fold costs ~40,000 instructions, a
# streamed request ~240,000: callgrind, bench/RESULTS.md, nineteenth pass).
FOLD_SECONDS: Final = 0.05
STREAM_LABELS = ("false", "true")


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
    public way to add several observations at once; tests/ops/test_metrics.py checks
    the result against ``observe``)."""

    __slots__ = ("bounds", "buckets", "counts", "observed", "sum", "total")

    def __init__(self, child: Histogram) -> None:
        self.bounds: list[float] = child._upper_bounds
        self.buckets = child._buckets
        self.sum = child._sum
        self.counts = [0] * len(self.bounds)  # gathered, by bucket
        self.observed = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[_bucket(self.bounds, value)] += 1
        self.observed += 1
        self.total += value

    def fold(self) -> None:
        if self.observed:
            counts = self.counts
            for at, n in enumerate(counts):
                if n:
                    self.buckets[at].inc(n)
                    counts[at] = 0
            self.sum.inc(self.total)
            self.observed = 0
            self.total = 0.0


def _bucket(bounds: list[float], value: float) -> int:
    """The first bucket whose bound is >= ``value``, as ``Histogram.observe`` picks it
    (``bisect_left``'s search): compiled, its float comparisons are inline, where
    ``bisect_left`` makes a rich comparison of two objects at each step (~860
    instructions a call)."""
    low, high = 0, len(bounds)
    while low < high:
        mid = (low + high) // 2
        if bounds[mid] < value:
            low = mid + 1
        else:
            high = mid
    return low


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

    ``record`` only gathers, in plain Python numbers; the first record after a fold
    schedules the next ``FOLD_SECONDS`` later, which adds what was gathered to the
    metrics. prometheus-client takes a lock per increment (and writes an mmap in
    multiprocess mode): about 12 per request when each request updates the metrics
    itself, one per touched value per fold this way, shared by every request that
    finished since the last. Nothing is lost or counted twice: a worker folds before
    it serves a scrape (app.py), and when it stops (state.py). A scrape sees what
    its own worker finished at once, what others did at most ``FOLD_SECONDS`` late.
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
            asyncio.get_running_loop().call_later(FOLD_SECONDS, self.fold)
        except RuntimeError:  # called outside an event loop: nothing to wait for
            self.fold()
            return
        self._scheduled = True

    def _add(self, key: tuple[str, str, int, bool]) -> _Series:
        model, deployment, status, stream = key
        status_class = STATUS_CLASSES[status // 100] if 100 <= status < 600 else "unknown"
        series = _Series(self, model, deployment, status_class, STREAM_LABELS[stream])
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
