"""Several replicas on one machine, as separate pods would be: ``python -m proxy serve``
processes on their own ports, each with its own working directory (so its own usage
spool), sharing one Redis (a key prefix of this test's own) and one fresh PostgreSQL
database (migrated with ``python -m proxy migrate``), with a key made by ``python -m
proxy keys create``. The official SDK drives them concurrently.

What must hold with replicas: per-key limits are global (not per replica), every
request that got an answer has exactly one usage row whichever replica served it, and
SIGTERM to one replica mid-load loses nothing (its streams finish, its rows are
written, clients go on at the other replicas as behind a load balancer).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import openai
import pytest
import yaml

from bench.fake_upstream import FakeUpstream
from proxy.usage.store import READ_REQUEST_ID
from tests.support.env import REDIS_URL, free_port
from tests.support.leaks import SECRETS, watch_output
from tests.support.served import Served, command, start_one
from tests.support.wait import until

MESSAGES = [{"role": "user", "content": "one two three"}]


@dataclass
class Replica:
    served: Served
    client: openai.AsyncOpenAI  # the SDK, pointed at this replica alone


@dataclass
class Fleet:
    """The replicas of one test and what they share."""

    folder: Path
    config: Path
    dsn: str
    replicas: list[Replica] = field(default_factory=list)

    async def command(self, *args: str) -> tuple[str, str]:
        """``python -m proxy ARGS --config F``: (stdout, stderr); fails on an error."""
        return await command(self.config, *args)

    async def create_key(self, *limits: str) -> tuple[str, str]:
        """A new API key in the shared database, by the CLI: (key, key id)."""
        out, err = await self.command("keys", "create", "--name", "load", *limits)
        key = out.strip()
        SECRETS.add(key)
        watch_output([err])
        match = re.search(r"created (\S+)", err)
        assert match, err
        return key, match[1]

    async def start(self, count: int, key: str) -> None:
        """Start ``count`` replicas (in parallel) and wait until each listens."""
        await asyncio.gather(*(self._start(len(self.replicas) + i, key) for i in range(count)))

    async def _start(self, index: int, key: str) -> None:
        served = await start_one(self.config, free_port(), self.folder / f"replica-{index}")
        base = served.url + "/v1"
        client = openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=30)
        self.replicas.append(Replica(served, client))
        await served.wait_log("listening")

    async def rows(self) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.dsn)
        try:
            return await conn.fetch(
                f"SELECT {READ_REQUEST_ID} AS request_id, key_id, status FROM usage_records"
            )
        finally:
            await conn.close()

    async def wait_rows(self, request_ids: Collection[str]) -> list[asyncpg.Record]:
        """The ledger, once it holds a row for each of ``request_ids`` (batches land by
        time, each replica's on its own, so a count could be met by others' rows)."""
        rows: list[asyncpg.Record] = []

        async def enough() -> bool:
            nonlocal rows
            rows = await self.rows()
            return set(request_ids) <= {r["request_id"] for r in rows}

        await until(enough, timeout=20)
        return rows


@pytest.fixture
async def fleet(
    tmp_path: Path, pg_dsn: str, redis_prefix: str, upstream: FakeUpstream
) -> AsyncIterator[Fleet]:
    """One config for every replica (as a ConfigMap would be), an empty database that
    ``migrate`` prepares (as the deploy step does); replicas are started by the test
    and stopped (SIGTERM, then SIGKILL) afterwards."""
    config = {
        "models": [{"name": "m1", "deployments": [{"base_url": upstream.url, "name": "fake"}]}],
        "server": {"host": "127.0.0.1", "grace_period": 10, "access_log": "off"},
        "database": {"url": pg_dsn, "timeout": 5.0},
        # A generous bound: on a busy 2-core box a slow call must not make a replica
        # fall back to its in-process buckets (that is another test's subject).
        "redis": {"url": REDIS_URL, "key_prefix": redis_prefix, "timeout": 2.0},
        # Relative: each replica's own working directory, as each pod has its own disk.
        "usage": {"spool_dir": "spool", "flush_interval": 0.05},
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    fleet = Fleet(tmp_path, path, pg_dsn)
    out, _ = await fleet.command("migrate")
    assert "applied" in out
    try:
        yield fleet
    finally:
        for replica in fleet.replicas:
            await replica.client.close()
            if replica.served.proc.returncode is None:
                replica.served.proc.send_signal(signal.SIGTERM)
        for replica in fleet.replicas:
            try:
                await replica.served.wait_exit(timeout=20)
            except TimeoutError:
                replica.served.proc.kill()
                await replica.served.wait_exit()


async def ask(client: openai.AsyncOpenAI, request_id: str) -> int:
    """One chat completion; the HTTP status it got."""
    try:
        await client.chat.completions.create(
            model="m1", messages=MESSAGES, extra_headers={"X-Request-Id": request_id}
        )
    except openai.APIStatusError as refused:
        return refused.status_code
    return 200


async def test_limits_are_global_and_every_request_has_one_usage_row(fleet: Fleet) -> None:
    rpm = 20
    key, key_id = await fleet.create_key("--rpm", str(rpm))
    await fleet.start(3, key)
    requests = 60  # three times the limit: each replica alone would admit all of them
    gate = asyncio.Semaphore(12)
    started = time.monotonic()

    async def one(i: int) -> tuple[int, int, str]:
        replica = i % len(fleet.replicas)
        async with gate:
            rid = f"lim-{i}"
            return replica, await ask(fleet.replicas[replica].client, rid), rid

    results = await asyncio.gather(*(one(i) for i in range(requests)))
    elapsed = time.monotonic() - started
    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    # One shared bucket: a full minute's worth at once, plus what refilled meanwhile.
    assert rpm <= statuses[200] <= rpm + math.ceil(rpm * elapsed / 60), (statuses, elapsed)
    by_replica = Counter(replica for replica, status, _ in results if status == 200)
    assert len(by_replica) >= 2, f"admissions all on one replica: {by_replica}"

    rows = await fleet.wait_rows([rid for *_, rid in results])
    assert Counter(r["request_id"] for r in rows) == Counter(rid for *_, rid in results)
    seen = {r["request_id"]: r["status"] for r in rows}
    assert seen == {rid: status for _, status, rid in results}
    # (Refused requests are in the ledger too; the gate does not hand their key id to
    # the exchange, so only admitted rows name the key.)
    assert {r["key_id"] for r in rows if r["status"] == 200} == {key_id}


@dataclass
class Load:
    """Clients that alternate streams and plain requests, each under a fresh request id,
    until stopped. Like a load balancer, a client whose replica refuses the connection
    or answers 503 (draining) goes on at the next replica.

    ``answered``: every attempt that got an HTTP answer (id → status); ``refused``: the
    attempts that did not; ``broken``: streams that broke off after they started;
    ``streams``: (replica, start, end) of each complete stream; ``fresh``: per replica,
    the streams in flight that have sent their first event but not their fourth (so
    most of each is still to come)."""

    replicas: list[Replica]
    answered: dict[str, int] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    streams: list[tuple[int, float, float]] = field(default_factory=list)
    fresh: defaultdict[int, set[str]] = field(default_factory=lambda: defaultdict(set))
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    ids: itertools.count[int] = field(default_factory=itertools.count)

    async def client(self, replica: int) -> None:
        for turn in itertools.count():
            if self.stopping.is_set():
                return
            rid = f"load-{next(self.ids)}"
            try:
                if turn % 2:
                    status = await self.stream(replica, rid)
                else:
                    status = await ask(self.replicas[replica].client, rid)
                self.answered[rid] = status
            except openai.APIConnectionError:
                self.refused.append(rid)
                status = 503
            if status == 503:  # draining or gone: on to the next replica
                replica = (replica + 1) % len(self.replicas)

    async def stream(self, replica: int, rid: str) -> int:
        # Slow enough to be mid-stream when SIGTERM comes: 12 events, 50 ms apart.
        headers = {"X-Request-Id": rid, "x-fake-chunks": "10", "x-fake-gap-ms": "50"}
        started = time.monotonic()
        fresh = self.fresh[replica]
        try:
            stream = await self.replicas[replica].client.chat.completions.create(
                model="m1", messages=MESSAGES, stream=True, extra_headers=headers
            )
        except openai.APIStatusError as refused:
            return refused.status_code
        chunks = []
        try:
            async for chunk in stream:
                chunks.append(chunk)
                if len(chunks) == 1:
                    fresh.add(rid)
                elif len(chunks) == 4:
                    fresh.discard(rid)
        except openai.APIError:  # an error event or a broken connection mid-answer
            self.broken.append(rid)
            return 200
        finally:
            fresh.discard(rid)
        assert chunks[-1].choices[0].finish_reason == "stop", f"{rid} ended early"
        self.streams.append((replica, started, time.monotonic()))
        return 200

    def has(self, answers: int = 0, fresh_on: int | None = None) -> Callable[[], Awaitable[bool]]:
        """A condition for ``until``: this many answers, and a fresh stream there."""

        async def ready() -> bool:
            busy = fresh_on is None or bool(self.fresh[fresh_on])
            return len(self.answered) >= answers and busy

        return ready


async def test_sigterm_to_one_replica_mid_load_loses_nothing(fleet: Fleet) -> None:
    key, _ = await fleet.create_key()
    await fleet.start(2, key)
    load = Load(fleet.replicas)
    clients = [asyncio.create_task(load.client(n % 2)) for n in range(6)]
    victim = fleet.replicas[0].served
    try:
        await until(load.has(answers=20, fresh_on=0), timeout=30)
        victim.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await victim.wait_log("draining")
        await until(load.has(answers=len(load.answered) + 20), timeout=30)  # others go on
        assert await victim.wait_exit(timeout=30) == 0
    finally:
        load.stopping.set()
        await asyncio.gather(*clients)
    assert load.broken == [], "streams cut by the shutdown"
    drained = [s for s in load.streams if s[0] == 0 and s[1] < signalled < s[2]]
    assert drained, "no stream was in flight on the stopped replica: nothing was drained"
    assert set(load.answered.values()) <= {200, 503}, Counter(load.answered.values())
    assert " stopped" in "".join(victim.log)
    rows = await fleet.wait_rows(load.answered)
    count = Counter(r["request_id"] for r in rows)
    # Every answer is in the ledger exactly once; an attempt the client never got an
    # answer to may have been recorded (it reached a replica), but never twice.
    assert {rid: count[rid] for rid in load.answered} == dict.fromkeys(load.answered, 1)
    assert set(count) <= set(load.answered) | set(load.refused)
    assert max(count.values()) == 1
