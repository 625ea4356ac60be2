"""Typed configuration, validated once at start with msgspec.

A config file (YAML or JSON) decodes into ``Config``; the quick-start flags
(``--upstream URL --upstream-key KEY``) build the same structure with one wildcard
model. Everything the request path needs per model (URLs, header templates) is
derived here, once, not per request.

Invariant: a ``Config`` that ``load`` returned is valid; ``ConfigError`` carries one
line naming the field and what was wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import msgspec

WILDCARD = "*"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class Secret(str):
    """A string that never shows itself in a repr (and so never in a log line)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'***'" if self else "''"


class ConfigError(Exception):
    """A config that cannot be used; the message is one line for the operator."""


class Timeouts(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Per-deployment timeouts in seconds. There is deliberately no total cap: a
    healthy long stream must never be cut."""

    connect: PositiveFloat = 5.0
    # Time until the response headers arrive. A non-streaming request waits for the
    # whole generation before its first byte, so this is generous by default.
    first_byte: PositiveFloat = 600.0
    # Longest silence allowed between two chunks of a response body.
    idle: PositiveFloat = 120.0


class Deployment(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One upstream that can serve a model."""

    base_url: str
    name: str = ""
    # Name of the environment variable that holds the upstream key (never the key).
    api_key_env: str | None = None
    # Model name sent upstream; empty means "the name the client asked for".
    model: str = ""
    timeouts: Timeouts = Timeouts()
    # PEM file of CAs to trust for this upstream, in addition to nothing else:
    # when set it replaces the system trust store for this deployment.
    ca_file: str | None = None
    weight: PositiveFloat = 1.0
    max_concurrent: PositiveInt | None = None
    # Filled by ``resolve`` from api_key_env; a literal key here works but belongs in
    # an environment variable (a Kubernetes Secret), not in a config file.
    api_key: str = ""


class Model(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A model name clients ask for, served by one or more deployments."""

    name: str
    deployments: Annotated[list[Deployment], msgspec.Meta(min_length=1)]


class Server(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # 0 means one worker process per CPU core.
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_header_bytes: PositiveInt = 32 * 1024
    # A client must finish sending its body within this many seconds (slowloris).
    body_timeout: PositiveFloat = 30.0
    # How long in-flight requests and streams may run after SIGTERM.
    grace_period: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    # Upstream connection pool: total connections per worker, and per upstream host.
    pool_size: PositiveInt = 1024
    pool_per_host: Annotated[int, msgspec.Meta(ge=0)] = 0
    keepalive_timeout: PositiveFloat = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class Database(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Where keys and the usage ledger live: PostgreSQL when a DSN is given, else an
    embedded SQLite file (so ``serve`` works on a bare machine)."""

    # Environment variable holding the PostgreSQL DSN (it may carry a password).
    url_env: str | None = None
    # A literal DSN, for setups where it holds no secret (tests, local development).
    url: str = ""
    sqlite_path: str = "var/morngpt.db"
    pool_max: PositiveInt = 10
    # Seconds any one statement may take before it counts as a failure.
    timeout: PositiveFloat = 5.0

    @property
    def is_postgres(self) -> bool:
        return bool(self.url)


class Redis(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Shared rate-limit state; without it limits are kept per process."""

    url_env: str | None = None
    url: str = ""
    # Seconds: every Redis call is bounded so a slow Redis can never hang a request.
    timeout: PositiveFloat = 0.25


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    models: Annotated[list[Model], msgspec.Meta(min_length=1)]
    server: Server = Server()
    database: Database = Database()
    redis: Redis = Redis()


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
    server = config.server
    if (server.tls_cert is None) != (server.tls_key is None):
        raise ConfigError(f"{source}: server.tls_cert and server.tls_key go together")
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
    return msgspec.structs.replace(config, models=models, database=database, redis=redis)


def _env(name: str, where: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return value


def _resolve_deployment(d: Deployment, where: str, model: str, index: int) -> Deployment:
    if not d.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.base_url: must start with http:// or https://")
    api_key = _env(d.api_key_env, f"{where}.api_key_env") if d.api_key_env else d.api_key
    if d.ca_file is not None and not Path(d.ca_file).is_file():
        raise ConfigError(f"{where}.ca_file: no such file {d.ca_file}")
    return msgspec.structs.replace(
        d,
        base_url=d.base_url.rstrip("/"),
        name=d.name or f"{model}/{index}",
        api_key=Secret(api_key),
    )
