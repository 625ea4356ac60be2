"""Versioned migrations on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from proxy.cli import main
from proxy.config import schema as cfg
from proxy.db import Db, SchemaError, migrate, migrations


async def test_postgres_migrations_apply_once_even_when_run_concurrently(pg_dsn: str) -> None:
    database = cfg.Database(url=pg_dsn)
    first, second = await asyncio.gather(migrate(database), migrate(database))
    shipped = [f"{m.version:04d}_{m.name}" for m in migrations("postgres")]
    assert sorted(first + second) == shipped  # each applied by exactly one of the two
    assert await migrate(database) == []
    conn = await asyncpg.connect(pg_dsn)
    try:
        versions = [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")]
    finally:
        await conn.close()
    assert sorted(versions) == [m.version for m in migrations("postgres")]


def test_sqlite_migrations_apply_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "x.db"
    config = tmp_path / "proxy.yaml"
    config.write_text(
        f"database: {{sqlite_path: '{path}'}}\n"
        "models: [{name: a, deployments: [{base_url: 'http://x'}]}]\n"
    )
    assert main(["migrate", "--config", str(config)]) == 0
    assert main(["migrate", "--config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1].endswith("up to date")
    with sqlite3.connect(path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations")]
    assert versions == [m.version for m in migrations("sqlite")]


def test_both_backends_ship_the_same_migrations() -> None:
    def names(kind: str) -> list[tuple[int, str]]:
        return [(m.version, m.name) for m in migrations(kind)]

    assert names("postgres") == names("sqlite")


async def test_serving_on_an_unmigrated_postgres_is_refused(pg_dsn: str) -> None:
    if not migrations("postgres"):
        pytest.skip("no migrations shipped yet")
    with pytest.raises(SchemaError, match="proxy migrate"):
        await Db.open(cfg.Database(url=pg_dsn))


async def test_unreachable_postgres_does_not_stop_the_start() -> None:
    from tests.support.env import free_port

    db = await Db.open(cfg.Database(url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    try:
        assert db.pool is not None
    finally:
        await db.close()


async def test_dropping_ledger_indexes_keeps_the_rows(
    unmigrated: cfg.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0004 on a ledger that already has rows: every row stays, and the indexes left
    are the ones the queries use (spend: key and time; the report: time)."""
    database = unmigrated
    kind = "postgres" if database.is_postgres else "sqlite"
    shipped = migrations(kind)
    monkeypatch.setattr("proxy.db.migrations", lambda _: [m for m in shipped if m.version < 4])
    await migrate(database)
    columns = "uid, request_id, endpoint, model, deployment, prompt_tokens, completion_tokens, "
    columns += "total_tokens, cached_tokens, reasoning_tokens, estimated, status, stream, "
    columns += "started_at, duration_ms"
    rows = [(f"{n:032x}", f"req_{n}", "chat", "m", "d", n, 1, n + 1, 0, 0, False, 200, True,
             1.7e9 + n, 1.5) for n in range(50)]  # fmt: skip
    if kind == "postgres":
        conn = await asyncpg.connect(database.url)
        try:
            await conn.executemany(
                f"INSERT INTO usage_records ({columns}) VALUES ($1, $2, $3, $4, $5, $6, $7, "
                "$8, $9, $10, $11, $12, $13, to_timestamp($14), $15)",
                rows,
            )
            monkeypatch.setattr("proxy.db.migrations", lambda _: shipped[:4])
            assert await migrate(database) == ["0004_usage_indexes"]
            count = await conn.fetchval("SELECT count(*) FROM usage_records")
            indexes = {
                r["indexname"]
                for r in await conn.fetch(
                    "SELECT indexname FROM pg_indexes WHERE tablename = 'usage_records'"
                )
            }
        finally:
            await conn.close()
    else:
        with sqlite3.connect(database.sqlite_path) as lite:
            lite.executemany(f"INSERT INTO usage_records ({columns}) VALUES ({'?, ' * 14}?)", rows)
        monkeypatch.setattr("proxy.db.migrations", lambda _: shipped[:4])
        assert await migrate(database) == ["0004_usage_indexes"]
        with sqlite3.connect(database.sqlite_path) as lite:
            count = lite.execute("SELECT count(*) FROM usage_records").fetchone()[0]
            indexes = {
                name
                for (name,) in lite.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'index' "
                    "AND tbl_name = 'usage_records' AND sql IS NOT NULL"
                )
            }
        indexes.add("usage_records_pkey")  # SQLite's own uid index has no SQL
    assert count == 50
    assert indexes == {
        "usage_records_pkey",
        "usage_records_key_started",
        "usage_records_started",
    }


def test_the_ledger_queries_use_the_indexes_left(tmp_path: Path) -> None:
    """What a key spent (budgets, ``keys show``: its hourly rollups, and the rows of a
    period's first hour when it does not start on the hour), the ``usage`` report (the
    rollups by time) and SQLite's retention each find their rows through an index."""
    from proxy.db import lite
    from proxy.usage.retention import _SQLITE_STEP, _oldest
    from proxy.usage.spend import _HOURS, _ROWS

    path = tmp_path / "ledger.db"
    asyncio.run(migrate(cfg.Database(sqlite_path=str(path))))
    report = "SELECT model, sum(requests) FROM usage_daily WHERE starts_at >= $1 GROUP BY 1"
    with sqlite3.connect(path) as conn:
        for query, index in (
            (_HOURS, "usage_hourly_key"),
            (_ROWS, "usage_records_key_started"),
            (report, "sqlite_autoindex_usage_daily_1"),
            (_SQLITE_STEP, "usage_records_started"),
            (_oldest("usage_hourly"), "sqlite_autoindex_usage_hourly_1"),
        ):
            query = lite(query)
            plan = " ".join(
                row[-1]
                for row in conn.execute(f"EXPLAIN QUERY PLAN {query}", (1,) * query.count("?"))
            )
            assert f"INDEX {index}" in plan, plan
