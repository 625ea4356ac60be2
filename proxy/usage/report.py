"""``python -m proxy usage --since 1h --by key|team|model|deployment|outcome``: a table of requests,
tokens, cost, errors and latency percentiles, from the rollups (rollup.py).

The start is rounded down to the hour (the rollups' grain). Whole UTC days come from
``usage_daily``, the hours before the first of them from ``usage_hourly``: a 30-day
report reads about 30 rollup rows per key, model and deployment, never the rows.
"errors" counts requests that ended with an error class or an HTTP status of 400 or
more; "cost" is the exact sum (nano-units); p50/p95 are read from the latency
histograms (interpolated within a bucket), the same on both backends.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple, TextIO

from ..config.base import seconds
from ..config.schema import Database
from ..db import Db, SchemaError
from ..errors import DatabaseUnavailable
from ..governance.pricing import show
from . import rollup
from .store import _REJECTED, _UNAVAILABLE

# --by → column; a fixed map, so the column name in the SQL is never user text.
# "outcome": errors by class (rollup.outcome; "-" is success).
# "team": the key's team ("-": keys without one).
GROUPS = {
    "key": "key_id", "team": "team_id", "model": "model", "deployment": "deployment",
    "outcome": "outcome",
}  # fmt: skip
# Per group: requests, prompt and completion tokens, cost, errors, the histogram.
_SUMS = (
    "sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost), "
    "coalesce(sum(requests) FILTER (WHERE outcome <> ''), 0), "
    + ", ".join(f"sum({c})" for c in rollup.DURATION)
)


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
    try:
        return seconds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 30m, 1h or 7d, not {text!r}"
        ) from None


def fetch(database: Database, since: float, by: str) -> list[Row]:
    """Usage per ``by`` group for requests that started in or after the hour of
    ``since`` (Unix seconds), most requests first. Raises ``DatabaseUnavailable``."""
    if not database.is_postgres and not Path(database.sqlite_path).is_file():
        raise DatabaseUnavailable(f"no ledger at {database.sqlite_path}")
    try:
        return asyncio.run(_fetch(database, since, GROUPS[by]))
    except (*_UNAVAILABLE, *_REJECTED, SchemaError) as exc:
        raise DatabaseUnavailable(f"{type(exc).__name__}: {exc}") from exc


async def _fetch(database: Database, since: float, column: str) -> list[Row]:
    hour = math.floor(since / rollup.HOUR) * rollup.HOUR
    day = math.ceil(hour / rollup.DAY) * rollup.DAY  # the first whole day
    parts = (
        f"SELECT {column}, {_SUMS} FROM usage_hourly "
        "WHERE starts_at >= $1 AND starts_at < $2 GROUP BY 1",
        f"SELECT {column}, {_SUMS} FROM usage_daily WHERE starts_at >= $1 GROUP BY 1",
    )
    db = await Db.open(database)
    try:
        async with asyncio.timeout(database.timeout):
            found = await db.fetch(parts[0], hour, day) + await db.fetch(parts[1], day)
    finally:
        await db.close()
    totals: dict[str, list[Any]] = {}
    for name, *sums in found:
        into = totals.setdefault(name or "-", [0] * len(sums))
        for i, value in enumerate(sums):
            into[i] += value
    return _ordered([_row(name, sums) for name, sums in totals.items()])


def _row(name: str, sums: list[Any]) -> Row:
    requests, prompt, completion, cost, errors, *histogram = (int(v) for v in sums)
    return Row(
        name,
        requests,
        prompt,
        completion,
        Decimal(cost).scaleb(-9),
        errors,
        rollup.percentile(histogram, 0.5),
        rollup.percentile(histogram, 0.95),
    )


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
