"""The usage ledger through the real proxy: one row per request, exact or estimated
counts, on PostgreSQL (a fresh database on the shared server) and SQLite; the spool
when the database is unreachable; the ``usage`` report."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.cli import main
from proxy.config import schema as cfg
from proxy.db import Db
from proxy.exchange import Exchange
from proxy.state import STATE
from proxy.usage.record import Record
from proxy.usage.store import store_for
from tests.support.env import free_port
from tests.support.inproc import MakeProxy, Proxy
from tests.support.ledger import ledger_config, ledger_rows
from tests.support.wait import until

MESSAGES = [{"role": "user", "content": "say three words"}]


async def closed(proxy: Proxy) -> list[dict[str, Any]]:
    """Stop the proxy (the ledger drains on the way out) and read the ledger back."""
    await proxy.runner.cleanup()
    return await ledger_rows(proxy.state.config.database)


def by_uid(rows: list[dict[str, Any]], exchanges: list[Exchange]) -> list[dict[str, Any]]:
    """The rows in the order the exchanges finished; every exchange has exactly one."""
    found = {row["uid"]: row for row in rows}
    assert len(found) == len(rows) == len(exchanges)
    return [found[ex.uid] for ex in exchanges]


async def test_every_request_leaves_one_row_with_exact_counts(
    make_proxy: MakeProxy, upstream: FakeUpstream, database: cfg.Database, tmp_path: Path
) -> None:
    proxy = await make_proxy(ledger_config(upstream.url, database, tmp_path / "spool"))
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        await client.chat.completions.create(model="m1", messages=MESSAGES)
        async for _ in await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True
        ):
            pass
        async for _ in await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        ):
            pass
        await client.completions.create(model="m1", prompt="one two")
        await client.embeddings.create(model="e1", input=["a b", "c"])
        await client.responses.create(model="m1", input="hello there")
        for _ in range(2):  # a client may reuse its own request id: still two rows
            await client.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"X-Request-Id": "mine-1"}
            )
        with pytest.raises(openai.BadRequestError):  # refused by the upstream: no tokens
            await client.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"x-fake-status": "400"}
            )
    rows = by_uid(await closed(proxy), proxy.recorder.exchanges)

    tokens = [(r["prompt_tokens"], r["completion_tokens"], r["total_tokens"]) for r in rows]
    assert tokens == [
        (3, 8, 11),
        (3, 8, 11),
        (3, 8, 11),
        (2, 8, 10),
        (3, 0, 3),
        (2, 8, 10),
        (3, 8, 11),
        (3, 8, 11),
        (0, 0, 0),
    ]
    assert [r["endpoint"] for r in rows] == ["chat/completions"] * 3 + [
        "completions",
        "embeddings",
        "responses",
    ] + ["chat/completions"] * 3
    assert [r["stream"] for r in rows] == [False, True, True] + [False] * 6
    assert [r["status"] for r in rows] == [200] * 8 + [400]
    assert [r["request_id"] for r in rows[6:8]] == ["mine-1", "mine-1"]
    assert not any(r["estimated"] for r in rows)
    assert all(r["error"] is None for r in rows)
    assert {(r["model"], r["deployment"], r["key_id"]) for r in rows} == {
        ("m1", "upstream", None),
        ("e1", "upstream", None),
    }
    for row, ex in zip(rows, proxy.recorder.exchanges, strict=True):
        assert row["request_id"] == ex.request_id
        assert row["started_at"] == pytest.approx(ex.started_at, abs=1e-3)
        assert 0 < row["ttft_ms"] <= row["duration_ms"] < 10_000
    # The ids the proxy made are its uids: PostgreSQL stores them as NULL (READ_REQUEST_ID).
    made = [ex.request_id == "req_" + ex.uid for ex in proxy.recorder.exchanges]
    assert made == [True] * 6 + [False, False, True]
    if database.is_postgres:
        db = await Db.open(database)
        try:
            null = await db.fetchval("SELECT count(*) FROM usage_records WHERE request_id IS NULL")
        finally:
            await db.close()
        assert null == 7


async def test_cut_streams_and_vanished_clients_are_estimated(
    make_proxy: MakeProxy, upstream: FakeUpstream, migrated_pg: str, tmp_path: Path
) -> None:
    proxy = await make_proxy(
        ledger_config(upstream.url, cfg.Database(url=migrated_pg), tmp_path / "spool")
    )
    stream_body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
    plain_body = orjson.dumps({"model": "m1", "messages": MESSAGES})
    url = proxy.base + "/chat/completions"
    recorded = proxy.recorder.exchanges

    async def finished(n: int) -> bool:
        return len(recorded) >= n

    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, extra_headers={"x-fake-cut": "4"}
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    async with aiohttp.ClientSession() as http:
        # The client reads three events and leaves while the upstream stalls.
        async with http.post(url, data=stream_body, headers={"x-fake-stall": "3"}) as resp:
            for _ in range(3):
                await resp.content.readuntil(b"\n\n")
        await until(lambda: finished(2))
        # The client leaves a non-streamed call before the answer.
        task = asyncio.create_task(
            http.post(url, data=plain_body, headers={"x-fake-delay-ms": "10000"})
        )
        await upstream.wait_received(3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await until(lambda: finished(3))
        async with http.post(url, data=b"{not json") as resp:  # never reaches an upstream
            assert resp.status == 400
        huge = orjson.dumps({"model": "m" * 5000, "messages": MESSAGES})
        async with http.post(url, data=huge) as resp:
            assert resp.status == 200
    rows = by_uid(await closed(proxy), recorded)

    cut, left_stream, left_plain, refused, bloated = rows
    assert (cut["error"], cut["status"], cut["estimated"]) == ("UpstreamError", 200, True)
    assert cut["completion_tokens"] == 4  # the events relayed before the cut
    assert cut["prompt_tokens"] == -(-recorded[0].body_bytes // 4) > 0
    assert (left_stream["error"], left_stream["estimated"]) == ("client_disconnected", True)
    assert left_stream["completion_tokens"] == 3
    assert left_stream["prompt_tokens"] == -(-len(stream_body) // 4)
    assert (left_plain["error"], left_plain["status"]) == ("client_disconnected", 499)
    assert (left_plain["estimated"], left_plain["completion_tokens"]) == (True, 0)
    assert left_plain["prompt_tokens"] == -(-len(plain_body) // 4)
    assert left_plain["total_tokens"] == left_plain["prompt_tokens"]
    assert (refused["error"], refused["status"], refused["deployment"]) == ("BadRequest", 400, "")
    assert (refused["total_tokens"], refused["estimated"]) == (0, False)
    assert bloated["model"] == "m" * 256  # a client cannot bloat the ledger


async def test_database_down_spools_and_the_next_start_replays(
    make_proxy: MakeProxy, upstream: FakeUpstream, migrated_pg: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    down = cfg.Database(url=f"postgresql://postgres@127.0.0.1:{free_port()}/x", timeout=1.0)
    first = await make_proxy(ledger_config(upstream.url, down, spool))
    async with openai.AsyncOpenAI(base_url=first.base, api_key="x", max_retries=0) as client:
        for _ in range(10):
            await client.chat.completions.create(model="m1", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:
        async with http.get(first.url + "/readyz") as resp:
            assert resp.status == 200  # the database is no reason to stop serving
    writer = first.runner.app[STATE].ledger
    await first.runner.cleanup()
    assert (writer.written, writer.spooled, writer.dropped) == (0, 10, 0)
    lines = [line for f in spool.glob("*.jsonl") for line in f.read_bytes().splitlines()]
    assert len(lines) == 10

    database = cfg.Database(url=migrated_pg)
    second = await make_proxy(ledger_config(upstream.url, database, spool))

    async def replayed() -> bool:
        return len(await ledger_rows(database)) == 10

    await until(replayed)
    rows = by_uid(await closed(second), first.recorder.exchanges)
    assert all((r["prompt_tokens"], r["completion_tokens"]) == (3, 8) for r in rows)
    assert list(spool.glob("*.jsonl")) == []
    assert second.runner.app[STATE].ledger.dropped == 0


def _record(n: int, model: str, key: str | None, started_at: float) -> Record:
    return Record(
        uid=f"{n:032x}",
        request_id=f"req_{n}",
        key_id=key,
        endpoint="chat/completions",
        model=model,
        deployment="d1",
        prompt_tokens=10,
        completion_tokens=n,
        total_tokens=10 + n,
        cached_tokens=0,
        reasoning_tokens=0,
        estimated=False,
        status=500 if n % 5 == 0 else 200,
        stream=True,
        error="UpstreamError" if n % 5 == 0 else None,
        started_at=started_at,
        duration_ms=10.0 * n,
        ttft_ms=None,
    )


async def test_usage_report_is_the_same_on_both_backends(
    migrated_pg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    records = [
        _record(n, "a" if n % 2 else "b", "k1" if n <= 5 else None, now - n) for n in range(1, 11)
    ]
    records.append(_record(11, "a", "k1", now - 7200))  # outside --since 1h
    tables = []
    sqlite = cfg.Database(sqlite_path=str(tmp_path / "ledger.db"))
    for database in (cfg.Database(url=migrated_pg), sqlite):
        db = await Db.open(database)
        try:
            await store_for(db).write(records)
            await store_for(db).write(records[3:])  # a replayed batch changes nothing
        finally:
            await db.close()
        assert len(await ledger_rows(database)) == len(records)
        config = tmp_path / "proxy.json"
        config.write_bytes(
            orjson.dumps(
                {
                    "database": {"url": database.url, "sqlite_path": database.sqlite_path},
                    "models": [{"name": "a", "deployments": [{"base_url": "http://x"}]}],
                }
            )
        )
        for by in ("model", "key", "deployment"):  # the command runs its own event loop
            args = ["usage", "--since", "1h", "--by", by, "--config", str(config)]
            assert await asyncio.to_thread(main, args) == 0
        tables.append(capsys.readouterr().out)
    assert tables[0] == tables[1]
    lines = [line.split() for line in tables[0].splitlines()]
    assert lines[0] == [
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "cost",
        "errors",
        "p50_ms",
        "p95_ms",
    ]
    # a: n = 1, 3, 5, 7, 9 (10…90 ms); b: n = 2, 4, 6, 8, 10 (20…100 ms); n = 5, 10 failed.
    # Percentiles from the histograms (buckets ≤10, ≤20, ≤50, ≤100 ms), linear within:
    # a has 1, 0, 2, 2 there: p50 at rank 2.5 = 20 + 30 x 1.5/2, p95 at 4.75 = 50 + 50 x 1.75/2;
    # b has 0, 1, 1, 3: p50 = 50 + 50 x 0.5/3, p95 = 50 + 50 x 2.75/3.
    assert lines[1] == ["a", "5", "50", "25", "0.00", "1", "42.5", "93.8"]
    assert lines[2] == ["b", "5", "50", "30", "0.00", "1", "58.3", "95.8"]
    assert lines[3][:2] == ["key", "requests"]
    assert [line[:2] for line in lines[4:6]] == [["-", "5"], ["k1", "5"]]
    assert lines[7][:3] == ["d1", "10", "100"]


def test_usage_report_says_when_the_ledger_is_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"database: {{sqlite_path: '{tmp_path / 'none.db'}'}}\n"
        "models: [{name: a, deployments: [{base_url: 'http://x'}]}]\n"
    )
    assert main(["usage", "--config", str(config)]) == 1
    assert "no ledger at" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["usage", "--since", "yesterday"])


async def test_the_key_id_is_recorded_and_the_key_never(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    from tests.support.keys import declare, keyed

    value, key = declare()
    proxy = await make_proxy(keyed(upstream.url, key), auth=True)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=value, max_retries=0) as client:
        await client.chat.completions.create(model="m1", messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"Authorization": "Bearer nope"}
            )
    ok, refused = by_uid(await closed(proxy), proxy.recorder.exchanges)
    assert (ok["key_id"], ok["status"], ok["total_tokens"]) == (key.id, 200, 11)
    assert (refused["key_id"], refused["status"], refused["error"]) == (None, 401, "Unauthorized")
    assert value not in str([ok, refused])
