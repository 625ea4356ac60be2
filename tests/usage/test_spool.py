"""The spool on a real filesystem (claims, torn lines, counts), and the writer's
bounded shutdown against a database that accepts connections and never answers.

Two ``Spool`` objects stand for two processes: ``flock`` locks belong to open file
descriptions, so they exclude each other within one process exactly as across two."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import openai
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.state import STATE
from proxy.usage.record import Record
from proxy.usage.spool import Spool
from tests.support.inproc import MakeProxy
from tests.support.ledger import ledger_config

_BASE = Record(
    uid="",
    request_id="",
    key_id=None,
    endpoint="chat/completions",
    model="m",
    deployment="d",
    prompt_tokens=1,
    completion_tokens=2,
    total_tokens=3,
    cached_tokens=0,
    reasoning_tokens=0,
    estimated=False,
    status=200,
    stream=True,
    error=None,
    started_at=1.7e9,
    duration_ms=12.5,
    ttft_ms=None,
)


def rows(first: int, count: int) -> list[Record]:
    return [
        msgspec.structs.replace(_BASE, uid=f"{n:032x}", request_id=f"req_{n}")
        for n in range(first, first + count)
    ]


async def test_a_spool_file_is_replayed_by_exactly_one_claimer(tmp_path: Path) -> None:
    writer, first, second = Spool(tmp_path), Spool(tmp_path), Spool(tmp_path)
    await writer.append(rows(0, 3))
    await writer.append(rows(3, 2))
    assert writer.records == 5
    assert await first.claim() is None  # its writer still holds it
    await writer.close()
    claimed = await first.claim()
    assert claimed is not None
    assert claimed.path.name.startswith("replay-")
    assert await second.claim() is None  # already claimed
    assert first.records == 5  # a file from another process is counted when claimed
    assert await claimed.read(4) == rows(0, 4)
    claimed.committed(4)
    assert await claimed.read(4) == rows(4, 1)
    claimed.committed(1)
    assert await claimed.read(4) == []
    await claimed.finish()
    assert first.records == 0
    assert list(tmp_path.iterdir()) == []


async def test_a_released_file_is_claimed_again(tmp_path: Path) -> None:
    spool, other = Spool(tmp_path), Spool(tmp_path)
    await spool.append(rows(0, 4))
    await spool.rotate()
    claimed = await spool.claim()  # its own file, after rotation
    assert claimed is not None
    assert spool.records == 4
    await claimed.read(2)
    claimed.committed(2)
    await claimed.release()  # the database failed: all four will be written again
    assert spool.records == 0
    again = await other.claim()
    assert again is not None
    assert other.records == 4
    assert await again.read(10) == rows(0, 4)  # replay is idempotent on uid
    await again.finish()


async def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.append(rows(0, 2))
    await spool.close()
    [path] = tmp_path.glob("spool-*.jsonl")
    with path.open("ab") as f:  # a writer killed mid-write, before its fsync
        f.write(b'["00000000000000000000000000000002","req_2",nul')
    claimed = await Spool(tmp_path).claim()
    assert claimed is not None
    assert await claimed.read(10) == rows(0, 2)
    assert claimed.unreadable == 0
    await claimed.finish()


async def _never_answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:  # pragma: no cover - the test only needs the socket open
    with contextlib.suppress(ConnectionError):
        await reader.read()
    writer.close()


@pytest.fixture
async def silent_database() -> AsyncIterator[str]:
    """A PostgreSQL DSN whose server accepts connections and never says a word."""
    server = await asyncio.start_server(_never_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"postgresql://postgres@127.0.0.1:{port}/ledger"


async def test_shutdown_spools_what_a_hanging_database_did_not_take_in_bounded_time(
    make_proxy: MakeProxy, upstream: FakeUpstream, silent_database: str, tmp_path: Path
) -> None:
    database = cfg.Database(url=silent_database, timeout=0.5)
    spool = tmp_path / "spool"
    config = ledger_config(upstream.url, database, spool, flush_interval=5.0, shutdown_timeout=0.5)
    proxy = await make_proxy(config)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        for _ in range(5):
            await client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hi"}]
            )
    writer = proxy.runner.app[STATE].ledger
    assert len(writer.pending) == 5  # the flush interval has not come yet
    started = time.monotonic()
    await proxy.runner.cleanup()
    # shutdown_timeout (0.5 s) to try the database, then the spool; generous bound.
    assert time.monotonic() - started < 5.0
    assert (writer.written, writer.spooled, writer.dropped) == (0, 5, 0)
    assert sum(len(f.read_bytes().splitlines()) for f in spool.glob("*.jsonl")) == 5
