"""Team limits end to end: two ``serve`` processes sharing Redis and PostgreSQL, teams
and keys made by the command line; the team's requests per minute and its budget hold
across both processes and every key of the team; the ledger and ``usage --by team``
name the team."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from decimal import Decimal

import aiohttp
import orjson

from proxy.config import schema as cfg
from tests.support.ledger import ledger_rows, spooled_rows
from tests.support.pair import Pair
from tests.support.wait import until

D = Decimal
MESSAGES = [{"role": "user", "content": "hi"}]
COST = D("0.017")  # "hi" at 0.001 a prompt token, 8 answer tokens at 0.002


async def test_a_teams_rpm_holds_across_two_processes_and_all_its_keys(pair: Pair) -> None:
    rpm = 12
    await pair.command("teams", "create", "--name", "search", "--id", "search", "--rpm", str(rpm))
    keys = [await pair.key("--team", "search") for _ in range(3)]  # no limits of their own
    async with pair.serving() as servers:
        body = orjson.dumps({"model": "m1", "messages": MESSAGES})
        statuses: Counter[int] = Counter()
        started = time.monotonic()
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
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, statuses
    # One bucket for the team, whichever key and process: a minute's worth at once.
    assert rpm <= statuses[200] <= rpm + math.ceil(rpm * elapsed / 60), (statuses, elapsed)
    # Every request, the refused ones too, under the team: committed, or spooled (the
    # ledger's promise when a write is late: the next process replays the spool). CI
    # saw one process spool all its 18 under load, since this pair's ledger gives a
    # write 50 ms (usage.flush_interval).
    committed = await ledger_rows(cfg.Database(url=pair.dsn))
    spooled = [row for home in ("p0", "p1") for row in spooled_rows(pair.folder / home / "spool")]
    logs = {f"{s.url}, exit {s.proc.returncode}": "".join(s.log[-40:]) for s in servers}
    rows = committed + spooled
    assert {row["team_id"] for row in rows} == {"search"}, logs
    assert len({row["request_id"] for row in rows}) == 36, (len(committed), len(spooled), logs)
    # The report reads the committed ones under the team.
    out, _ = await pair.command("usage", "--by", "team", "--since", "1h")
    line = next(line for line in out.splitlines() if line.startswith("search"))
    assert int(line.split()[1]) == len(committed), out


async def test_a_team_budget_its_keys_cannot_overshoot_together(pair: Pair) -> None:
    """Sixteen clients with four keys of one team, over two processes, spend the team's
    budget of 0.3 (about 17 requests); each goes on until it gets a hard refusal."""
    await pair.command("teams", "create", "--name", "t", "--id", "t", "--budget", "0.3",
                       "--budget-period", "total")  # fmt: skip
    keys = [await pair.key("--team", "t") for _ in range(4)]
    async with pair.serving():
        outcomes = await pair.spend_until_refused(keys, clients=16)
    assert outcomes["hard"] == 16
    assert outcomes["admitted"] >= 5

    async def recorded() -> bool:
        shown = orjson.loads((await pair.command("teams", "show", "t", "--json"))[0])
        return D(str(shown["spent"])) == outcomes["admitted"] * COST

    await until(recorded)
    spent = outcomes["admitted"] * COST
    assert spent <= D("0.3")  # never over, whichever key and process
    assert D("0.3") - spent < D("0.039")  # and used up (less than one worst case left)
