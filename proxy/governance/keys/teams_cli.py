"""``python -m proxy teams create|list|show|update|delete`` (parser in keys/cli.py).

A limit of 0 means no limit, as for keys. ``show`` lists the team's keys and, with a
budget, what the team spent in its current period (from the usage ledger).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import msgspec

from .cli_common import budget_errors, changes_of, models_of
from .store import KeyStore
from .teams import UPDATABLE, Team, TeamInUse, TeamStore


async def run(keys: KeyStore, args: argparse.Namespace) -> int:
    """Run a ``teams`` subcommand; prints one error line and returns 1 on failure."""
    store = TeamStore(keys.db)
    try:
        if args.teams_command == "create":
            return await _create(store, args)
        if args.teams_command == "list":
            return await _list(store, args)
        if args.teams_command == "show":
            return await _show(store, keys, args)
        if args.teams_command == "update":
            return await _update(store, args)
        return await _delete(store, args)
    except (ValueError, TeamInUse) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _create(store: TeamStore, args: argparse.Namespace) -> int:
    period, tz = args.budget_period or "monthly", args.budget_tz or "UTC"
    wrong = budget_errors(args.budget, period, tz)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
        return 1
    if args.team_id and await store.get(args.team_id) is not None:
        print(f"error: team {args.team_id} exists", file=sys.stderr)
        return 1
    team = await store.create(
        args.name,
        team_id=args.team_id,
        rpm=args.rpm or None,
        tpm=args.tpm or None,
        max_parallel=args.max_parallel or None,
        models=models_of(args.models or []),
        budget=args.budget,
        budget_period=period,
        budget_tz=tz,
        metadata=dict(args.meta or []),
    )
    print(team.id)
    return 0


def _row(team: Team) -> tuple[str, ...]:
    from ..pricing import show

    budget = "-" if team.budget is None else f"{show(team.budget)}/{team.budget_period}"
    return (
        team.id,
        team.name,
        str(team.rpm or "-"),
        str(team.tpm or "-"),
        str(team.max_parallel or "-"),
        ",".join(sorted(team.models)) or "*",
        budget,
    )


async def _list(store: TeamStore, args: argparse.Namespace) -> int:
    teams = await store.all_teams()
    if args.json:
        print(msgspec.json.encode(teams).decode())
        return 0
    rows: list[tuple[str, ...]] = [("ID", "NAME", "RPM", "TPM", "PARALLEL", "MODELS", "BUDGET")]
    rows += [_row(team) for team in teams]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


async def _show(store: TeamStore, keys: KeyStore, args: argparse.Namespace) -> int:
    team = await store.get(args.id)
    if team is None:
        print(f"error: no team {args.id}", file=sys.stderr)
        return 1
    members = await keys.keys_of(team.id)
    spent = await _spent(store, team)
    if args.json:
        described: dict[str, Any] = msgspec.to_builtins(team)
        described["keys"] = [k.id for k in members]
        if spent is not None:
            described["spent"] = spent
        print(msgspec.json.encode(described).decode())
        return 0
    cells = _row(team)
    fields = [
        ("id", team.id),
        ("name", team.name),
        ("rpm", cells[2]),
        ("tpm", cells[3]),
        ("parallel", cells[4]),
        ("models", cells[5]),
        ("budget", cells[6]),
        ("keys", ", ".join(k.id for k in members) or "-"),
    ]
    if spent is not None:
        from ..pricing import show

        fields.append(("spent", show(spent)))
    for name, value in fields:
        print(f"{name:<10}{value}")
    return 0


async def _spent(store: TeamStore, team: Team) -> Any:
    """What the team spent in its current budget period (None: no budget)."""
    if team.budget is None:
        return None
    from ...usage.spend import team_spent
    from ..periods import period_of, zone
    from .cli_common import now

    period = period_of(team.budget_period, zone(team.budget_tz), now())
    return await team_spent(store.db, team.id, period.start, period.end)


async def _update(store: TeamStore, args: argparse.Namespace) -> int:
    changes = await changes_of(args, UPDATABLE, lambda: store.get(args.id))
    if changes is None:
        return 1
    team = await store.update(args.id, changes)
    if team is None:
        print(f"error: no team {args.id}", file=sys.stderr)
        return 1
    print("  ".join(_row(team)))
    return 0


async def _delete(store: TeamStore, args: argparse.Namespace) -> int:
    if not await store.delete(args.id):
        print(f"error: no team {args.id}", file=sys.stderr)
        return 1
    print(f"deleted {args.id}")
    return 0
