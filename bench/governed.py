"""The two proxy configurations the benchmark compares, written as config files.

- *bare*: one wildcard model in front of the fake upstream, no API keys (``serve
  --no-auth``), so no limits either, and no access log. What cannot be switched off
  stays on: metrics, and the usage ledger on its embedded SQLite default.
- *governed*: what a production deployment runs: an API key with request and token
  limits kept in Redis, the usage ledger in PostgreSQL, metrics and the access log.
  The limits are far above what the benchmark sends, so every request pays for the
  limiter's round trip and none is refused.

The governed run uses a throwaway Redis (its own ``redis-server`` on a free port) and
a uniquely named PostgreSQL database on the server at ``$MORNGPT_BENCH_PG`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``), dropped afterwards. ``missing()``
names what the tree lacks for governed mode, so that a tree without it reports the
mode as unavailable instead of measuring something else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import importlib.util
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec

from proxy.config import schema as cfg
from proxy.config.base import WILDCARD
from proxy.config.load import load

from .procs import ROOT, Service, free_port, python

PG_ADMIN = os.environ.get("MORNGPT_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

BENCH_KEY = "sk-bench-4f9c2a7e0d1b6385"
# Per minute: far above anything a 2-core benchmark sends.
_HUGE = 1_000_000_000

# What governed mode is made of, and where in the tree each part lives.
_PARTS = {
    "proxy.governance.gate": "API keys + Redis rate limits (issue #4)",
    "proxy.usage.writer": "usage ledger (issue #5)",
    "proxy.ops.accesslog": "metrics and access log (issue #6)",
}


def missing() -> list[str]:
    """The parts of governed mode this tree does not have (empty: it can run)."""
    return [what for module, what in _PARTS.items() if importlib.util.find_spec(module) is None]


def _server(port: int, workers: int, **extra: Any) -> dict[str, Any]:
    server: dict[str, Any] = {"host": "127.0.0.1", "port": port, "workers": workers}
    fields = cfg.Server.__struct_fields__
    server.update({k: v for k, v in extra.items() if k in fields})
    return server


def bare(upstream: str, port: int, workers: int) -> dict[str, Any]:
    """The bare config (serve it with ``--no-auth``)."""
    return {
        "server": _server(port, workers, access_log="off"),
        "auth": {"enabled": False},
        "models": [{"name": WILDCARD, "deployments": [{"base_url": upstream, "name": "fake"}]}],
    }


def governed(upstream: str, port: int, workers: int, redis: str, pg: str) -> dict[str, Any]:
    """The governed config: ``BENCH_KEY`` with limits in Redis, the ledger in
    PostgreSQL, metrics and the access log."""
    key = {
        "id": "bench",
        "sha256": hashlib.sha256(BENCH_KEY.encode()).hexdigest(),
        "rpm": _HUGE,
        "tpm": _HUGE,
    }
    return {
        "server": _server(port, workers, access_log="info"),
        "models": [{"name": WILDCARD, "deployments": [{"base_url": upstream, "name": "fake"}]}],
        "keys": [key],
        "redis": {"url": redis},
        "database": {"url": pg},
    }


def write(config: dict[str, Any], path: Path) -> cfg.Config:
    """Write ``config`` as JSON and load it back the way ``serve`` will (ConfigError
    names the field at fault)."""
    path.write_bytes(msgspec.json.encode(config))
    return load(path)


@contextlib.contextmanager
def backends(workdir: Path, upstream: str) -> Iterator[tuple[str, str]]:
    """A throwaway Redis and a fresh, migrated PostgreSQL database: (redis URL, DSN)."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    redis = Service("redis", [*argv, "--appendonly", "no"], workdir, workdir / "redis.log")
    name = f"morngpt_bench_{os.getpid()}"
    try:
        redis.wait_for("Ready to accept connections")
        url = f"redis://127.0.0.1:{port}/0"
        asyncio.run(_execute(PG_ADMIN, f'CREATE DATABASE "{name}"'))
        dsn = f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"
        path = workdir / "migrate.json"
        write(governed(upstream, 0, 1, url, dsn), path)
        migrate = [python(), "-m", "proxy", "migrate", "--config", str(path)]
        subprocess.run(migrate, cwd=workdir, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
        yield url, dsn
    finally:
        redis.stop()
        with contextlib.suppress(OSError, asyncpg.PostgresError):
            asyncio.run(_execute(PG_ADMIN, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()
