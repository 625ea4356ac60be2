"""``python -m proxy serve`` processes (used by the serve, replica, usage and adversity
tests): started on a free port, their log read as it comes, killed if still running."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg

from .env import PYTHON, free_port, proxy_env
from .leaks import watch_output
from .ledger import ledger_rows, spooled_request_ids
from .wait import until


class Served:
    """A ``python -m proxy serve`` process listening on ``port``. Its log is read as it
    comes (a full pipe would block the proxy) and kept for the end-of-run key scan."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log = watch_output([])
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode(errors="replace"))

    async def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        """Until ``text`` appeared in ``count`` lines of the log."""

        async def seen() -> bool:
            if sum(text in line for line in self.log) >= count:
                return True
            assert not self._reader.done(), f"the log ended; the last lines: {self.log[-20:]}"
            return False

        await until(seen, timeout)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        """The exit code, once the process and every worker closed the log."""
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    def worker_pids(self) -> list[int]:
        """The workers that logged that they listen, in order."""
        return [
            int(line.split("pid ")[1].split(")")[0]) for line in self.log if "listening" in line
        ]

    async def chat_on_new_connections(self, count: int) -> None:
        """``count`` chat requests, each answered 200, each on a new connection (so that
        the kernel spreads them over the workers)."""
        for _ in range(count):
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    self.url + "/v1/chat/completions", data=b'{"model": "m1"}'
                ) as resp:
                    assert resp.status == 200


def write_config(path: Path, upstream_url: str, dsn: str, spool: Path, workers: int) -> None:
    """A config file for ``serve`` (which picks the port)."""
    config = {
        "models": [{"name": "*", "deployments": [{"base_url": upstream_url, "name": "up"}]}],
        "server": {"workers": workers, "grace_period": 10},
        "database": {"url": dsn, "timeout": 1.0},
        "usage": {"spool_dir": str(spool), "flush_interval": 0.1},
    }
    path.write_bytes(orjson.dumps(config))


@contextlib.asynccontextmanager
async def serve(*args: str, port: int = 0) -> AsyncIterator[Served]:
    """``python -m proxy serve --port PORT --no-auth ARGS`` (these tests are about
    processes, not keys), on a free port unless one is given; killed if still running
    at the end."""
    port = port or free_port()
    proc = await asyncio.create_subprocess_exec(
        *(PYTHON, "-m", "proxy", "serve", "--port", str(port), "--no-auth", *args),
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
        # Bounded: the orphaned workers of a killed supervisor may hold the log open.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(served._reader, 5)


async def command(config: Path, *args: str) -> tuple[str, str]:
    """``python -m proxy ARGS --config CONFIG``: (stdout, stderr); it must exit 0."""
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "proxy", *args, "--config", str(config),
        env=proxy_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode(), err.decode()


async def start_one(config: Path, port: int, home: Path) -> Served:
    """``serve --config CONFIG --workers 1 --port PORT`` run in ``home`` (a new folder:
    its own spool); the caller waits for it to listen and stops it."""
    home.mkdir()
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "proxy", "serve", "--config", str(config),
        "--workers", "1", "--port", str(port),
        env=proxy_env(), cwd=home, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    return Served(proc, port)


def serve_upstream(
    upstream: FakeUpstream, *args: str, port: int = 0
) -> contextlib.AbstractAsyncContextManager[Served]:
    """``serve`` in front of ``upstream`` (the quick start)."""
    return serve("--upstream", upstream.url, *args, port=port)


@contextlib.asynccontextmanager
async def serve_without_database(upstream_url: str, spool: Path) -> AsyncIterator[Served]:
    """One worker whose database is never there (nothing listens on its port), so that
    every row goes to ``spool``; yielded once it listens."""
    config = spool.with_name("down.json")
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/ledger"
    write_config(config, upstream_url, down, spool, workers=1)
    async with serve("--config", str(config)) as served:
        await served.wait_log("listening")
        yield served


async def replay_spool(upstream_url: str, dsn: str, spool: Path) -> list[dict[str, Any]]:
    """Serve again, with the database up, over the spool a stopped process left: once
    the ledger holds as many rows as the spool did, stop (SIGTERM, exit 0) and return
    the ledger's rows. The spool must be empty by then."""
    expected = len(spooled_request_ids(spool))
    config = spool.with_name("up.json")
    write_config(config, upstream_url, dsn, spool, workers=1)
    database = cfg.Database(url=dsn)
    async with serve("--config", str(config)) as served:
        await served.wait_log("listening")

        async def replayed() -> bool:
            return len(await ledger_rows(database)) >= expected

        await until(replayed)
        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0
    assert list(spool.glob("*.jsonl")) == []
    return await ledger_rows(database)
