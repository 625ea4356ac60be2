"""``python -m proxy serve`` as a real process: workers, SIGTERM drain, exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest

from bench.fake_upstream import FakeUpstream

from .conftest import PYTHON, free_port, proxy_env, watch_output

STREAM = orjson.dumps(
    {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
)


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log: list[str] = watch_output([])  # scanned for keys at the end of the run

    async def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        """Read the process's log until ``text`` appeared ``count`` times."""
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            while sum(text in line for line in self.log) < count:
                line = await self.proc.stderr.readline()
                assert line, f"process exited; log so far: {self.log}"
                self.log.append(line.decode())

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stderr.read()
            self.log.extend(rest.decode().splitlines())
            return await self.proc.wait()


@contextlib.asynccontextmanager
async def serve(upstream: FakeUpstream, *args: str, port: int = 0) -> AsyncIterator[Served]:
    port = port or free_port()
    proc = await asyncio.create_subprocess_exec(
        PYTHON,
        "-m",
        "proxy",
        "serve",
        "--upstream",
        upstream.url,
        "--port",
        str(port),
        "--no-auth",  # these tests are about processes, not keys
        *args,
        env=proxy_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    served = Served(proc, port)
    try:
        yield served
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # What nobody waited for still goes to the key scan (bounded: orphaned workers
        # of a killed parent may hold the pipe open).
        if proc.stderr is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    served.log.extend((await proc.stderr.read()).decode().splitlines())


async def test_sigterm_lets_a_stream_finish_then_exits_0(upstream: FakeUpstream) -> None:
    async with serve(upstream, "--workers", "1") as served:
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
    async with serve(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        pids = {line.split("pid ")[1].rstrip(")\n") for line in served.log if "listening" in line}
        assert len(pids) == 2
        assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
        for _ in range(20):  # a new connection each time: the kernel spreads them
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    served.url + "/v1/chat/completions", data=b'{"model": "m1"}'
                ) as resp:
                    assert resp.status == 200
        started = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0
        assert time.monotonic() - started < 10
        assert sum(" stopped" in line and "worker" in line for line in served.log) == 2


async def test_killed_worker_is_replaced(upstream: FakeUpstream) -> None:
    async with serve(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        victim = next(line for line in served.log if "listening" in line)
        os.kill(int(victim.split("pid ")[1].rstrip(")\n")), signal.SIGKILL)
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
        async with serve(upstream, "--workers", "2", port=port) as served:
            assert await served.wait_exit(timeout=40) == 1
    assert any("giving up" in line for line in served.log)


async def test_workers_drain_when_the_supervisor_is_killed(upstream: FakeUpstream) -> None:
    async with serve(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        pids = [
            int(line.split("pid ")[1].rstrip(")\n")) for line in served.log if "listening" in line
        ]
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
