"""CPU per limiter admission: ``python -m bench.limiter [--callers N] [--lease-share S]``.

What one limited request costs the proxy in its limiter: ``Limiter.admit`` plus
``settle`` for a key with rpm and tpm limits, from ``--callers`` concurrent callers,
with leases as configured by default (``limits.lease_share``: one ``bucket.lua`` call
per lease) or, with ``--lease-share 0``, one call per request, against a
``redis-server`` of its own on a free port, allowed on every CPU (run this under
``taskset -c 1``: Redis then runs beside it, as in ``bench.run``). CPU time of this
process only; Redis's own is not counted. With 16 callers the calls of one loop turn
share a write (ratelimit/shared.py); with 1, each call waits for Redis alone and the
loop sleeps and wakes once per call.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from pathlib import Path

import uvloop

from proxy.config import schema as cfg
from proxy.governance.keys.record import Key
from proxy.governance.ratelimit.limiter import Limiter
from proxy.governance.ratelimit.shared import connect

from .inproc import cpu
from .procs import Service, free_port, pinned

_HUGE = 1_000_000_000
KEY = Key(id="bench", name="bench", rpm=_HUGE, tpm=_HUGE)


async def measure(
    url: str, calls: int, callers: int, repeat: int, share: float | None = None
) -> list[float]:
    """CPU µs per admission and settlement, one figure per run."""
    redis = cfg.Redis(url=url)
    client = connect(redis)
    limits = cfg.Limits() if share is None else cfg.Limits(lease_share=share)
    limiter = Limiter(limits, redis, client)

    async def caller(count: int) -> None:
        for _ in range(count):
            ticket = await limiter.admit(KEY, 100)
            if not (ticket.shared and ticket.verdict.allowed):  # measured Redis, not a fallback
                raise RuntimeError(f"not admitted by Redis: {ticket}")
            limiter.settle(KEY, ticket, -20)

    async def run(count: int) -> float:
        before = cpu()
        await asyncio.gather(*(caller(count // callers) for _ in range(callers)))
        return (cpu() - before) / count * 1e6

    try:
        await run(calls // 10)  # warm up: connections, the script
        return [await run(calls) for _ in range(repeat)]
    finally:
        await limiter.close()
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limiter", description=__doc__)
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5, help="runs; the best is reported")
    parser.add_argument("--lease-share", type=float, help="limits.lease_share (0: no leases)")
    args = parser.parse_args()
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    everywhere = frozenset(range(os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="morngpt-limiter-") as tmp:
        workdir = Path(tmp)
        redis = Service("redis", pinned(argv, everywhere), workdir, workdir / "redis.log")
        try:
            redis.wait_for("Ready to accept connections")
            url = f"redis://127.0.0.1:{port}/0"
            costs = uvloop.run(
                measure(url, args.calls, args.callers, args.repeat, args.lease_share)
            )
        finally:
            redis.stop()
    runs = ", ".join(f"{c:.1f}" for c in costs)
    print(
        f"limiter admission + settlement, {args.callers} callers, lease share "
        f"{cfg.Limits().lease_share if args.lease_share is None else args.lease_share:g}: "
        f"{min(costs):.1f} µs CPU "
        f"(best of {runs})"
    )


if __name__ == "__main__":
    main()
