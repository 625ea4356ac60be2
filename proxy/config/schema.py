"""The rest of the config's shape: the server, database, Redis, auth (keys, JWTs,
OIDC), limits, declared keys, the ledger, tracing, and ``Config`` holding them all
(package docstring: __init__.py)."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from .base import Limit, PositiveFloat, PositiveInt, Role, Span
from .upstreams import BudgetPeriod, Model, Routing


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
    # Start a W3C trace (traceparent) for requests that arrive without one. Without
    # effect once tracing.endpoint is set: the proxy's own spans decide then.
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
    """JWT verification (proxy/governance/tokens.py): issuers, leeway and caches."""

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
    """OpenID Connect login for the operator console (proxy/admin/oidc.py)."""

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
    # The most of a key's per-minute request and token limits a worker takes from
    # Redis at once, to admit that key's next requests without a round trip (a
    # lease, given back within ``flush_interval``); 0: every request goes to Redis.
    # Keys with max_parallel, a budget or a limited team never lease.
    lease_share: Annotated[float, msgspec.Meta(ge=0, le=0.1)] = 0.01


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


class Tracing(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """OpenTelemetry spans sent over OTLP/HTTP (protobuf) to Jaeger or a collector
    (proxy/ops/tracing.py, docs/observability.md)."""

    # The OTLP/HTTP traces URL, e.g. http://jaeger:4318/v1/traces; empty: no spans.
    endpoint: str = ""
    # Share of new traces kept; a client's traceparent decides for its own trace, and
    # a trace with an error (5xx, a retried attempt, a broken stream) is always kept.
    sample_ratio: Annotated[float, msgspec.Meta(ge=0, le=1)] = 1.0
    # Requests kept for their error per second and worker beyond the ratio: in an
    # error storm the rest are sampled like any other (the exporter costs CPU).
    max_error_traces: PositiveInt = 200
    service_name: str = "morngpt-proxy"
    # Finished requests waiting for export; beyond it their spans are dropped (and
    # counted), never waited for.
    queue_size: PositiveInt = 4096
    # Spans of at most this many requests go in one export request.
    batch_size: PositiveInt = 256
    # Seconds between exports (sooner when a batch is full), and the most one may take.
    export_interval: PositiveFloat = 1.0
    export_timeout: PositiveFloat = 5.0


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
    tracing: Tracing = Tracing()
