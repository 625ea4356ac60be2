"""Two ``python -m proxy serve`` processes with one config: one Redis prefix, one
PostgreSQL database, one priced model on the fake upstream (the ``pair`` fixture; the
team limit and budget tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

from .env import REDIS_URL, free_port
from .leaks import SECRETS
from .served import Served, command, start_one

MESSAGES = [{"role": "user", "content": "hi"}]


def pair_config(upstream_url: str, dsn: str, redis_prefix: str) -> dict[str, Any]:
    """Model m1 at 0.001 a prompt token and 0.002 a completion token."""
    return {
        "models": [
            {
                "name": "m1",
                "price": {"prompt": "1000", "completion": "2000"},
                "deployments": [{"base_url": upstream_url, "name": "fake"}],
            }
        ],
        "server": {"host": "127.0.0.1", "access_log": "off", "grace_period": 5},
        "database": {"url": dsn},
        "redis": {"url": REDIS_URL, "key_prefix": redis_prefix, "timeout": 5.0},
        "limits": {"flush_interval": 0.1},
        "usage": {"spool_dir": "spool", "flush_interval": 0.05},
    }


@dataclass
class Pair:
    """Two proxy processes with one config (one Redis prefix, one database)."""

    folder: Path
    config: Path
    dsn: str
    ports: list[int]

    @classmethod
    def write(cls, folder: Path, upstream_url: str, dsn: str, redis_prefix: str) -> Pair:
        path = folder / "proxy.yaml"
        path.write_text(yaml.safe_dump(pair_config(upstream_url, dsn, redis_prefix)))
        return cls(folder, path, dsn, [free_port(), free_port()])

    async def command(self, *args: str) -> tuple[str, str]:
        """``python -m proxy ARGS --config CONFIG``: (stdout, stderr); it must exit 0."""
        return await command(self.config, *args)

    async def key(self, *options: str, name: str = "k") -> str:
        """A new key made by the command line (recorded in SECRETS)."""
        out, _ = await self.command("keys", "create", "--name", name, *options)
        SECRETS.add(out.strip())
        return out.strip()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[list[Served]]:
        """Both processes, one worker each, listening; stopped (SIGTERM) at the end."""
        servers: list[Served] = []
        try:
            for i, port in enumerate(self.ports):
                servers.append(await start_one(self.config, port, self.folder / f"p{i}"))
            for served in servers:
                await served.wait_log("listening")
            yield servers
        finally:
            for served in servers:
                if served.proc.returncode is None:
                    served.proc.terminate()
            for served in servers:
                await served.wait_exit()

    async def spend_until_refused(self, keys: list[str], clients: int) -> Counter[str]:
        """``clients`` clients over both processes (client n with ``keys[n % len(keys)]``)
        send priced chat requests until each gets a hard refusal (a 429 with
        ``x-should-retry: false``): how many were ``admitted``, refused while others
        were ``in flight``, and ``hard``."""
        outcomes: Counter[str] = Counter()
        body = orjson.dumps({"model": "m1", "messages": MESSAGES, "max_tokens": 10})

        async def client(n: int, http: aiohttp.ClientSession) -> None:
            url = f"http://127.0.0.1:{self.ports[n % len(self.ports)]}/v1/chat/completions"
            headers = {"Authorization": f"Bearer {keys[n % len(keys)]}", "x-fake-delay-ms": "20"}
            while True:
                async with http.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status == 200:
                        outcomes["admitted"] += 1
                        continue
                    assert resp.status == 429, resp.status
                    if resp.headers["x-should-retry"] == "false":
                        outcomes["hard"] += 1
                        return
                    outcomes["in flight"] += 1
                    await asyncio.sleep(0.01)  # what the SDK would wait (retry-after-ms) or less

        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(client(n, http) for n in range(clients)))
        return outcomes
