"""What the admin API says about keys, usage and the proxy's live numbers: the JSON
shapes (described in openapi.py) and the reads behind them. Amounts of money are
decimal strings (exact); times are Unix seconds."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from prometheus_client.metrics_core import Metric

from ..db import Db
from ..governance.keys.record import Key
from ..governance.keys.teams import Team
from ..governance.periods import period_of, zone
from ..governance.pricing import show
from ..usage import rollup
from ..usage.spend import spent, team_spent

# group_by → rollup column; a fixed map, so no column name is ever user text.
GROUPS = {
    "key": "key_id", "team": "team_id", "model": "model", "deployment": "deployment",
    "outcome": "outcome",
}  # fmt: skip
GRANULARITIES = {"hour": rollup.HOUR, "day": rollup.DAY}
# Filters → rollup column (equality only).
FILTERS = {"key_id": "key_id", "team_id": "team_id", "model": "model", "deployment": "deployment"}
_SUMS = (
    "sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost), "
    "coalesce(sum(requests) FILTER (WHERE outcome <> ''), 0), "
    + ", ".join(f"sum({c})" for c in (*rollup.DURATION, *rollup.TTFT))
)


def status(key: Key, now: float) -> str:
    if key.revoked:
        return "revoked"
    return "active" if key.is_usable(now) else "expired"


async def key_view(db: Db | None, key: Key, now: float) -> dict[str, Any]:
    """A key as the API shows it: never the key itself, only its display prefix."""
    view: dict[str, Any] = {
        "object": "key",
        "id": key.id,
        "name": key.name,
        "prefix": key.prefix,
        "status": status(key, now),
        "rpm": key.rpm,
        "tpm": key.tpm,
        "max_parallel": key.max_parallel,
        "models": sorted(key.models),
        "expires_at": key.expires_at,
        "created_at": key.created_at,
        "metadata": key.metadata,
        "budget": None if key.budget is None else show(key.budget),
        "budget_period": key.budget_period,
        "budget_tz": key.budget_tz,
        "spend": await budget_view(db, key, now) if key.budget is not None else None,
        "team_id": key.team_id,
        "role": key.role,
    }
    return view


async def team_view(db: Db, team: Team, now: float) -> dict[str, Any]:
    """A team as the API shows it, with its spend this period when it has a budget."""
    spend = None
    if team.budget is not None:
        tz = zone(team.budget_tz)
        period = period_of(team.budget_period, tz, now)
        total = await team_spent(db, team.id, period.start, period.end)
        spend = {
            "period_start": period.start,
            "period_end": period.end,
            "spent": show(total),
            "left": show(team.budget - total),
        }
    return {
        "object": "team",
        "id": team.id,
        "name": team.name,
        "rpm": team.rpm,
        "tpm": team.tpm,
        "max_parallel": team.max_parallel,
        "models": sorted(team.models),
        "created_at": team.created_at,
        "metadata": team.metadata,
        "budget": None if team.budget is None else show(team.budget),
        "budget_period": team.budget_period,
        "budget_tz": team.budget_tz,
        "spend": spend,
    }


async def budget_view(db: Db | None, key: Key, now: float) -> dict[str, Any]:
    """A budgeted key's current period, what it spent in it and what is left."""
    assert key.budget is not None
    tz = zone(key.budget_tz)
    period = period_of(key.budget_period, tz, now)
    total = Decimal(0) if db is None else await spent(db, key.id, period.start, period.end)
    return {
        "period_start": period.start,
        "period_end": period.end,
        "spent": show(total),
        "left": show(key.budget - total),
    }


async def usage(
    db: Db, by: str, width: int, start: float, end: float, where: dict[str, str]
) -> list[dict[str, Any]]:
    """Per period of ``width`` seconds and per ``by`` group: requests, tokens, cost,
    errors and latency percentiles, from the rollup of that width. ``start`` is rounded
    down and ``end`` up to whole periods."""
    low = math.floor(start / width) * width
    high = math.ceil(end / width) * width
    column = GROUPS[by]
    clauses = ["starts_at >= $1", "starts_at < $2"]
    args: list[object] = [low, high]
    for name, value in sorted(where.items()):
        args.append(value)
        clauses.append(f"{FILTERS[name]} = ${len(args)}")
    sql = (
        f"SELECT starts_at, {column}, {_SUMS} FROM {rollup.TABLES[width]} "
        f"WHERE {' AND '.join(clauses)} GROUP BY 1, 2 ORDER BY 1, 2"
    )
    return [_usage_row(row) for row in await db.fetch(sql, *args)]


def _usage_row(row: Sequence[Any]) -> dict[str, Any]:
    starts, group, *sums = row
    requests, prompt, completion, cost, errors, *hist = (int(v) for v in sums)
    duration, ttft = hist[: rollup.BUCKETS], hist[rollup.BUCKETS :]
    return {
        "period_start": int(starts),
        "group": group,
        "requests": requests,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost": show(Decimal(cost).scaleb(-9)),
        "errors": errors,
        "p50_ms": round(rollup.percentile(duration, 0.5), 1),
        "p95_ms": round(rollup.percentile(duration, 0.95), 1),
        "ttft_p50_ms": round(rollup.percentile(ttft, 0.5), 1),
    }


async def spend_today(db: Db, now: float) -> str:
    """What every request since UTC midnight cost, from the hourly rollup."""
    midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    nano = await db.fetchval(
        "SELECT coalesce(sum(cost), 0) FROM usage_hourly WHERE starts_at >= $1",
        int(midnight.timestamp()),
    )
    return show(Decimal(nano).scaleb(-9))


def live(families: Iterable[Metric], inflight: int) -> dict[str, Any]:
    """The proxy's own counters summed over every series (and every worker): the
    console turns two of these into rates and percentiles over the time between them.
    Histograms are per-bucket counts (not cumulative) with bounds in milliseconds."""
    requests = errors = prompt = completion = 0
    cost = 0.0
    histograms: dict[str, dict[float, float]] = {"duration": {}, "ttft": {}}
    names = {
        "morngpt_request_duration_seconds": "duration",
        "morngpt_time_to_first_token_seconds": "ttft",
    }
    for family in families:
        for sample in family.samples:
            if sample.name == "morngpt_requests_total":
                requests += int(sample.value)
                if sample.labels.get("status_class") not in ("2xx", "3xx"):
                    errors += int(sample.value)
            elif sample.name == "morngpt_tokens_total":
                if sample.labels.get("kind") == "prompt":
                    prompt += int(sample.value)
                elif sample.labels.get("kind") == "completion":
                    completion += int(sample.value)
            elif sample.name == "morngpt_cost_total":
                cost += sample.value
            elif sample.name.endswith("_bucket") and sample.name[:-7] in names:
                into = histograms[names[sample.name[:-7]]]
                le = float(sample.labels["le"])
                into[le] = into.get(le, 0.0) + sample.value
    return {
        "at": time.time(),
        "requests": requests,
        "errors": errors,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost": round(cost, 9),
        "inflight": inflight,
        "duration": _histogram(histograms["duration"]),
        "ttft": _histogram(histograms["ttft"]),
    }


def _histogram(cumulative: dict[float, float]) -> dict[str, list[float]]:
    bounds = sorted(cumulative)
    counts, below = [], 0.0
    for le in bounds:
        counts.append(cumulative[le] - below)
        below = cumulative[le]
    finite = [b * 1000 for b in bounds if b != math.inf]
    return {"bounds_ms": finite, "counts": counts}
