"""The ledger under adversity: the database stopped and restarted mid-load (a
throwaway PostgreSQL cluster, never the shared one), and SIGTERM to a real
``python -m proxy serve`` mid-load, with the database up and with it down."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.db import migrate
from proxy.state import STATE
from tests.support.inproc import MakeProxy
from tests.support.ledger import (
    assert_same_requests,
    ledger_config,
    ledger_rows,
    spooled_request_ids,
)
from tests.support.load import Load
from tests.support.served import replay_spool, serve, serve_without_database, write_config
from tests.support.servers import Cluster
from tests.support.wait import until


async def test_database_restart_mid_load_loses_and_doubles_nothing(
    pg_cluster: Cluster,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    database = cfg.Database(url=await pg_cluster.create_database(), timeout=1.0)
    await migrate(database)
    config = ledger_config(upstream.url, database, tmp_path / "spool", high_water=5)
    proxy = await make_proxy(config)
    writer = proxy.runner.app[STATE].ledger
    load = Load(proxy.url)

    async def written() -> bool:  # pooled connections exist when the database goes
        return writer.written > 0

    async def spooled() -> bool:
        return writer.spooled > 0

    try:
        await load.reach(30)
        await until(written)
        await asyncio.to_thread(pg_cluster.stop)
        await load.reach(len(load.completed) + 60)
        await until(spooled)
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy.url + "/readyz") as resp:
                assert resp.status == 200  # a database outage is no reason to stop serving
        await asyncio.to_thread(pg_cluster.start)
        await load.reach(len(load.completed) + 30)
    finally:
        await load.stop()
        if not pg_cluster.data.joinpath("postmaster.pid").exists():
            await asyncio.to_thread(pg_cluster.start)

    async def all_in() -> bool:  # the spool is replayed once the backoff lets it try
        return len(await ledger_rows(database)) >= len(load.completed)

    await until(all_in, timeout=30)
    assert load.failed == {}
    await proxy.runner.cleanup()
    rows = await ledger_rows(database)
    assert_same_requests(rows, load.completed)
    assert all(
        (r["prompt_tokens"], r["completion_tokens"], r["estimated"]) == (3, 8, False) for r in rows
    )
    assert "usage ledger: database unavailable" in caplog.text
    assert "usage ledger: the database is back" in caplog.text
    assert writer.spooled > 0
    assert writer.dropped == 0


async def test_sigterm_mid_load_leaves_exactly_the_completed_requests(
    upstream: FakeUpstream, migrated_pg: str, tmp_path: Path
) -> None:
    config = tmp_path / "proxy.json"
    write_config(config, upstream.url, migrated_pg, tmp_path / "spool", workers=2)
    async with serve("--config", str(config)) as served:
        await served.wait_log("listening", count=2)
        # Streams of ~0.2 s. The clients run in step (same pacing), so a count alone
        # can land between the streams' ends and the next requests' connects: the
        # signal is sent while answers are under way, and those must all finish.
        load = Load(served.url, stream_headers=_SLOW_STREAM)
        await load.reach(40, also=lambda: bool(load.answering))
        answering = set(load.answering)
        served.proc.send_signal(signal.SIGTERM)
        await load.stop()  # the clients stop when the proxy stops listening
        assert await served.wait_exit() == 0
    assert answering <= load.completed.keys(), load.failed  # finished during the drain
    rows = await ledger_rows(cfg.Database(url=migrated_pg))
    assert_same_requests(rows, load.completed)
    assert list((tmp_path / "spool").glob("*.jsonl")) == []


async def test_sigterm_with_the_database_down_spools_and_the_next_start_replays(
    upstream: FakeUpstream, migrated_pg: str, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    async with serve_without_database(upstream.url, spool) as served:
        load = Load(served.url, stream_headers=_SLOW_STREAM)
        await load.reach(20)
        served.proc.send_signal(signal.SIGTERM)
        await load.stop()
        assert await served.wait_exit() == 0
    spooled = spooled_request_ids(spool)
    assert spooled == sorted(load.completed)

    rows = await replay_spool(upstream.url, migrated_pg, spool)
    assert sorted(r["request_id"] for r in rows) == spooled


_SLOW_STREAM = {"x-fake-chunks": "10", "x-fake-gap-ms": "20"}
