"""Rollups: the ledger summed per hour (``usage_hourly``) and per day (``usage_daily``)
x key x model x deployment x outcome. Every reader (the ``usage`` report, budget
rebuilds, ``keys show``) reads these; rows stay for audit and debugging.

Invariants:
- A batch's rollups are added in the same transaction as its rows, and only for the
  rows that transaction inserted (a row already there, from a retried or replayed
  batch, adds nothing): rollups and rows never disagree.
- Every column is a count or a sum, so any set of rollup rows adds up (``merge``):
  latency and time to first token are fixed histograms (``BOUNDS``) whose bucket ``i``
  counts the values ≤ ``BOUNDS[i]`` and above the bound before it; the last bucket
  counts the rest. Percentiles read from them are interpolated within a bucket.
- ``outcome`` is "" for a success, else the error class, or ``status_<code>`` for an
  HTTP status of 400 or more without one: errors by class, and "errors" = every
  outcome but "".
- ``team_id`` is the team of the rows' key ("" for none): not part of the unique key
  (a key belongs to one team; a key that moves takes its current hour's row along).
- ``key_id`` is "" for requests without a key (a key column that is never NULL can be
  part of the unique key on both backends). ``cost`` is in nano-units (10**-9 of the
  price unit), exact: a request's cost is rounded up to whole nano-units already.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from decimal import Decimal

from .record import Record

HOUR = 3600
DAY = 86400
# Upper bounds of the latency buckets, in milliseconds (1-2-5 steps, 5 ms to 5 min).
BOUNDS: tuple[int, ...] = (
    5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 300000,
)  # fmt: skip
BUCKETS = len(BOUNDS) + 1
DURATION = tuple(f"ms_{i:02d}" for i in range(BUCKETS))
TTFT = tuple(f"ttft_{i:02d}" for i in range(BUCKETS))
GROUP = ("key_id", "model", "deployment", "outcome")
SUMS = (
    "requests", "estimated", "prompt_tokens", "completion_tokens", "cached_tokens",
    "reasoning_tokens", "cost", *DURATION, *TTFT,
)  # fmt: skip
TABLES = {HOUR: "usage_hourly", DAY: "usage_daily"}


def outcome(status: int, error: str | None) -> str:
    """The rollup's outcome of a request (see the module docstring)."""
    if error:
        return error
    return f"status_{status}" if status >= 400 else ""


def bucket(ms: float) -> int:
    """The histogram bucket of a duration in milliseconds."""
    return bisect.bisect_left(BOUNDS, ms) if ms == ms else BUCKETS - 1  # NaN: last


def nano(cost: Decimal) -> int:
    """A cost in whole nano-units (rounded up; exact for ledger costs)."""
    numerator, denominator = cost.as_integer_ratio()  # exact (~0.45 µs, scaleb ~0.7)
    return -(-numerator * 1_000_000_000 // denominator)


def deltas(records: Iterable[Record], width: int) -> list[tuple[object, ...]]:
    """What ``records`` add to the rollup of ``width`` seconds (``HOUR`` or ``DAY``)."""
    return changes(records)[width]


_Group = tuple[int, str, str, str, str]  # period start, key, model, deployment, outcome


def changes(records: Iterable[Record]) -> dict[int, list[tuple[object, ...]]]:
    """What ``records`` add to each rollup (``TABLES``, by width): one row per (period
    start, key, model, deployment, outcome), columns as ``COLUMNS``, the team that of
    the group's last record. One pass over the records for the hours; the days are
    the hours added up (a day is whole hours). Raises ``ValueError`` (or
    ``ArithmeticError``) for a record whose values cannot be summed (NaN or infinite
    times and costs)."""
    hours: dict[_Group, list[int]] = {}
    teams: dict[_Group, tuple[int, str]] = {}  # the group's last record: (its index, team)
    for n, r in enumerate(records):
        start = int(r.started_at // HOUR) * HOUR
        where = (start, r.key_id or "", r.model, r.deployment, outcome(r.status, r.error))
        sums = hours.get(where)
        if sums is None:
            sums = hours[where] = [0] * len(SUMS)
        teams[where] = (n, r.team_id or "")
        sums[0] += 1
        sums[1] += r.estimated
        sums[2] += r.prompt_tokens
        sums[3] += r.completion_tokens
        sums[4] += r.cached_tokens
        sums[5] += r.reasoning_tokens
        cost = r.cost
        if cost:  # most often none (no price configured): no Decimal arithmetic
            sums[6] += nano(cost)
        sums[7 + bucket(_finite(r.duration_ms))] += 1
        if r.ttft_ms is not None:
            sums[7 + BUCKETS + bucket(_finite(r.ttft_ms))] += 1
    days: dict[_Group, list[int]] = {}
    day_teams: dict[_Group, tuple[int, str]] = {}
    for where, sums in hours.items():
        day = (where[0] // DAY * DAY, *where[1:])
        total = days.get(day)
        if total is None:
            days[day] = sums.copy()
        else:
            days[day] = [a + b for a, b in zip(total, sums, strict=True)]
        day_teams[day] = max(day_teams.get(day, (-1, "")), teams[where])
    return {
        HOUR: [(*where, teams[where][1], *sums) for where, sums in hours.items()],
        DAY: [(*where, day_teams[where][1], *sums) for where, sums in days.items()],
    }


def _finite(ms: float) -> float:
    if not math.isfinite(ms):
        raise ValueError(f"not a finite time: {ms}")
    return ms


COLUMNS = ("starts_at", *GROUP, "team_id", *SUMS)


STAGING = {c: "bigint" for c in COLUMNS} | {c: "text" for c in (*GROUP, "team_id")}


def staging(width: int) -> str:
    """The session's staging table for the ``deltas`` of ``width`` (see ``merge``)."""
    return f"{TABLES[width]}_batch"


def merge(width: int) -> str:
    """The statement adding the staged ``deltas`` to the rollup table of ``width``: one
    statement for the batch (a statement per rollup row cost more than the rows)."""
    table = TABLES[width]
    sets = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in SUMS)
    sets += ", team_id = excluded.team_id"
    # ``WHERE true``: SQLite would read ON CONFLICT as a join's ON without it.
    return (
        f"INSERT INTO {table} ({', '.join(COLUMNS)}) SELECT {', '.join(COLUMNS)} "
        f"FROM {staging(width)} WHERE true "
        f"ON CONFLICT (starts_at, {', '.join(GROUP)}) DO UPDATE SET {sets}"
    )


def percentile(counts: Sequence[int], fraction: float) -> float:
    """The ``fraction`` quantile (0..1) of a histogram, in milliseconds: linear within
    its bucket (the first bucket starts at 0; the last, open one is read as ending at
    twice its lower bound). 0.0 for an empty histogram."""
    total = sum(counts)
    if total == 0:
        return 0.0
    rank = fraction * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            low = BOUNDS[i - 1] if i else 0
            high = BOUNDS[i] if i < len(BOUNDS) else 2 * BOUNDS[-1]
            return low + (high - low) * (rank - seen) / count
        seen += count
    return float(BOUNDS[-1])
