"""Typed configuration, validated once at start with msgspec.

A config file (YAML or JSON) decodes into ``Config``; the quick-start flags
(``--upstream URL --upstream-key KEY``) build the same structure with one wildcard
model. Everything the request path needs per model (URLs, header templates) is
derived here, once, not per request.

Invariant: a ``Config`` that ``load`` returned is valid; ``ConfigError`` carries one
line naming the field and what was wrong.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from .keys.secret import digest, is_weak
from .periods import PERIODS, zone

WILDCARD = "*"

PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]
# A span of time such as 90s, 15m, 1h, 90d or 2w (``seconds`` reads it).
Span = Annotated[str, msgspec.Meta(pattern=r"^\s*\d+(\.\d+)?[smhdw]\s*$")]
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_SPAN_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def seconds(text: str) -> float:
    """Seconds in a span such as ``90s``, ``15m``, ``1h``, ``7d`` or ``2w``; raises
    ``ValueError`` for anything else."""
    match = _SPAN.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected a duration like 30m, 1h or 7d, not {text!r}")
    return float(match[1]) * _SPAN_SECONDS[match[2]]


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


class Price(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """What a million tokens cost, in one currency-neutral decimal unit (write them as
    strings, "2.50"; plain YAML numbers work too). Cost is computed exactly
    (pricing.py), rounded up to 10**-9 of the unit per request."""

    prompt: Decimal
    completion: Decimal
    # Prompt tokens the upstream served from its cache; default: the prompt price.
    cached_prompt: Decimal | None = None


# Budgets are counted in Redis in integer nano-units (10**-9) with Lua's doubles, which
# are exact below 2**53: a budget of at most a million units leaves ample headroom.
MAX_BUDGET = Decimal(1_000_000)
BUDGET_DECIMALS = 9
BudgetPeriod = Literal["daily", "weekly", "monthly", "total"]


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
    # "openai": any OpenAI-compatible /v1 server. "azure": Azure OpenAI; base_url is
    # the resource endpoint, ``model`` the Azure deployment name, api_version required.
    kind: Literal["openai", "azure"] = "openai"
    api_version: str | None = None
    # Outbound requests per minute to this deployment, shared out over the worker
    # processes, to stay under the provider's own limit (None: no cap).
    rpm: PositiveInt | None = None
    # GET target of the recovery probe (never a completion); default {base_url}/models.
    health_url: str | None = None
    # Overrides the model's price for requests this deployment serves.
    price: Price | None = None
    # Filled by ``resolve`` from api_key_env; a literal key here works but belongs in
    # an environment variable (a Kubernetes Secret), not in a config file.
    api_key: str = ""


class Model(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A model name clients ask for, served by one or more deployments."""

    name: str
    deployments: Annotated[list[Deployment], msgspec.Meta(min_length=1)]
    # Models to try, in order, when no deployment of this one is available.
    fallbacks: list[str] = []
    # Without a price (here or on the deployment) a model's requests cost nothing.
    price: Price | None = None


class Cors(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Cross-origin access for browser apps (README, "What the proxy promises"); off
    unless configured."""

    # Origins allowed to call the proxy, exactly as browsers send them
    # (``https://app.example.com``); ``"*"`` allows any origin.
    allow_origins: Annotated[list[str], msgspec.Meta(min_length=1)]
    allow_methods: tuple[str, ...] = ("GET", "POST", "OPTIONS")
    # Request headers a browser may send; ``"*"`` allows whatever the preflight asks for
    # (the OpenAI SDKs send Authorization and several x-stainless-* headers).
    allow_headers: tuple[str, ...] = ("*",)
    # Response headers the page's script may read.
    expose_headers: tuple[str, ...] = (
        "X-Request-Id",
        "Retry-After",
        "retry-after-ms",
        "x-ratelimit-limit-requests",
        "x-ratelimit-remaining-requests",
        "x-ratelimit-reset-requests",
        "x-ratelimit-limit-tokens",
        "x-ratelimit-remaining-tokens",
        "x-ratelimit-reset-tokens",
    )
    # Seconds a browser may cache a preflight answer.
    max_age: Annotated[int, msgspec.Meta(ge=0)] = 600


class Server(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    # 0 means one worker process per CPU core.
    workers: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_body_bytes: PositiveInt = 8 * 1024 * 1024
    max_header_bytes: PositiveInt = 32 * 1024
    # A client must finish sending its body within this many seconds (slowloris).
    body_timeout: PositiveFloat = 30.0
    # A client connection without a complete request head for this long is closed: idle
    # between requests, or still trickling its headers in (slowloris). Keep it above the
    # idle timeout of a load balancer that reuses connections to the proxy (ALB: 60).
    idle_timeout: PositiveFloat = 75.0
    # Requests one worker serves at once; beyond it a prompt 503 with Retry-After
    # (shedding load instead of queueing it). None: no bound.
    max_inflight: PositiveInt | None = None
    # How long in-flight requests and streams may run after SIGTERM.
    grace_period: Annotated[float, msgspec.Meta(ge=0)] = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    # Upstream connection pool: total connections per worker, and per upstream host.
    pool_size: PositiveInt = 1024
    pool_per_host: Annotated[int, msgspec.Meta(ge=0)] = 0
    keepalive_timeout: PositiveFloat = 30.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Level of the one JSON access-log line per request (logger "proxy.access"); shown
    # when log_level lets it through. "off": no access log at all.
    access_log: Literal["debug", "info", "warning", "off"] = "info"
    # Environment variable holding a token that /metrics and /deployments then require
    # (Authorization: Bearer <token>); /healthz and /readyz stay open for probes.
    ops_token_env: str | None = None
    # Serve /metrics, /deployments (and the probes) on this port instead of `port`.
    ops_port: Annotated[int, msgspec.Meta(ge=0, le=65535)] | None = None
    # Start a W3C trace (traceparent) for requests that arrive without one.
    tracing: bool = False
    # Cross-origin (browser) access; None: no CORS headers, preflights are 404s.
    cors: Cors | None = None
    # Addresses or networks (CIDR) of proxies in front of this one whose
    # X-Forwarded-For / Forwarded headers are believed; from anyone else they are dropped.
    trusted_proxies: list[str] = []
    # Filled by ``resolve`` from ops_token_env.
    ops_token: str = ""


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
    # First part of every Redis key the limiter writes: `{key_prefix}:{<key id>}:...`.
    key_prefix: str = "morngpt"
    # The URL names one node of a Redis Cluster; the client discovers the others. One
    # API key's limiter keys share a hash slot, so its script runs on a single node.
    cluster: bool = False


# A per-minute limit; at most 10**9 so bucket arithmetic stays exact (ratelimit/bucket.py).
Limit = Annotated[int, msgspec.Meta(gt=0, le=1_000_000_000)]


class Auth(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """API keys on every /v1/* request. On by default: `serve --no-auth` turns it off."""

    enabled: bool = True
    # Environment variable holding the master key, which passes with every model and no
    # limits. A weak one (short, or few distinct characters) is refused at start.
    master_key_env: str | None = None
    # Seconds a looked-up key is trusted: a revoked key stops working within this.
    cache_ttl: PositiveFloat = 10.0
    # Seconds an unknown key stays unknown (a key created meanwhile waits this long).
    negative_ttl: PositiveFloat = 2.0
    # Keys remembered, known and unknown each: bounds memory under a flood of bad keys.
    cache_size: PositiveInt = 10_000
    # Filled by ``resolve`` from master_key_env: the master key's SHA-256 (hex).
    master_key_sha256: str = ""
    # JSON Web Tokens accepted as `Authorization: Bearer <JWT>` (docs/teams-and-sso.md).
    jwt: Jwt | None = None


Role = Literal["admin", "viewer", "member"]


class JwtIssuer(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One identity provider whose tokens the API accepts (signatures checked against
    its JWKS). Claims name the team and the user; the team's limits apply."""

    issuer: str  # the exact `iss` claim
    jwks_url: str
    # Accepted `aud` values: a token must name one of them.
    audience: Annotated[list[str], msgspec.Meta(min_length=1)]
    algorithms: list[Literal["RS256", "ES256", "EdDSA"]] = msgspec.field(
        default_factory=lambda: ["RS256", "ES256", "EdDSA"]
    )
    user_claim: str = "sub"
    # Claim holding the team id; a token without it is refused unless default_team.
    team_claim: str = "team"
    default_team: str | None = None
    # Claim holding a role or a list of roles/groups; mapped through role_map when
    # given (claim value -> role), else used as is. The highest role found wins.
    role_claim: str = "role"
    role_map: dict[str, Role] = {}
    # Limits for each user of a team on top of the team's own (None: none).
    user_rpm: Limit | None = None
    user_tpm: Limit | None = None
    user_max_parallel: PositiveInt | None = None
    user_budget: Decimal | None = None


class Jwt(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """JWT verification (proxy/tokens.py): issuers, leeway and caches."""

    issuers: Annotated[list[JwtIssuer], msgspec.Meta(min_length=1)]
    # Seconds of clock skew allowed on exp, nbf and iat.
    leeway: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30.0
    # Verified tokens remembered (by SHA-256), until their exp at the latest.
    cache_size: PositiveInt = 10_000
    # Seconds a JWKS is used before it is fetched again (in the background).
    jwks_ttl: PositiveFloat = 3600.0
    # Seconds between two fetches caused by an unknown kid, at least (a flood of
    # made-up kids costs one fetch per this interval).
    jwks_min_interval: PositiveFloat = 30.0
    # Seconds a JWKS fetch may take; a hung endpoint costs at most this, once per
    # backoff window.
    jwks_timeout: PositiveFloat = 3.0


class Oidc(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """OpenID Connect login for the operator console (proxy/oidc.py)."""

    issuer: str  # discovery at {issuer}/.well-known/openid-configuration
    # The console's callback URL as the browser reaches it, registered at the provider.
    redirect_url: str
    client_id_env: str = "PROXY_OIDC_CLIENT_ID"
    client_secret_env: str = "PROXY_OIDC_CLIENT_SECRET"
    # Secret that signs the session cookies (the same in every worker and replica).
    session_secret_env: str = "PROXY_CONSOLE_SESSION_SECRET"
    scopes: list[str] = msgspec.field(default_factory=lambda: ["openid", "profile", "email"])
    role_claim: str = "roles"
    role_map: dict[str, Role] = {}
    # Role of a user whose claims name none (None: such a user cannot log in).
    default_role: Role | None = None
    session_ttl: PositiveFloat = 8 * 3600.0
    timeout: PositiveFloat = 5.0
    # Filled by ``resolve`` from the environment.
    client_id: str = ""
    client_secret: str = ""
    session_secret: str = ""


class Limits(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """How per-key limits are enforced; the limits themselves belong to each key."""

    # Answer tokens reserved when a request names no max_tokens, max_completion_tokens
    # or max_output_tokens; reconciled with the real usage when the answer is over.
    default_max_tokens: Annotated[int, msgspec.Meta(ge=0)] = 1024
    # Seconds a parallel-request slot outlives a crashed process (live ones are renewed).
    slot_ttl: PositiveFloat = 60.0
    # Seconds between flushes of token reconciliations to Redis, and between probes of
    # an unreachable Redis.
    flush_interval: PositiveFloat = 1.0
    # A key whose spend (settled plus reserved) passes this share of its budget is
    # logged once per period and worker (logger proxy.budget), for alerting.
    budget_alert_share: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8


class DeclaredKey(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """An API key declared in the config file (small setups). The file holds the key's
    SHA-256 (``sha256``) or the name of the environment variable that holds the key
    (``key_env``): never the key itself."""

    id: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    name: str = ""
    sha256: str = ""
    key_env: str | None = None
    rpm: Limit | None = None
    tpm: Limit | None = None
    max_parallel: PositiveInt | None = None
    # Model names the key may use; empty: every model.
    models: list[str] = []
    expires_at: datetime | None = None
    metadata: dict[str, Any] = {}
    # Spending limit per period, in the unit of the prices (None: no budget).
    budget: Decimal | None = None
    budget_period: BudgetPeriod = "monthly"
    # IANA time zone in which the period starts (local midnight).
    budget_tz: str = "UTC"
    team_id: str | None = None
    role: Role = "member"


NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class Routing(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Retries, failover and passive health checks (seconds), for every model."""

    # Upstream requests one client request may cost, first try included.
    max_attempts: PositiveInt = 3
    # Wait before retry n: uniform(0, min(backoff_max, backoff_base * 2**(n-1))).
    backoff_base: NonNegativeFloat = 0.1
    backoff_max: NonNegativeFloat = 2.0
    # Longest upstream Retry-After the proxy waits out itself before sending to the
    # same deployment again; beyond it the client gets the 429/503 and its Retry-After.
    retry_after_max: NonNegativeFloat = 5.0
    # Consecutive failures that take a deployment out of rotation, and for how long
    # (then a probe of its health_url decides whether it comes back).
    failure_threshold: PositiveInt = 3
    cooldown: PositiveFloat = 5.0
    # Longest wait for a deployment's rpm cap when no other deployment can take the
    # request; beyond it the deployment is skipped, never queued for.
    rate_wait: NonNegativeFloat = 0.25


class Ledger(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The usage ledger's batch writer (docs/usage-ledger.md); sizes in records/bytes,
    times in seconds."""

    # A batch is written when it holds batch_rows records or batch_bytes bytes, or
    # flush_interval after the last write, whichever comes first. flush_interval is also
    # the longest a record waits in memory only: the loss window on SIGKILL.
    batch_rows: PositiveInt = 1000
    batch_bytes: PositiveInt = 1024 * 1024
    flush_interval: PositiveFloat = 0.5
    # Records waiting in memory beyond this many go to the spool file instead.
    high_water: PositiveInt = 20_000
    # Append-only files holding records while the database cannot take them. They are
    # replayed into this config's database, so never point two ledgers at one directory.
    spool_dir: str = "var/spool"
    # After SIGTERM: time to commit what is queued; whatever is left is spooled.
    shutdown_timeout: PositiveFloat = 10.0
    # How long rows are kept (e.g. 90d; unset: for ever). PostgreSQL drops whole day
    # partitions past it, SQLite deletes in small steps. Keep it longer than the
    # longest budget period (budgets read the first hour of a period from the rows).
    retention: Span | None = None
    # How long the hourly and daily rollups are kept (unset: for ever); at least as
    # long as retention, since every report and budget reads them.
    rollup_retention: Span | None = None


class Config(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    models: Annotated[list[Model], msgspec.Meta(min_length=1)]
    server: Server = Server()
    database: Database = Database()
    redis: Redis = Redis()
    auth: Auth = Auth()
    limits: Limits = Limits()
    keys: list[DeclaredKey] = []
    # OpenID Connect login for the operator console (None: off).
    oidc: Oidc | None = None
    usage: Ledger = Ledger()
    routing: Routing = Routing()


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
