"""``python -m proxy serve`` as a real process: workers, SIGTERM drain, exit codes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time

import aiohttp
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from tests.support.served import serve_upstream

STREAM = orjson.dumps(
    {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
)


async def test_sigterm_lets_a_stream_finish_then_exits_0(upstream: FakeUpstream) -> None:
    async with serve_upstream(upstream, "--workers", "1") as served:
        await served.wait_log("listening")
        async with aiohttp.ClientSession() as http:
            async with http.post(
                served.url + "/v1/chat/completions",
                data=STREAM,
                headers={"x-fake-chunks": "20", "x-fake-gap-ms": "50"},
            ) as resp:
                first = await resp.content.readuntil(b"\n\n")
                served.proc.send_signal(signal.SIGTERM)
                await served.wait_log("draining")
                # New connections are refused while the stream goes on.
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with aiohttp.ClientSession() as other:
                        await other.get(served.url + "/healthz")
                rest = await resp.read()
        body = first + rest
        assert body.count(b"data: ") == 23  # role + 20 tokens + finish + [DONE]
        assert body.endswith(b"data: [DONE]\n\n")
        assert await served.wait_exit() == 0


async def test_two_workers_share_the_port_and_drain_on_sigterm(upstream: FakeUpstream) -> None:
    async with serve_upstream(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        pids = set(served.worker_pids())
        assert len(pids) == 2
        # Each froze what start-up made (tens of thousands of objects), out of the
        # collector's full collections (serve.settle_heap).
        frozen = [line for line in served.log if "start-up objects frozen" in line]
        assert {int(line.split("worker ")[1].split(":")[0]) for line in frozen} == pids
        assert all(int(line.split(": ")[-1].split()[0]) > 10_000 for line in frozen)
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
        await served.chat_on_new_connections(20)
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0
        assert time.monotonic() - started < 10
        assert sum(" stopped" in line and "worker" in line for line in served.log) == 2


async def test_killed_worker_is_replaced(upstream: FakeUpstream) -> None:
    async with serve_upstream(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        os.kill(served.worker_pids()[0], signal.SIGKILL)
        await served.wait_log("starting another")
        await served.wait_log("listening", count=3)
        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0


async def test_workers_that_cannot_start_make_the_supervisor_give_up(
    upstream: FakeUpstream,
) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: nobody else may bind
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with serve_upstream(upstream, "--workers", "2", port=port) as served:
            assert await served.wait_exit(timeout=40) == 1
    assert any("giving up" in line for line in served.log)


async def test_workers_drain_when_the_supervisor_is_killed(upstream: FakeUpstream) -> None:
    async with serve_upstream(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        pids = served.worker_pids()
        served.proc.kill()
        await served.proc.wait()
        async with asyncio.timeout(15):
            while any(_alive(pid) for pid in pids):  # noqa: ASYNC110 - other processes
                await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
