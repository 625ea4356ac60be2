"""Team limits end to end: two ``serve`` processes sharing Redis and PostgreSQL, teams
and keys made by the command line; the team's requests per minute and its budget hold
across both processes and every key of the team; the ledger and ``usage --by team``
name the team."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import aiohttp
import orjson
import pytest
import yaml

from bench.fake_upstream import FakeUpstream
from tests.support.env import PYTHON, REDIS_URL, free_port, proxy_env
from tests.support.leaks import SECRETS
from tests.support.served import Served
from tests.support.wait import until

D = Decimal
MESSAGES = [{"role": "user", "content": "hi"}]
COST = D("0.017")  # "hi" at 0.001 a prompt token, 8 answer tokens at 0.002


@dataclass
class Pair:
    """Two proxy processes with one config (one Redis prefix, one database)."""

    folder: Path
    config: Path
    dsn: str
    ports: list[int]

    async def command(self, *args: str) -> tuple[str, str]:
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "proxy", *args, "--config", str(self.config),
            env=proxy_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        async with asyncio.timeout(30):
            out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode(), err.decode()

    async def key(self, team: str) -> str:
        out, _ = await self.command("keys", "create", "--name", "k", "--team", team)
        SECRETS.add(out.strip())
        return out.strip()


@pytest.fixture
async def pair(tmp_path: Path, migrated_pg: str, redis_prefix: str, upstream: FakeUpstream) -> Pair:
    config = {
        "models": [
            {
                "name": "m1",
                "price": {"prompt": "1000", "completion": "2000"},
                "deployments": [{"base_url": upstream.url, "name": "fake"}],
            }
        ],
        "server": {"host": "127.0.0.1", "access_log": "off", "grace_period": 5},
        "database": {"url": migrated_pg},
        "redis": {"url": REDIS_URL, "key_prefix": redis_prefix, "timeout": 5.0},
        "limits": {"flush_interval": 0.1},
        "usage": {"spool_dir": "spool", "flush_interval": 0.05},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    return Pair(tmp_path, path, migrated_pg, [free_port(), free_port()])


async def serve(pair: Pair) -> list[Served]:
    servers = []
    for i, port in enumerate(pair.ports):
        home = pair.folder / f"p{i}"
        home.mkdir()
        proc = await asyncio.create_subprocess_exec(
            PYTHON, "-m", "proxy", "serve", "--config", str(pair.config), "--workers", "1",
            "--port", str(port), env=proxy_env(), cwd=home, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        servers.append(Served(proc, port))
    for served in servers:
        await served.wait_log("listening")
    return servers


async def stop(servers: list[Served]) -> None:
    for served in servers:
        if served.proc.returncode is None:
            served.proc.terminate()
    for served in servers:
        await served.wait_exit()


async def test_a_teams_rpm_holds_across_two_processes_and_all_its_keys(pair: Pair) -> None:
    rpm = 12
    await pair.command("teams", "create", "--name", "search", "--id", "search", "--rpm", str(rpm))
    keys = [await pair.key("search") for _ in range(3)]  # no limits of their own
    servers = await serve(pair)
    body = orjson.dumps({"model": "m1", "messages": MESSAGES})
    statuses: Counter[int] = Counter()
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession() as http:

            async def one(i: int) -> None:
                port = pair.ports[i % 2]
                headers = {"Authorization": f"Bearer {keys[i % 3]}"}
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                async with http.post(url, data=body, headers=headers) as resp:
                    statuses[resp.status] += 1
                    if resp.status == 429:
                        assert "team search" in (await resp.json())["error"]["message"]

            await asyncio.gather(*(one(i) for i in range(36)))
    finally:
        await stop(servers)
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, statuses
    # One bucket for the team, whichever key and process: a minute's worth at once.
    assert rpm <= statuses[200] <= rpm + math.ceil(rpm * elapsed / 60), (statuses, elapsed)
    out, _ = await pair.command("usage", "--by", "team", "--since", "1h")
    line = next(line for line in out.splitlines() if line.startswith("search"))
    assert line.split()[1] == "36"  # every request, the refused ones too, under the team


async def test_a_team_budget_its_keys_cannot_overshoot_together(pair: Pair) -> None:
    """Sixteen clients with four keys of one team, over two processes, spend the team's
    budget of 0.3 (about 17 requests); each goes on until it gets a hard refusal."""
    await pair.command("teams", "create", "--name", "t", "--id", "t", "--budget", "0.3",
                       "--budget-period", "total")  # fmt: skip
    keys = [await pair.key("t") for _ in range(4)]
    servers = await serve(pair)
    outcomes: Counter[str] = Counter()
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "max_tokens": 10})
    try:
        async with aiohttp.ClientSession() as http:

            async def client(n: int) -> None:
                url = f"http://127.0.0.1:{pair.ports[n % 2]}/v1/chat/completions"
                headers = {"Authorization": f"Bearer {keys[n % 4]}", "x-fake-delay-ms": "20"}
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
                        await asyncio.sleep(0.01)

            await asyncio.gather(*(client(n) for n in range(16)))
    finally:
        await stop(servers)
    assert outcomes["hard"] == 16
    assert outcomes["admitted"] >= 5

    async def recorded() -> bool:
        shown = orjson.loads((await pair.command("teams", "show", "t", "--json"))[0])
        return D(str(shown["spent"])) == outcomes["admitted"] * COST

    await until(recorded)
    spent = outcomes["admitted"] * COST
    assert spent <= D("0.3")  # never over, whichever key and process
    assert D("0.3") - spent < D("0.039")  # and used up (less than one worst case left)
