"""Two ``python -m proxy serve`` processes with one config: one Redis prefix, one
PostgreSQL database, one priced model on the fake upstream (the ``pair`` fixture; the
team limit and budget tests)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .env import REDIS_URL, free_port
from .leaks import SECRETS
from .served import Served, command, start_one


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
