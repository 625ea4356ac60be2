"""Reading the usage ledger back from either backend (values that compare across
SQLite and PostgreSQL), ledger configs, the spool, and comparing rows with requests."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import orjson

from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.usage.record import COLUMNS
from proxy.usage.store import READ_REQUEST_ID

from .env import UPSTREAM_KEY


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


def spooled_rows(spool: Path) -> list[dict[str, Any]]:
    """The rows in the spool files (each line a record's fields, in ``COLUMNS`` order)."""
    lines = [line for f in spool.glob("*.jsonl") for line in f.read_bytes().splitlines()]
    return [dict(zip(COLUMNS, orjson.loads(line), strict=True)) for line in lines if line]


def spooled_request_ids(spool: Path) -> list[str]:
    """The request ids of the rows in the spool files, sorted."""
    return sorted(row["request_id"] for row in spooled_rows(spool))


def assert_same_requests(rows: list[dict[str, Any]], completed: list[str]) -> None:
    """The ledger holds exactly the completed requests, each once."""
    ids = [row["request_id"] for row in rows]
    missing = sorted(set(completed) - set(ids))
    extra = sorted(set(ids) - set(completed))
    doubled = len(ids) - len(set(ids))
    assert (missing, extra, doubled) == ([], [], 0), (len(completed), len(ids))
