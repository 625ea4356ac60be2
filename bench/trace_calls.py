"""CPU per request of exactly what tracing adds, without the rest of the proxy.

``python -m bench.trace_calls``

``bench.inproc --tracing`` measures the whole proxy three times; on a shared machine
its rounds move by several µs, as much as a sampled-out request costs. This one runs
only the calls the request path makes for tracing (``Tracer.start``, ``Trace.asked``,
the two failover hooks, the sink's ``record``), in the order a one-attempt request
makes them, on a real aiohttp header set, a configured deployment and an ``Exchange``
as the relay leaves it; and, for sampled requests, what the export thread does for
them (``_Exporter.encode``: spans built and serialized, in batches of
``batch_size``), with no network. CPU per request, best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config import schema as cfg
from proxy.config.upstreams import Deployment
from proxy.exchange import Exchange
from proxy.http.upstream import Upstream
from proxy.http.wire import RequestView, Usage
from proxy.ops.tracer import Tracer

# What the bench clients of bench.run / bench.inproc send, as aiohttp hands it over.
HEADERS = CIMultiDictProxy(
    CIMultiDict(
        {
            "Host": "127.0.0.1:8080",
            "Content-Type": "application/json",
            "Authorization": "Bearer sk-bench",
            "Content-Length": "120",
            "User-Agent": "bench",
        }
    )
)
VIEW = RequestView(model="m", stream=True, max_tokens=50)
USAGE = Usage(prompt_tokens=12, completion_tokens=8, total_tokens=20)


def bare_request(upstream: Upstream) -> Exchange:
    """``one_request`` without a line of tracing: what the proxy did before it."""
    exchange = Exchange("req_bench", "chat/completions")
    exchange.model, exchange.stream, exchange.key_id = "m", True, "k1"
    headers = [("Content-Type", "application/json"), ("X-Request-Id", "req_bench")]
    del headers  # built, as one_request's, and left unused
    exchange.deployment, exchange.attempts, exchange.status = "d1", 1, 200
    exchange.first_byte, exchange.usage, exchange.events = time.perf_counter(), USAGE, 9
    return exchange


def one_request(tracer: Tracer | None, upstream: Upstream) -> Exchange:
    """The tracing calls of one streamed, one-attempt request, in the proxy's order."""
    exchange = Exchange("req_bench", "chat/completions")
    if tracer is not None:  # app.proxy
        exchange.trace = tracer.start(HEADERS)
    exchange.model, exchange.stream, exchange.key_id = "m", True, "k1"
    trace = exchange.trace
    headers = [("Content-Type", "application/json"), ("X-Request-Id", "req_bench")]
    if trace is not None:
        trace.asked(VIEW)
        trace.attempt(upstream, headers)  # failover._send
        trace.attempt_ended(200)
    exchange.deployment, exchange.attempts, exchange.status = "d1", 1, 200
    exchange.first_byte, exchange.usage, exchange.events = time.perf_counter(), USAGE, 9
    if tracer is not None:  # the sink
        tracer.record(exchange)
    return exchange


def per_request(run: Callable[[], Any], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(n):
            run()
        best = min(best, (time.process_time() - start) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.trace_calls", description=__doc__)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    deployment = Deployment(base_url="http://127.0.0.1:9000/v1", name="d1", api_key="k")
    upstream = Upstream(deployment, "m")
    endpoint = "http://127.0.0.1:9/v1/traces"  # never contacted: the thread is not started
    out = Tracer(cfg.Tracing(endpoint=endpoint, sample_ratio=0.0))
    kept = Tracer(cfg.Tracing(endpoint=endpoint, sample_ratio=1.0))
    batch = kept.exporter.config.batch_size

    def sampled() -> None:
        one_request(kept, upstream)
        if len(kept.queue) >= batch:  # the export thread's share, here in line
            requests = [kept.queue.popleft() for _ in range(batch)]
            kept.exporter.encode(requests)

    n, repeat = args.requests, args.repeat
    baseline = per_request(lambda: bare_request(upstream), n, repeat)
    print(f"no tracing code (the baseline: an Exchange and a few fields): {baseline:.2f} µs")
    for name, run in (
        ("tracing off", lambda: one_request(None, upstream)),
        ("sampled out", lambda: one_request(out, upstream)),
        ("sampled, spans built and serialized", sampled),
    ):
        print(f"{name}: +{per_request(run, n, repeat) - baseline:.2f} µs CPU per request")


if __name__ == "__main__":
    main()
