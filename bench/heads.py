"""The request head the proxy sends upstream, alone: ``python -m bench.heads``.

Per request, what a client's headers become on their way to a deployment, then the
head ``h1._head`` encodes, for the OpenAI Python SDK's 17 headers and the 4 the
benches send:

- "kept": the same headers object every time, as the front hands it to a keep-alive
  client that repeats its headers (``Upstream.block`` finds its lines; only
  ``X-Request-Id`` and the trace context are formatted per request);
- "made": the block made again every time, as ``Upstream.block`` makes it for a
  headers object it has not seen (a request aiohttp serves after a handover has a new
  one each time): ``Forwarding.headers``, ``forward_headers`` and
  ``h1.header_lines``, the work every request did before the eleventh pass
  (docs/performance.md).

Best of ``--repeat`` runs of ``--number`` heads, in µs a head. Pin it: ``taskset -c 1``.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Sequence

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.upstreams import Deployment
from proxy.http import h1
from proxy.http.ingress import Forwarding
from proxy.http.upstream import Upstream, forward_headers
from proxy.ops.tracing import trace_context

# What openai 1.x's AsyncOpenAI sends with a chat completion (its key made up).
SDK = (
    ("Host", "127.0.0.1:8080"),
    ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"),
    ("Accept", "application/json"),
    ("Content-Type", "application/json"),
    ("User-Agent", "AsyncOpenAI/Python 1.99.0"),
    ("X-Stainless-Lang", "python"),
    ("X-Stainless-Package-Version", "1.99.0"),
    ("X-Stainless-OS", "Linux"),
    ("X-Stainless-Arch", "x64"),
    ("X-Stainless-Runtime", "CPython"),
    ("X-Stainless-Runtime-Version", "3.11.7"),
    ("Authorization", "Bearer sk-client-0123456789abcdef0123456789abcdef"),
    ("X-Stainless-Async", "async:asyncio"),
    ("x-stainless-retry-count", "0"),
    ("x-stainless-read-timeout", "600"),
    ("Content-Length", "120"),
)
# What bench.inproc and bench.run's wrk send.
BENCH = (
    ("Host", "127.0.0.1:8080"),
    ("Content-Type", "application/json"),
    ("Authorization", "Bearer sk-client-0123456789abcdef0123456789abcdef"),
    ("Content-Length", "120"),
)
BODY = b"x" * 120


def heads(sent: Sequence[tuple[str, str]], kept: bool, number: int, repeat: int) -> float:
    """µs of one upstream head for a client that sent ``sent``."""
    upstream = Upstream(Deployment(base_url="http://127.0.0.1:9/v1", api_key="sk-upstream"))
    forwarding = Forwarding([])
    headers = CIMultiDictProxy(CIMultiDict(sent))
    peer = "127.0.0.1"

    def block() -> str:
        if kept:
            return upstream.block(headers, peer, forwarding)
        return h1.header_lines(forward_headers(forwarding.headers(headers, peer), upstream.auth))

    def one() -> None:
        extra = [("X-Request-Id", "req_0123456789abcdef"), *trace_context(headers, False)]
        h1._head("POST", "/v1/chat/completions", "127.0.0.1:9", block(), extra, BODY)

    assert upstream.block(headers, peer, forwarding) == block()  # the same lines either way
    return min(timeit.repeat(one, number=number, repeat=repeat)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"{'client':8} {'headers':>7} {'kept':>6} {'made':>6}  (µs a head)")
    for name, sent in (("SDK", SDK), ("bench", BENCH)):
        kept, made = (heads(sent, k, args.number, args.repeat) for k in (True, False))
        print(f"{name:8} {len(sent):7d} {kept:6.2f} {made:6.2f}")


if __name__ == "__main__":
    main()
