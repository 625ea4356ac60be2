"""Sample traffic for ``scripts/demo``: a few requests a second to the proxy, streamed
and not, with the odd error, so the console has something to show.

    python -m bench.demo_traffic --url http://127.0.0.1:8080 --model demo-chat [--rate 4]

Runs until stopped; a proxy that is not up yet (or went away) is waited for quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random

import aiohttp


async def one(http: aiohttp.ClientSession, url: str, model: str, rng: random.Random) -> None:
    stream = rng.random() < 0.6
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hello " * rng.randint(1, 40)}],
        "stream": stream,
    }
    headers = {"Authorization": "Bearer demo", "x-fake-chunks": str(rng.randint(2, 20))}
    if rng.random() < 0.03:  # now and then an upstream error, for the error rate
        headers["x-fake-status"] = "500"
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            await r.read()


async def run(url: str, model: str, rate: float) -> None:
    rng = random.Random(7)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks: set[asyncio.Task[None]] = set()
        while True:
            task = asyncio.create_task(one(http, url, model, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--model", default="demo-chat")
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args.url, args.model, args.rate))


if __name__ == "__main__":
    main()
