"""A bounded soak: a steady rate of mixed traffic (streams, plain answers, upstream
errors, cut streams, clients leaving mid-stream and before the answer) against one
proxy worker in a process of its own (tests/support/probe.py). Afterwards nothing may be left
behind: no unclosed upstream response, no extra task, connection or file
descriptor; memory is flat after warm-up (RSS at start, peak and end are reported).

The default run soaks for a few seconds; ``-m slow`` for five minutes."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from tests.support.env import PYTHON, UPSTREAM_KEY, free_port, proxy_env
from tests.support.figures import count, measure
from tests.support.leaks import watch_output
from tests.support.rawhttp import CHAT, STREAM

MB = 1024 * 1024


@dataclass
class Probe:
    """The probe process: its port and its answers to ``stats``."""

    proc: asyncio.subprocess.Process
    port: int
    log: list[str]

    async def stats(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        async with asyncio.timeout(30):
            return orjson.loads(await self.proc.stdout.readline())  # type: ignore[no-any-return]

    async def settled(self) -> dict[str, Any]:
        """Stats once every request is over and every client connection closed."""
        deadline = time.monotonic() + 15
        while True:
            now = await self.stats()
            if now["inflight"] == now["connections"] == now["upstream_inflight"] == 0:
                return now
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def probe(folder: Path, upstream: FakeUpstream) -> AsyncIterator[Probe]:
    config = {
        "models": [
            {
                "name": "*",
                "deployments": [{"base_url": upstream.url, "api_key": UPSTREAM_KEY}],
            }
        ],
        "server": {"port": free_port(), "workers": 1, "access_log": "off"},
        # One attempt each, and errors never take the one deployment out of rotation:
        # the soak is about leaks, not routing.
        "routing": {"max_attempts": 1, "failure_threshold": 1000000},
        "auth": {"enabled": False},
        "database": {"sqlite_path": str(folder / "soak.db")},
        "usage": {"spool_dir": str(folder / "spool")},
    }
    path = folder / "soak.json"
    path.write_bytes(orjson.dumps(config))
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "tests.support.probe", str(path),
        env=proxy_env(), stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    log = watch_output([])

    async def drain() -> None:
        assert proc.stderr is not None
        async for line in proc.stderr:
            log.append(line.decode(errors="replace"))

    reader = asyncio.create_task(drain())
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(30):
            first = await proc.stdout.readline()
        assert first, f"the probe did not start: {log[-20:]}"
        yield Probe(proc, orjson.loads(first)["port"], log)
        assert proc.stdin is not None
        proc.stdin.write(b"quit\n")
        await proc.stdin.drain()
        async with asyncio.timeout(30):
            assert await proc.wait() == 0, log[-20:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


# The traffic mix: (what, request body, fake-upstream behaviour), in turn.
MIX = [
    ("stream", STREAM, {"x-fake-chunks": "8", "x-fake-gap-ms": "5"}),
    ("plain", CHAT, {}),
    ("stream", STREAM, {"x-fake-chunks": "8", "x-fake-gap-ms": "5"}),
    ("error", CHAT, {"x-fake-status": "500"}),
    ("stream", STREAM, {}),
    ("cut", STREAM, {"x-fake-cut": "3"}),
    ("plain", CHAT, {}),
    ("leave-mid-stream", STREAM, {"x-fake-chunks": "50", "x-fake-gap-ms": "20"}),
    ("throttled", CHAT, {"x-fake-status": "429", "x-fake-retry-after": "1"}),
    ("leave-before-answer", CHAT, {"x-fake-delay-ms": "2000"}),
]


async def one(http: aiohttp.ClientSession, url: str, turn: int, outcomes: Counter[str]) -> None:
    what, body, headers = MIX[turn % len(MIX)]
    async with asyncio.timeout(20):  # a hang fails the soak
        if what == "leave-before-answer":
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.05):
                    await http.post(url, data=body, headers=headers)
            outcomes[what] += 1
            return
        async with http.post(url, data=body, headers=headers) as resp:
            if what == "leave-mid-stream":
                await resp.content.readuntil(b"\n\n")
                resp.close()  # drops the connection
            else:
                await resp.read()
        outcomes[f"{what} {resp.status}"] += 1


async def load(port: int, rate: float, seconds: float) -> Counter[str]:
    """Open-loop traffic at ``rate`` requests per second for ``seconds``."""
    outcomes: Counter[str] = Counter()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        start = time.perf_counter()
        tasks = []
        for turn in itertools.count():
            at = start + turn / rate
            if at - start >= seconds:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(one(http, url, turn, outcomes)))
        await asyncio.gather(*tasks)
    return outcomes


async def soak(tmp_path: Path, rate: float, seconds: float, samples: int) -> None:
    async with FakeUpstream() as upstream:
        upstream.keep_received = False
        async with probe(tmp_path, upstream) as worker:
            await load(worker.port, rate, min(5.0, seconds / 4))  # warm-up
            base = await worker.settled()
            rss = [base["rss"]]
            outcomes: Counter[str] = Counter()
            for _ in range(samples):
                outcomes += await load(worker.port, rate, seconds / samples)
                rss.append((await worker.stats())["rss"])
            end = await worker.settled()
    served = sum(outcomes.values())
    measure(
        f"soak {seconds:g} s at {rate:g}/s",
        f"{served} requests; RSS after warm-up {base['rss'] / MB:.1f} MB, at each quarter "
        f"{' '.join(f'{rss[len(rss) * q // 4] / MB:.1f}' for q in (1, 2, 3))} MB, peak "
        f"{max(rss) / MB:.1f} MB, end {end['rss'] / MB:.1f} MB; tasks {base['tasks']} → "
        f"{end['tasks']}, fds {base['fds']} → {end['fds']}, open upstream responses "
        f"{end['client_responses']}",
    )
    count(served=served, faults=sum(n for k, n in outcomes.items() if not k.endswith(" 200")))
    # Every kind of request happened, and answered as its kind should.
    assert set(outcomes) == {
        "stream 200", "plain 200", "error 500", "cut 200", "leave-mid-stream 200",
        "throttled 429", "leave-before-answer",
    }, outcomes  # fmt: skip
    # Nothing left behind.
    assert end["client_responses"] == 0, end
    assert end["tasks"] <= base["tasks"], (base, end)
    # File descriptors: the same, give or take idle pooled upstream connections.
    assert end["fds"] - end["pooled"] <= base["fds"] - base["pooled"] + 2, (base, end)
    # Memory flat after warm-up: allocator noise, not growth with the traffic.
    assert end["rss"] - base["rss"] < 24 * MB, (base["rss"], end["rss"])
    assert max(rss) - base["rss"] < 48 * MB, (base["rss"], rss)


async def test_a_short_soak_leaks_nothing(tmp_path: Path) -> None:
    await soak(tmp_path, rate=60, seconds=12, samples=4)


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_a_five_minute_soak_leaks_nothing(tmp_path: Path) -> None:
    await soak(tmp_path, rate=100, seconds=300, samples=30)
