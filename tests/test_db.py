"""Versioned migrations on PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import asyncpg
import pytest

from proxy import config as cfg
from proxy.cli import main
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
    from .conftest import free_port

    db = await Db.open(cfg.Database(url=f"postgresql://postgres@127.0.0.1:{free_port()}/x"))
    try:
        assert db.pool is not None
    finally:
        await db.close()
