"""``python -m proxy usage --since 1h --by key|model|deployment``: a table of requests,
tokens, cost, errors and latency percentiles from the ledger.

PostgreSQL computes the percentiles (``percentile_cont``); on SQLite the same
interpolation runs in Python over the selected durations, so both backends print the
same table for the same records. "errors" counts requests that ended with an error
class or an HTTP status of 400 or more. "cost" is exact on both: PostgreSQL sums its
``numeric`` column, and SQLite's decimal text is summed here with ``Decimal``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import sqlite3
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import NamedTuple, TextIO

import asyncpg

from ..config import Database
from ..errors import DatabaseUnavailable
from ..pricing import show
from .store import TABLE

# --by → column; a fixed map, so the column name in the SQL is never user text.
GROUPS = {"key": "key_id", "model": "model", "deployment": "deployment"}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_ERROR = "(error IS NOT NULL OR status >= 400)"
_ZERO = Decimal(0)


class Row(NamedTuple):
    name: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    errors: int
    p50_ms: float
    p95_ms: float


def parse_since(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``15m``, ``1h``, ``7d`` or ``2w``."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a duration like 30m, 1h or 7d, not {text!r}")
    return float(match[1]) * _SECONDS[match[2]]


def fetch(database: Database, since: float, by: str) -> list[Row]:
    """Usage per ``by`` group for records that started at or after ``since`` (Unix
    seconds), most requests first. Raises ``DatabaseUnavailable``."""
    column = GROUPS[by]
    if database.is_postgres:
        return asyncio.run(_fetch_postgres(database, since, column))
    return _fetch_sqlite(database.sqlite_path, since, column)


async def _fetch_postgres(database: Database, since: float, column: str) -> list[Row]:
    query = (
        f"SELECT coalesce({column}, '-'), count(*), sum(prompt_tokens), "
        f"sum(completion_tokens), sum(cost), count(*) FILTER (WHERE {_ERROR}), "
        "percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms), "
        "percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms) "
        f"FROM {TABLE} WHERE started_at >= $1 GROUP BY 1"
    )
    try:
        conn = await asyncpg.connect(database.url, timeout=database.timeout)
        try:
            records = await conn.fetch(
                query, datetime.fromtimestamp(since, UTC), timeout=database.timeout
            )
        finally:
            await conn.close()
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc
    return _ordered([Row(*r) for r in records])


def _fetch_sqlite(path: str, since: float, column: str) -> list[Row]:
    if not Path(path).is_file():
        raise DatabaseUnavailable(f"no ledger at {path}")
    totals = (
        f"SELECT coalesce({column}, '-'), count(*), sum(prompt_tokens), "
        f"sum(completion_tokens), sum({_ERROR}) "
        f"FROM {TABLE} WHERE started_at >= ? GROUP BY 1"
    )
    durations = (
        f"SELECT coalesce({column}, '-'), duration_ms, cost FROM {TABLE} "
        "WHERE started_at >= ? ORDER BY 1, 2"
    )
    try:
        with sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True) as conn:
            groups = conn.execute(totals, (since,)).fetchall()
            spread: dict[str, list[float]] = {}
            costs: dict[str, Decimal] = {}
            for name, ms, cost in conn.execute(durations, (since,)):
                spread.setdefault(name, []).append(ms)
                costs[name] = costs.get(name, _ZERO) + Decimal(cost)
    except sqlite3.Error as exc:
        raise DatabaseUnavailable(f"{path}: {exc}") from exc
    rows = []
    for name, requests, prompt, completion, errors in groups:
        ms = spread[name]
        rows.append(
            Row(
                name,
                requests,
                prompt,
                completion,
                costs[name],
                errors,
                percentile(ms, 0.5),
                percentile(ms, 0.95),
            )
        )
    return _ordered(rows)


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """PostgreSQL's ``percentile_cont``: linear interpolation over sorted values."""
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ordered(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda row: (-row.requests, row.name))


def render(rows: Sequence[Row], by: str) -> str:
    """The rows as an aligned text table."""
    header = (
        by, "requests", "prompt_tokens", "completion_tokens", "cost", "errors", "p50_ms", "p95_ms"
    )  # fmt: skip
    cells = [header] + [
        (
            row.name,
            str(row.requests),
            str(row.prompt_tokens),
            str(row.completion_tokens),
            show(row.cost),
            str(row.errors),
            f"{row.p50_ms:.1f}",
            f"{row.p95_ms:.1f}",
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            [line[0].ljust(widths[0])]
            + [c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)]
        ).rstrip()
        for line in cells
    ]
    return "\n".join(lines)


def run(database: Database, since: float, by: str, out: TextIO | None = None) -> int:
    """The ``usage`` command: print the table (to ``out``, default stdout); 1 when the
    ledger cannot be read."""
    out = out or sys.stdout
    start = time.time() - since
    try:
        rows = fetch(database, start, by)
    except DatabaseUnavailable as exc:
        print(f"usage: cannot read the ledger: {exc.message}", file=sys.stderr)
        return 1
    if not rows:
        when = datetime.fromtimestamp(start, UTC).isoformat(timespec="seconds")
        print(f"no requests since {when}", file=out)
        return 0
    print(render(rows, by), file=out)
    return 0
