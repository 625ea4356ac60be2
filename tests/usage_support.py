"""Helpers for the usage ledger tests: reading the ledger back from either backend,
configs, a throwaway PostgreSQL cluster that tests may stop and start, client load, and
``python -m proxy serve`` processes (also used by the serve and replica tests)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import sqlite3
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import orjson

from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.usage.record import COLUMNS
from proxy.usage.store import READ_REQUEST_ID

from .conftest import PYTHON, UPSTREAM_KEY, free_port, proxy_env, watch_output

PG_BIN = Path(os.environ.get("MORNGPT_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def ledger_config(
    upstream_url: str, database: cfg.Database, spool_dir: Path | str, **usage: Any
) -> cfg.Config:
    """Quick-start config with this database and a fast-flushing ledger."""
    settings = cfg.Ledger(spool_dir=str(spool_dir), **{"flush_interval": 0.05, **usage})
    config = quick_start(upstream_url, UPSTREAM_KEY)
    return msgspec.structs.replace(config, database=database, usage=settings)


async def ledger_rows(database: cfg.Database) -> list[dict[str, Any]]:
    """Every ledger row, normalised to Python values that compare across backends."""
    if database.is_postgres:
        conn = await asyncpg.connect(database.url)
        try:
            read = f"{READ_REQUEST_ID} AS request_id"  # NULL: the proxy made it
            columns = ", ".join(read if c == "request_id" else c for c in COLUMNS)
            found = await conn.fetch(f"SELECT {columns} FROM usage_records")
        finally:
            await conn.close()
        rows = [dict(r) for r in found]
        for row in rows:
            row["uid"] = row["uid"].hex
            row["started_at"] = row["started_at"].timestamp()
        return rows
    with contextlib.closing(sqlite3.connect(database.sqlite_path)) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage_records")]
    for row in rows:
        row["estimated"] = bool(row["estimated"])
        row["stream"] = bool(row["stream"])
    return rows


async def until(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Poll an async condition until it holds (fails the test after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class Cluster:
    """A private PostgreSQL server in a temporary directory, on a free port; only the
    test that started it ever stops it."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="morngpt-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.admin_dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync")

    def start(self) -> None:
        """Start and wait until it accepts connections (pg_ctl -w)."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = str(self.dir / "log")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", log, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def _run(self, program: str, *args: str) -> None:
        command = [str(PG_BIN / program), *args]
        if os.geteuid() == 0:  # initdb and postgres refuse to run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def remove(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)

    async def create_database(self) -> str:
        name = f"ledger_{os.urandom(4).hex()}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


@contextlib.contextmanager
def cluster() -> Iterator[Cluster]:
    """A started throwaway cluster, removed afterwards."""
    if not (PG_BIN / "initdb").exists():
        import pytest

        pytest.skip(f"no PostgreSQL binaries in {PG_BIN}")
    server = Cluster()
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


STREAM = orjson.dumps(
    {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "a b c"}]}
)
PLAIN = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "a b c"}]})


class Load:
    """``clients`` concurrent clients sending streamed and plain chat requests until
    stopped, each request with its own X-Request-Id on a fresh connection.
    ``completed`` maps each request whose whole answer arrived to when it did (its status
    counted in ``statuses``), ``failed`` each request cut off (a connection error, or no
    answer in 10 s) to why. A client stops at its first failure (the proxy stopped
    listening) unless ``keep_going``: then it goes on, as behind a load balancer."""

    def __init__(
        self,
        url: str,
        clients: int = 4,
        stream_headers: dict[str, str] | None = None,
        keep_going: bool = False,
    ) -> None:
        self.url = url + "/v1/chat/completions"
        self.completed: dict[str, float] = {}
        self.statuses: Counter[int] = Counter()
        self.failed: dict[str, str] = {}
        self.stream_headers = stream_headers or {}
        self.keep_going = keep_going
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(n)) for n in range(clients)]

    async def reach(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` requests have completed."""

        async def enough() -> bool:
            return len(self.completed) >= count

        await until(enough, timeout)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, n: int) -> None:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                rid = f"load-{n}-{i}"
                stream = i % 2 == 1
                headers = {"X-Request-Id": rid, **(self.stream_headers if stream else {})}
                try:
                    async with asyncio.timeout(10):
                        async with http.post(
                            self.url, data=STREAM if stream else PLAIN, headers=headers
                        ) as resp:
                            await resp.read()
                except (aiohttp.ClientError, TimeoutError) as exc:
                    self.failed[rid] = repr(exc)
                    if not self.keep_going:
                        return
                    await asyncio.sleep(0.05)  # (a refused connect is instant)
                    continue
                self.completed[rid] = time.monotonic()
                self.statuses[resp.status] += 1


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


def spooled_request_ids(spool: Path) -> list[str]:
    """The request ids of the rows in the spool files, sorted."""
    lines = [line for f in spool.glob("*.jsonl") for line in f.read_bytes().splitlines()]
    return sorted(orjson.loads(line)[1] for line in lines if line)  # [uid, request_id, ...]


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


def assert_same_requests(rows: list[dict[str, Any]], completed: list[str]) -> None:
    """The ledger holds exactly the completed requests, each once."""
    ids = [row["request_id"] for row in rows]
    missing = sorted(set(completed) - set(ids))
    extra = sorted(set(ids) - set(completed))
    doubled = len(ids) - len(set(ids))
    assert (missing, extra, doubled) == ([], [], 0), (len(completed), len(ids))
