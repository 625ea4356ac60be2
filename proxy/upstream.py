"""Talking to upstream deployments: header hygiene, and opening a request on the
worker's pooled client (``h1.py``) with its exceptions translated into the proxy's
own errors.

Everything per deployment (origin and TLS context, path prefix, auth header,
timeouts) is built once in ``Upstream.__init__``; per request only the client's
headers are filtered.

Two kinds share one request path: OpenAI-compatible (``{base}/{path}``, Bearer key)
and Azure OpenAI (``{base}/openai/deployments/{name}/{path}?api-version=…``,
``api-key`` header).

An ``Upstream`` also carries its routing state, read by routing, health checks and
metrics: ``inflight`` (requests sent whose response is not over), ``healthy`` (False
while cooling down), ``failures`` (consecutive) and ``latency`` (EWMA of the time to
response headers, seconds).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

from aiolimiter import AsyncLimiter

from . import h1
from .config import Deployment, Server
from .errors import UpstreamTimeout, UpstreamUnavailable

# Never forwarded: hop-by-hop headers (RFC 9110 §7.6.1), the client's credentials
# (the deployment's key replaces them), and what the client (h1.py) or we set.
_DROP = frozenset(
    h.lower()
    for h in (
        "Authorization",
        "Api-Key",
        "Proxy-Authorization",
        "Cookie",
        "Host",
        "Content-Length",
        "Content-Type",
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Expect",
        "Accept-Encoding",
        # The proxy sends the body decoded (ingress.py).
        "Content-Encoding",
        "X-Request-Id",
    )
)
_JSON = "application/json"


_LATENCY_WEIGHT = 0.2  # share of the newest sample in the latency EWMA


class Upstream:
    """One deployment, ready to receive requests, with its routing state."""

    __slots__ = (
        "auth",
        "base",
        "cap",
        "cooldown_until",
        "deployment",
        "failures",
        "health_origin",
        "health_target",
        "health_url",
        "healthy",
        "inflight",
        "latency",
        "limiter",
        "model",
        "name",
        "origin",
        "prefix",
        "query",
        "target_prefix",
        "timeouts",
        "weight",
    )

    def __init__(
        self, deployment: Deployment, model: str | None = None, rate_share: float = 1.0
    ) -> None:
        """``model`` is the name to send upstream when the deployment names none (None:
        the client's own); ``rate_share`` the part of ``rpm`` this process may use."""
        self.deployment = deployment
        self.name = deployment.name
        self.base = deployment.base_url
        self.model = deployment.model or model
        key = deployment.api_key
        if deployment.kind == "azure":
            name = quote(deployment.model, safe="")
            self.prefix = f"{self.base}/openai/deployments/{name}/"
            self.query = f"?api-version={quote(deployment.api_version or '', safe='')}"
            self.auth: tuple[tuple[str, str], ...] = (("api-key", key),) if key else ()
            default_health = f"{self.base}/openai/models{self.query}"
        else:
            self.prefix, self.query = f"{self.base}/", ""
            self.auth = (("Authorization", f"Bearer {key}"),) if key else ()
            default_health = f"{self.base}/models"
        self.health_url = deployment.health_url or default_health
        self.origin = h1.Origin(self.base, deployment.ca_file)
        self.target_prefix = urlsplit(self.prefix).path
        if urlsplit(self.health_url)[:2] == urlsplit(self.base)[:2]:
            self.health_origin = self.origin
        else:
            self.health_origin = h1.Origin(self.health_url, deployment.ca_file)
        health = urlsplit(self.health_url)
        self.health_target = health.path or "/"
        if health.query:
            self.health_target += f"?{health.query}"
        self.weight = deployment.weight
        self.cap = deployment.max_concurrent or sys.maxsize
        self.limiter: AsyncLimiter | None = None
        if deployment.rpm is not None:
            self.limiter = AsyncLimiter(max(1.0, deployment.rpm * rate_share), 60)
        self.inflight = 0
        self.healthy = True
        self.failures = 0
        self.latency = 0.0
        # time.monotonic() at which a cooldown ends (meaningful while not healthy).
        self.cooldown_until = 0.0
        # Connect and first byte are timed here, idle gaps by the relay.
        self.timeouts = deployment.timeouts

    def url(self, path: str) -> str:
        """Upstream URL for a client path below ``/v1/`` (``chat/completions``), which
        may carry the client's query string."""
        return f"{self.prefix}{self._with_query(path)}"

    def target(self, path: str) -> str:
        """The request target (path and query) of ``url(path)``."""
        return f"{self.target_prefix}{self._with_query(path)}"

    def _with_query(self, path: str) -> str:
        if self.query and "?" in path:  # the deployment's parameters join the client's
            return f"{path}&{self.query[1:]}"
        return f"{path}{self.query}"

    def is_available(self) -> bool:
        """In rotation and under its concurrency cap."""
        return self.healthy and self.inflight < self.cap

    def has_rate(self) -> bool:
        """Whether its outbound rate cap (if any) lets a request go now."""
        return self.limiter is None or self.limiter.has_capacity()

    @property
    def load(self) -> float:
        """In-flight requests per unit of weight: what routing balances."""
        return self.inflight / self.weight

    def observe_latency(self, seconds: float) -> None:
        """Fold one time-to-headers sample into the EWMA."""
        if self.latency:
            self.latency += _LATENCY_WEIGHT * (seconds - self.latency)
        else:
            self.latency = seconds


def make_client(server: Server) -> h1.Client:
    """The worker's one pooled keep-alive upstream client."""
    return h1.Client(
        limit=server.pool_size,
        limit_per_host=server.pool_per_host,
        keepalive=server.keepalive_timeout,
    )


def forward_headers(
    client: Mapping[str, str], upstream: Upstream, request_id: str
) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop and credentials, plus the deployment's key."""
    drop = _DROP
    connection = client.get("Connection")
    if connection:  # headers the client named in Connection are hop-by-hop too
        drop = _DROP | {h.strip().lower() for h in connection.split(",")}
    headers = [(k, v) for k, v in client.items() if k.lower() not in drop]
    headers.extend(upstream.auth)
    headers.append(("Content-Type", _JSON))
    headers.append(("Accept-Encoding", "identity"))
    headers.append(("X-Request-Id", request_id))
    return headers


async def open_request(
    client: h1.Client,
    upstream: Upstream,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    origin: h1.Origin | None = None,
) -> h1.Response:
    """Send the request and wait for the response headers (bounded by first_byte;
    each later body read by idle). ``target`` is the path and query on ``origin``
    (default: the deployment's)."""
    timeouts = upstream.timeouts
    try:
        return await client.request(
            origin or upstream.origin,
            method,
            target,
            headers,
            body,
            connect_timeout=timeouts.connect,
            first_byte=timeouts.first_byte,
            idle=timeouts.idle,
        )
    except h1.ConnectTimeout:
        raise UpstreamTimeout(
            f"Could not connect to the upstream within {timeouts.connect:g}s."
        ) from None
    except TimeoutError:
        raise UpstreamTimeout(
            f"The upstream did not answer within {timeouts.first_byte:g}s."
        ) from None
    except h1.TLSFailed:
        raise UpstreamUnavailable(
            "TLS handshake with the upstream failed (certificate not trusted?)."
        ) from None
    except h1.ConnectFailed:
        raise UpstreamUnavailable("Could not connect to the upstream.") from None
    except OSError:  # h1.Disconnected included
        raise UpstreamUnavailable("The upstream closed the connection before answering.") from None
