"""``python -m proxy keys create|list|show|revoke|update``: manage API keys in the
database the config names (default: the embedded SQLite file).

A key is printed once, by ``create``, alone on stdout (``KEY=$(python -m proxy keys
create --name app1)``); nothing else ever prints one: only ids and display prefixes.
A limit of 0 means no limit. The database stack is imported only when a ``keys``
command runs, so building the parser costs ``python -m proxy`` nothing.

Budgets (``--budget 10.00 --budget-period daily --budget-tz Europe/Berlin``): ``show``
and ``list`` print what the key spent in its current period and what is left, from
the usage ledger's committed rows (requests of the last ``usage.flush_interval`` may
not be there yet; reservations of requests in flight are not counted).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import msgspec

from ...config.load import check_budget
from ...config.schema import Database
from ..periods import PERIODS
from .cli_common import budget_errors, changes_of, models_of, now
from .record import Key

if TYPE_CHECKING:
    from .store import KeyStore

_MAX_LIMIT = 1_000_000_000


def add_parser(sub: Any) -> None:
    """Add ``keys`` and its subcommands to the top-level subparsers ``sub``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="config file naming the database (default: SQLite)")
    keys = sub.add_parser("keys", help="create, list, revoke and update API keys")
    commands = keys.add_subparsers(dest="keys_command", required=True)

    create = commands.add_parser(
        "create", parents=[common], help="create a key and print it (the only time it shows)"
    )
    create.add_argument("--name", required=True)
    _limit_arguments(create)

    listing = commands.add_parser("list", parents=[common], help="list keys (never the keys)")
    listing.add_argument("--json", action="store_true", help="one JSON array")

    show = commands.add_parser(
        "show", parents=[common], help="one key, with its spend and budget left this period"
    )
    show.add_argument("id")
    show.add_argument("--json", action="store_true", help="one JSON object")

    revoke = commands.add_parser("revoke", parents=[common], help="revoke a key")
    revoke.add_argument("id")

    # Only the options given are changed: absent ones are not even set on ``args``.
    update = commands.add_parser(
        "update", parents=[common], help="change a key", argument_default=argparse.SUPPRESS
    )
    update.add_argument("id")
    update.add_argument("--name")
    _limit_arguments(update)

    teams = sub.add_parser("teams", help="create, list, update and delete teams")
    team_commands = teams.add_subparsers(dest="teams_command", required=True)
    team_create = team_commands.add_parser("create", parents=[common], help="create a team")
    team_create.add_argument("--name", required=True)
    team_create.add_argument("--id", dest="team_id", help="its id (default: made up)")
    _limit_arguments(team_create, key=False)
    team_list = team_commands.add_parser("list", parents=[common], help="list teams")
    team_list.add_argument("--json", action="store_true", help="one JSON array")
    team_show = team_commands.add_parser(
        "show", parents=[common], help="one team, its keys and its spend this period"
    )
    team_show.add_argument("id")
    team_show.add_argument("--json", action="store_true", help="one JSON object")
    team_update = team_commands.add_parser(
        "update", parents=[common], help="change a team", argument_default=argparse.SUPPRESS
    )
    team_update.add_argument("id")
    team_update.add_argument("--name")
    _limit_arguments(team_update, key=False)
    team_delete = team_commands.add_parser(
        "delete", parents=[common], help="delete a team that has no keys"
    )
    team_delete.add_argument("id")


def _limit_arguments(parser: argparse.ArgumentParser, key: bool = True) -> None:
    parser.add_argument("--rpm", type=_limit, help="requests per minute (0: no limit)")
    parser.add_argument("--tpm", type=_limit, help="tokens per minute (0: no limit)")
    parser.add_argument(
        "--max-parallel", type=_limit, help="requests in flight at once (0: no limit)"
    )
    parser.add_argument(
        "--models",
        nargs="*",
        metavar="MODEL",
        help="models the key may use, space or comma separated (none: every model)",
    )
    if key:
        parser.add_argument("--team", dest="team_id", help="the team the key belongs to")
        parser.add_argument(
            "--role",
            choices=("admin", "viewer", "member"),
            help="what the key may do on the admin API (default member)",
        )
        parser.add_argument(
            "--expires",
            dest="expires_at",
            type=_when,
            help="ISO date or date-time after which the key stops working (UTC unless it "
            "says otherwise), or 'never'",
        )
    parser.add_argument(
        "--meta", action="append", type=_pair, metavar="KEY=VALUE", help="free-form metadata"
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        help="spending limit per period, in the unit of the configured prices (0: none)",
    )
    parser.add_argument(
        "--budget-period", choices=PERIODS, help="daily, weekly, monthly (default) or total"
    )
    parser.add_argument(
        "--budget-tz", help="IANA time zone whose midnight starts a period (default UTC)"
    )


def _limit(text: str) -> int:
    value = int(text)
    if not 0 <= value <= _MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be between 0 and {_MAX_LIMIT}")
    return value


def _when(text: str) -> float | None:
    if text == "never":
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an ISO date or date-time") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _budget(text: str) -> Decimal | None:
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError("not a decimal number") from None
    if amount == 0:
        return None
    wrong = check_budget(amount, "total", "UTC")
    if wrong:
        raise argparse.ArgumentTypeError(wrong)
    return amount


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return name, value


def run(args: argparse.Namespace, database: Database) -> int:
    """Run a ``keys`` subcommand; prints one error line and returns 1 on failure."""
    import asyncio

    from ...db import SchemaError
    from .lookup import STORE_FAILURES

    try:
        return asyncio.run(_run(args, database))
    except (SchemaError, *STORE_FAILURES) as exc:
        print(f"error: {exc or type(exc).__name__}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, database: Database) -> int:
    from ...db import Db
    from .store import KeyStore

    db = await Db.open(database)
    try:
        store = KeyStore(db)
        if args.command == "teams":
            from . import teams_cli

            return await teams_cli.run(store, args)
        command: Callable[[KeyStore, argparse.Namespace], Any] = _COMMANDS[args.keys_command]
        result: int = await command(store, args)
        return result
    finally:
        await db.close()


async def _create(store: KeyStore, args: argparse.Namespace) -> int:
    period, tz = args.budget_period or "monthly", args.budget_tz or "UTC"
    wrong = budget_errors(args.budget, period, tz)
    if wrong:
        print(f"error: {wrong}", file=sys.stderr)
        return 1
    if args.team_id is not None and not await _team_exists(store, args.team_id):
        return 1
    key, value = await store.create(
        args.name,
        team_id=args.team_id,
        role=args.role or "member",
        rpm=args.rpm or None,
        tpm=args.tpm or None,
        max_parallel=args.max_parallel or None,
        models=models_of(args.models or []),
        expires_at=args.expires_at,
        metadata=dict(args.meta or []),
        budget=args.budget,
        budget_period=period,
        budget_tz=tz,
    )
    print(value)
    print(f"created {key.id} ({key.name}): the key above is shown only this once", file=sys.stderr)
    return 0


async def _team_exists(store: KeyStore, team_id: str | None) -> bool:
    """Whether ``team_id`` names a team (None: no team, fine); prints why not."""
    from .teams import TeamStore

    if team_id is None or await TeamStore(store.db).get(team_id) is not None:
        return True
    print(f"error: no team {team_id} (python -m proxy teams list)", file=sys.stderr)
    return False


async def _list(store: KeyStore, args: argparse.Namespace) -> int:
    keys = await store.all_keys()
    spends = [await _spend(store, key) for key in keys]
    if args.json:
        described = [_described(key, s) for key, s in zip(keys, spends, strict=True)]
        print(msgspec.json.encode(described).decode())
        return 0
    header = ("ID", "NAME", "PREFIX", "RPM", "TPM", "PARALLEL", "MODELS", "EXPIRES", "STATUS")
    rows: list[tuple[str, ...]] = [(*header, "BUDGET", "SPENT", "LEFT")]
    rows += [_row(key) + _budget_cells(key, s) for key, s in zip(keys, spends, strict=True)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
    return 0


def _row(key: Key) -> tuple[str, ...]:
    expires = "never" if key.expires_at is None else _iso(key.expires_at)
    status = "revoked" if key.revoked else "active" if key.is_usable(now()) else "expired"
    return (
        key.id,
        key.name,
        key.prefix + "…",
        str(key.rpm or "-"),
        str(key.tpm or "-"),
        str(key.max_parallel or "-"),
        ",".join(sorted(key.models)) or "*",
        expires,
        status,
    )


class Spend(msgspec.Struct):
    """A budgeted key's current period and what it spent in it (from the ledger)."""

    period_start: str
    period_end: str | None
    spent: Decimal
    left: Decimal


async def _spend(store: KeyStore, key: Key) -> Spend | None:
    if key.budget is None:
        return None
    from ...usage.spend import spent
    from ..periods import period_of, zone

    tz = zone(key.budget_tz)
    period = period_of(key.budget_period, tz, now())
    total = await spent(store.db, key.id, period.start, period.end)
    return Spend(
        datetime.fromtimestamp(period.start, tz).isoformat(),
        None if period.end is None else datetime.fromtimestamp(period.end, tz).isoformat(),
        total,
        key.budget - total,
    )


def _budget_cells(key: Key, spend: Spend | None) -> tuple[str, ...]:
    from ..pricing import show

    if key.budget is None or spend is None:
        return ("-", "-", "-")
    return (f"{show(key.budget)}/{key.budget_period}", show(spend.spent), show(spend.left))


def _described(key: Key, spend: Spend | None) -> dict[str, Any]:
    """A key as ``--json`` prints it: its record, and its spend when it has a budget."""
    described: dict[str, Any] = msgspec.to_builtins(key)
    if spend is not None:
        described.update(msgspec.to_builtins(spend))
    return described


async def _show(store: KeyStore, args: argparse.Namespace) -> int:
    key = await store.get(args.id)
    if key is None:
        print(f"error: no key {args.id}", file=sys.stderr)
        return 1
    spend = await _spend(store, key)
    if args.json:
        print(msgspec.json.encode(_described(key, spend)).decode())
        return 0
    cells = _row(key)
    fields = [
        ("id", key.id),
        ("name", key.name),
        ("prefix", cells[2]),
        ("rpm", cells[3]),
        ("tpm", cells[4]),
        ("parallel", cells[5]),
        ("models", cells[6]),
        ("expires", cells[7]),
        ("status", cells[8]),
        ("team", key.team_id or "-"),
        ("role", key.role),
    ]
    if key.budget is not None and spend is not None:
        from ..pricing import show

        end = spend.period_end or "never (total budget)"
        fields += [
            ("budget", f"{show(key.budget)} {key.budget_period} ({key.budget_tz})"),
            ("period", f"{spend.period_start} to {end}"),
            ("spent", show(spend.spent)),
            ("left", show(spend.left)),
        ]
    else:
        fields.append(("budget", "-"))
    for name, value in fields:
        print(f"{name:<10}{value}")
    return 0


async def _revoke(store: KeyStore, args: argparse.Namespace) -> int:
    if not await store.revoke(args.id):
        print(f"error: no key {args.id}", file=sys.stderr)
        return 1
    print(f"revoked {args.id} (running proxies stop accepting it within auth.cache_ttl)")
    return 0


async def _update(store: KeyStore, args: argparse.Namespace) -> int:
    from .store import UPDATABLE

    changes = await changes_of(args, UPDATABLE, lambda: store.get(args.id))
    if changes is None:
        return 1
    if "team_id" in changes:
        changes["team_id"] = changes["team_id"] or None  # --team '': leave the team
        if not await _team_exists(store, changes["team_id"]):
            return 1
    key = await store.update(args.id, changes)
    if key is None:
        print(f"error: no key {args.id}", file=sys.stderr)
        return 1
    print("  ".join(_row(key)))
    return 0


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


_COMMANDS: dict[str, Any] = {
    "create": _create,
    "list": _list,
    "show": _show,
    "revoke": _revoke,
    "update": _update,
}
