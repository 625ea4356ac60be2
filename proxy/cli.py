"""Command line: ``python -m proxy serve|check-config …``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import msgspec

from .config import schema as cfg
from .config.base import ConfigError
from .config.load import load, quick_start, resolve
from .governance.keys import cli as keys_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m proxy", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="YAML or JSON config file")
    source.add_argument(
        "--upstream", help="quick start: send every model to this OpenAI-compatible base URL"
    )
    serve.add_argument(
        "--upstream-key",
        default=os.environ.get("UPSTREAM_API_KEY"),
        help="key for --upstream (default: $UPSTREAM_API_KEY)",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument(
        "--workers", type=int, help="worker processes sharing the port (default: one per core)"
    )
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate chain (PEM)")
    serve.add_argument("--tls-key", help="private key for --tls-cert (PEM)")
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without API keys: anyone who reaches the port may use every model",
    )

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")

    migrate = sub.add_parser("migrate", help="apply database migrations and exit")
    migrate.add_argument("--config", help="config file naming the database (default: SQLite)")

    keys_cli.add_parser(sub)

    from .usage import report

    usage = sub.add_parser("usage", help="print requests, tokens and latency from the ledger")
    usage.add_argument(
        "--since", type=report.parse_since, default="1h", help="90s, 15m, 1h, 7d… (default 1h)"
    )
    usage.add_argument("--by", choices=tuple(report.GROUPS), default="model")
    usage.add_argument("--config", help="config file naming the database (default: SQLite)")
    return parser


def _server_overrides(args: argparse.Namespace) -> dict[str, object]:
    fields = ("host", "port", "workers", "tls_cert", "tls_key")
    return {f: getattr(args, f) for f in fields if getattr(args, f) is not None}


def load_config(args: argparse.Namespace) -> cfg.Config:
    config = load(args.config) if args.config else quick_start(args.upstream, args.upstream_key)
    overrides = _server_overrides(args)
    if overrides:
        server = msgspec.structs.replace(config.server, **overrides)
        config = resolve(msgspec.structs.replace(config, server=server))
    return config


def _migrate(config: cfg.Config | None) -> int:
    import asyncio

    from .db import migrate

    database = config.database if config else cfg.Database()
    applied = asyncio.run(migrate(database))
    where = "postgresql" if database.is_postgres else database.sqlite_path
    print(f"{where}: applied {', '.join(applied)}" if applied else f"{where}: up to date")
    return 0


def _auth_choice(config: cfg.Config, no_auth: bool) -> cfg.Config:
    """Auth is on unless the operator says ``--no-auth`` (a config saying
    ``auth.enabled: false`` is not enough on its own)."""
    if no_auth:
        print("warning: --no-auth: serving without API keys", file=sys.stderr)
        return msgspec.structs.replace(
            config, auth=msgspec.structs.replace(config.auth, enabled=False)
        )
    if not config.auth.enabled:
        raise ConfigError("auth.enabled is false: pass --no-auth to serve without API keys")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            config = load(args.file)
            deployments = sum(len(m.deployments) for m in config.models)
            print(f"ok: {len(config.models)} models, {deployments} deployments")
            return 0
        if args.command == "migrate":
            return _migrate(load(args.config) if args.config else None)
        if args.command == "usage":
            from .usage import report

            database = load(args.config).database if args.config else cfg.Database()
            return report.run(database, args.since, args.by)
        if args.command in ("keys", "teams"):
            given = getattr(args, "config", None)  # `keys update` omits absent options
            return keys_cli.run(args, load(given).database if given else cfg.Database())
        config = _auth_choice(load_config(args), args.no_auth)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    from .serve import serve  # the server stack is only imported when serving

    return serve(config)
