"""Upstream calls and client wait for one failing request: the official OpenAI SDK
with its default retries (2) through the proxy, against the same SDK calling the
upstream directly, for each kind of upstream error (issue #14: the proxy's retries
must never multiply with the SDK's)::

    python -m bench.retries [--repeat 3] [--retry-after 2] [--timeout 2]

The upstream is the fake (``bench/fake_upstream.py``), answering every request with
the error; "connection refused" is a port nothing listens on. The proxy runs in this
process in its quick-start shape (one deployment, the default routing policy). Calls
are counted where they are made: by the SDK (an httpx request hook) when direct, by
the proxy (its attempts) when proxied. Prints a Markdown table of the means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import openai
import uvloop
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import WILDCARD
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model, Timeouts
from proxy.exchange import Exchange
from proxy.serve import start
from proxy.state import STATE

MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Kind:
    """One kind of upstream failure and how the SDK and the proxy are set up for it."""

    name: str
    headers: dict[str, str]
    sdk_timeout: float = 600.0  # the SDK's default
    first_byte: float = 600.0  # the proxy's default (timeouts.first_byte)
    refused: bool = False


def kinds(retry_after: float, timeout: float) -> list[Kind]:
    status = "x-fake-status"
    return [
        Kind("500", {status: "500"}),
        Kind("502", {status: "502"}),
        Kind("503", {status: "503"}),
        Kind(
            f"429, Retry-After: {retry_after:g}",
            {status: "429", "x-fake-retry-after": f"{retry_after:g}"},
        ),
        Kind("429, no Retry-After", {status: "429"}),
        Kind(
            f"timeout (proxy {timeout / 2:g} s, SDK {timeout:g} s)",
            {"x-fake-stall": "before"},
            sdk_timeout=timeout,
            first_byte=timeout / 2,
        ),
        Kind(
            f"timeout (proxy {timeout * 2:g} s, SDK {timeout:g} s)",
            {"x-fake-stall": "before"},
            sdk_timeout=timeout,
            first_byte=timeout * 2,
        ),
        Kind("connection refused", {}, refused=True),
    ]


@dataclass
class Outcome:
    calls: int
    wait: float
    status: int | None  # what the client finally got (None: a connection error / timeout)


class _Attempts:
    """A sink counting the proxy's requests and their upstream attempts."""

    def __init__(self) -> None:
        self.requests = 0
        self.attempts = 0

    def record(self, exchange: Exchange) -> None:
        self.requests += 1
        self.attempts += exchange.attempts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(
    upstream_url: str, first_byte: float, workdir: Path
) -> AsyncIterator[tuple[str, _Attempts]]:
    """The proxy in its quick-start shape in front of ``upstream_url``."""
    deployment = Deployment(
        base_url=upstream_url, name="upstream", timeouts=Timeouts(first_byte=first_byte)
    )
    config = resolve(
        cfg.Config(
            models=[Model(name=WILDCARD, deployments=[deployment])],
            server=cfg.Server(port=0, workers=1, access_log="off", grace_period=1.0),
            auth=cfg.Auth(enabled=False),
            database=cfg.Database(sqlite_path=str(workdir / "bench.db")),
            usage=cfg.Ledger(spool_dir=str(workdir / "spool")),
        )
    )
    runner: web.AppRunner = await start(config)
    counter = _Attempts()
    runner.app[STATE].sinks.add(counter)
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/v1", counter
    finally:
        await runner.cleanup()


async def _ask(base_url: str, kind: Kind) -> tuple[float, int | None, int]:
    """One request with the SDK's default retries: (wait, final status, SDK attempts)."""
    sent = 0

    async def count(request: object) -> None:
        nonlocal sent
        sent += 1

    http = openai.DefaultAsyncHttpxClient(event_hooks={"request": [count]})
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key="bench", timeout=kind.sdk_timeout, http_client=http
    ) as client:
        started = time.monotonic()
        status: int | None = None
        try:
            await client.chat.completions.create(
                model="bench",
                messages=MESSAGES,
                extra_headers=kind.headers,  # type: ignore[arg-type]
            )
            status = 200
        except openai.APIStatusError as exc:
            status = exc.status_code
        except (openai.APIConnectionError, openai.APITimeoutError):
            pass
        return time.monotonic() - started, status, sent


async def measure(kind: Kind, workdir: Path) -> tuple[Outcome, Outcome]:
    """(direct, proxied) for one failing request of ``kind``."""
    async with FakeUpstream(name="bench") as fake:
        url = f"http://127.0.0.1:{_free_port()}/v1" if kind.refused else fake.url
        wait, status, sdk_calls = await _ask(url, kind)
        direct = Outcome(sdk_calls, wait, status)
        async with serving(url, kind.first_byte, workdir) as (base, counter):
            wait, status, sdk_calls = await _ask(base, kind)
            # A request the SDK gave up on is recorded once its handler has ended.
            async with asyncio.timeout(10):
                while counter.requests < sdk_calls:  # noqa: ASYNC110 - a sink has no event
                    await asyncio.sleep(0.01)
            proxied = Outcome(counter.attempts, wait, status)
    return direct, proxied


async def table(
    repeat: int, retry_after: float, sdk_timeout: float, together: bool = False
) -> list[tuple[Kind, list[Outcome], list[Outcome]]]:
    """Every kind, ``repeat`` times each way; ``together`` runs the kinds at once (for
    the test, which counts calls; the waits are only comparable one kind at a time)."""

    async def row(kind: Kind, workdir: Path) -> tuple[Kind, list[Outcome], list[Outcome]]:
        runs = [await measure(kind, workdir) for _ in range(repeat)]
        return kind, [d for d, _ in runs], [p for _, p in runs]

    with tempfile.TemporaryDirectory() as tmp:
        work = [
            (kind, Path(tmp) / str(i)) for i, kind in enumerate(kinds(retry_after, sdk_timeout))
        ]
        for _, path in work:
            path.mkdir()
        if together:
            return list(await asyncio.gather(*(row(k, p) for k, p in work)))
        return [await row(k, p) for k, p in work]


def render(rows: list[tuple[Kind, list[Outcome], list[Outcome]]]) -> str:
    lines = [
        "| upstream answers | calls, direct | calls, proxy | wait, direct (s) "
        "| wait, proxy (s) | client gets (proxy) |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for kind, direct, proxied in rows:
        statuses = {p.status for p in proxied}
        got = ", ".join(
            "error" if s is None else str(s) for s in sorted(statuses, key=lambda s: s or 0)
        )
        lines.append(
            f"| {kind.name} | {statistics.mean(d.calls for d in direct):g} "
            f"| {statistics.mean(p.calls for p in proxied):g} "
            f"| {statistics.mean(d.wait for d in direct):.2f} "
            f"| {statistics.mean(p.wait for p in proxied):.2f} | {got} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="requests per kind and side")
    parser.add_argument("--retry-after", type=float, default=2.0, help="the upstream's Retry-After")
    parser.add_argument("--timeout", type=float, default=2.0, help="the SDK's timeout (s)")
    args = parser.parse_args()
    logging.getLogger("proxy").setLevel(logging.ERROR)  # ejections are expected here
    rows = uvloop.run(table(args.repeat, args.retry_after, args.timeout))
    print(render(rows))


if __name__ == "__main__":
    main()
