"""Reading a config: ``load`` (YAML or JSON) and ``quick_start`` build a ``Config``,
``resolve`` derives what the request path needs per model, once; the checks that
span fields; ``worker_count`` (package docstring: __init__.py)."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from ..governance.keys.secret import digest, is_weak
from ..governance.periods import PERIODS, zone
from .base import WILDCARD, ConfigError, Secret, seconds
from .schema import Config, DeclaredKey, Ledger, Server
from .upstreams import BUDGET_DECIMALS, MAX_BUDGET, Deployment, Model, Price


def load(path: str | Path) -> Config:
    """Read, decode and validate a YAML or JSON config file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        if path.suffix == ".json":
            config = msgspec.json.decode(raw, type=Config)
        else:
            config = msgspec.yaml.decode(raw, type=Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except msgspec.DecodeError as exc:
        detail = " ".join(str(exc).split())  # YAML errors span lines; keep one
        raise ConfigError(f"{path}: not valid YAML/JSON: {detail}") from None
    return resolve(config, source=str(path))


def quick_start(upstream: str, upstream_key: str | None) -> Config:
    """The config the ``--upstream`` flags mean: every model goes to one upstream."""
    deployment = Deployment(base_url=upstream, name="upstream", api_key=upstream_key or "")
    return resolve(Config(models=[Model(name=WILDCARD, deployments=[deployment])]))


# Budgets read the first hour of a period from the rows when it does not start on the
# hour (usage/spend.py): rows must outlive the longest period, a month.
MIN_RETENTION = 32 * 86400


def _check_retention(usage: Ledger, source: str) -> None:
    rows = math.inf if usage.retention is None else seconds(usage.retention)
    rollups = math.inf if usage.rollup_retention is None else seconds(usage.rollup_retention)
    if rows < MIN_RETENTION:
        raise ConfigError(f"{source}: usage.retention: at least 32d (budgets read rows)")
    if rollups < rows:
        raise ConfigError(f"{source}: usage.rollup_retention: must not be shorter than retention")


def resolve(config: Config, source: str = "config") -> Config:
    """Check what the schema cannot express and fill in derived fields."""
    seen: set[str] = set()
    models = []
    for i, model in enumerate(config.models):
        where = f"{source}: models[{i}]"
        if not model.name:
            raise ConfigError(f"{where}.name: must not be empty")
        if model.name in seen:
            raise ConfigError(f"{where}.name: duplicate model name {model.name!r}")
        seen.add(model.name)
        deployments = [
            _resolve_deployment(d, f"{where}.deployments[{j}]", model.name, j)
            for j, d in enumerate(model.deployments)
        ]
        models.append(msgspec.structs.replace(model, deployments=deployments))
    _check_fallbacks(models, source)
    _check_prices(models, source)
    server = config.server
    if (server.tls_cert is None) != (server.tls_key is None):
        raise ConfigError(f"{source}: server.tls_cert and server.tls_key go together")
    server = _resolve_ops(server, source)
    _resolve_proxies(server, source)
    database = config.database
    if database.url_env:
        database = msgspec.structs.replace(
            database, url=Secret(_env(database.url_env, f"{source}: database.url_env"))
        )
    if database.url and not database.url.startswith(("postgres://", "postgresql://")):
        raise ConfigError(f"{source}: database.url: must be a postgresql:// DSN")
    redis = config.redis
    if redis.url_env:
        redis = msgspec.structs.replace(
            redis, url=Secret(_env(redis.url_env, f"{source}: redis.url_env"))
        )
    if redis.url and not redis.url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{source}: redis.url: must be a redis:// or rediss:// URL")
    if redis.cluster and not redis.url.startswith(("redis://", "rediss://")):
        raise ConfigError(f"{source}: redis.cluster: needs a redis:// or rediss:// url")
    _check_retention(config.usage, source)
    config = _resolve_keys(config, source)
    endpoint = urlsplit(config.tracing.endpoint)
    if endpoint.geturl() and (endpoint.scheme not in ("http", "https") or not endpoint.hostname):
        raise ConfigError(f"{source}: tracing.endpoint: must be an http:// or https:// URL")
    oidc = config.oidc
    if oidc is not None:
        oidc = msgspec.structs.replace(
            oidc,
            client_id=_env(oidc.client_id_env, f"{source}: oidc.client_id_env"),
            client_secret=Secret(_env(oidc.client_secret_env, f"{source}: oidc.client_secret_env")),
        )
    return msgspec.structs.replace(
        config, models=models, server=server, database=database, redis=redis, oidc=oidc
    )


def _check_fallbacks(models: list[Model], source: str) -> None:
    names = {m.name for m in models}
    for i, model in enumerate(models):
        for j, fallback in enumerate(model.fallbacks):
            where = f"{source}: models[{i}].fallbacks[{j}]"
            if fallback == model.name:
                raise ConfigError(f"{where}: model {model.name!r} cannot fall back to itself")
            if fallback not in names or fallback == WILDCARD:
                raise ConfigError(f"{where}: no model named {fallback!r}")


def _check_prices(models: list[Model], source: str) -> None:
    """Prices are finite and not negative; deployments that share a name share a price
    (the ledger prices a request by the name of the deployment that served it)."""
    priced: dict[str, Price | None] = {}
    for i, model in enumerate(models):
        for j, d in enumerate(model.deployments):
            where = f"{source}: models[{i}].deployments[{j}]"
            price = d.price or model.price
            for field in ("prompt", "completion", "cached_prompt"):
                value = getattr(price, field, None)
                if value is not None and not (value.is_finite() and value >= 0):
                    raise ConfigError(f"{where}: price.{field}: must be a number >= 0")
            if priced.setdefault(d.name, price) != price:
                raise ConfigError(
                    f"{where}.name: deployments named {d.name!r} have different prices; "
                    "give them different names"
                )


def check_budget(amount: Decimal, period: str, tz: str) -> str | None:
    """Why a key's budget cannot be used, or None when it can."""
    if not amount.is_finite() or not 0 < amount <= MAX_BUDGET:
        return f"budget must be above 0 and at most {MAX_BUDGET}"
    if amount != amount.quantize(Decimal(1).scaleb(-BUDGET_DECIMALS)):
        return f"budget has more than {BUDGET_DECIMALS} decimals"
    if period not in PERIODS:
        return f"unknown budget period {period!r}"
    try:
        zone(tz)
    except ValueError as exc:
        return str(exc)
    return None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _resolve_keys(config: Config, source: str) -> Config:
    """Hash the master key and the declared keys (the keys themselves are not kept)."""
    auth = config.auth
    if auth.master_key_env:
        where = f"{source}: auth.master_key_env"
        master = _env(auth.master_key_env, where)
        if is_weak(master):
            raise ConfigError(
                f"{where}: the master key in {auth.master_key_env} is too weak (need 32+ "
                "characters, 8+ distinct; e.g. `openssl rand -hex 32`)"
            )
        auth = msgspec.structs.replace(auth, master_key_sha256=digest(master))
    keys: list[DeclaredKey] = []
    for i, key in enumerate(config.keys):
        where = f"{source}: keys[{i}]"
        if any(k.id == key.id for k in keys):
            raise ConfigError(f"{where}.id: duplicate key id {key.id!r}")
        sha = digest(_env(key.key_env, f"{where}.key_env")) if key.key_env else key.sha256.lower()
        # With key_env, sha256 may only be what an earlier resolve derived from it.
        if not sha or (key.key_env and key.sha256 not in ("", sha)):
            raise ConfigError(f"{where}: give exactly one of sha256 and key_env")
        if not _SHA256.fullmatch(sha):
            raise ConfigError(f"{where}.sha256: must be 64 hex digits (sha256sum of the key)")
        if key.budget is not None:
            wrong = check_budget(key.budget, key.budget_period, key.budget_tz)
            if wrong:
                raise ConfigError(f"{where}.budget: {wrong}")
        keys.append(msgspec.structs.replace(key, sha256=sha))
    return msgspec.structs.replace(config, auth=auth, keys=keys)


def _env(name: str, where: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return value


def _resolve_ops(server: Server, source: str) -> Server:
    if server.ops_port is not None and server.ops_port == server.port != 0:
        raise ConfigError(f"{source}: server.ops_port: must differ from server.port")
    if not server.ops_token_env:
        return server
    token = _env(server.ops_token_env, f"{source}: server.ops_token_env")
    return msgspec.structs.replace(server, ops_token=Secret(token))


def _resolve_proxies(server: Server, source: str) -> None:
    for i, net in enumerate(server.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(
                f"{source}: server.trusted_proxies[{i}]: not an address or network: {net!r}"
            ) from None


def _resolve_deployment(d: Deployment, where: str, model: str, index: int) -> Deployment:
    if not d.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.base_url: must start with http:// or https://")
    api_key = _env(d.api_key_env, f"{where}.api_key_env") if d.api_key_env else d.api_key
    if d.ca_file is not None and not Path(d.ca_file).is_file():
        raise ConfigError(f"{where}.ca_file: no such file {d.ca_file}")
    if d.kind == "azure" and not d.api_version:
        raise ConfigError(f"{where}.api_version: required for kind azure (e.g. 2024-10-21)")
    if d.kind == "azure" and not d.model:
        raise ConfigError(f"{where}.model: required for kind azure (the Azure deployment name)")
    if d.health_url is not None and not d.health_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.health_url: must start with http:// or https://")
    return msgspec.structs.replace(
        d,
        base_url=d.base_url.rstrip("/"),
        name=d.name or f"{model}/{index}",
        api_key=Secret(api_key),
    )


def worker_count(config: Config) -> int:
    """How many worker processes serve: ``server.workers``, or one per CPU this
    process may run on."""
    return config.server.workers or len(os.sched_getaffinity(0))
