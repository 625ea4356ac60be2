"""Talking to upstream deployments: the pooled client session, header hygiene, and
opening a request with aiohttp exceptions translated into the proxy's own errors.

Everything per deployment (URL prefix, auth header, TLS context, timeouts) is built
once in ``Upstream.__init__``; per request only the client's headers are filtered.
A request that went out on a pooled connection the upstream had just closed (the
keep-alive race: its idle timer fired as the request arrived) is sent again at once
on another connection, unseen and blamed on no one (~0.6 µs per request to know).

Two kinds share one request path: OpenAI-compatible (``{base}/{path}``, Bearer key)
and Azure OpenAI (``{base}/openai/deployments/{name}/{path}?api-version=…``,
``api-key`` header).

An ``Upstream`` also carries its routing state, read by routing, health checks and
metrics: ``inflight`` (requests sent whose response is not over), ``healthy`` (False
while cooling down), ``failures`` (consecutive) and ``latency`` (EWMA of the time to
response headers, seconds).
"""

from __future__ import annotations

import asyncio
import contextvars
import ssl
import sys
import weakref
from collections.abc import Iterable
from urllib.parse import quote

import aiohttp
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from aiolimiter import AsyncLimiter
from multidict import CIMultiDict, CIMultiDictProxy

from .config import Deployment, Server
from .errors import UpstreamTimeout, UpstreamUnavailable

# Never forwarded: hop-by-hop headers (RFC 9110 §7.6.1), the client's credentials
# (the deployment's key replaces them), and what aiohttp or we set ourselves.
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
        "health_url",
        "healthy",
        "inflight",
        "latency",
        "limiter",
        "model",
        "name",
        "prefix",
        "query",
        "ssl",
        "timeout",
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
        self.timeouts = deployment.timeouts
        # total/sock_read stay unset: first byte and idle gaps are timed by the relay.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=deployment.timeouts.connect
        )
        self.ssl: ssl.SSLContext | bool = True
        if deployment.ca_file:
            self.ssl = ssl.create_default_context(cafile=deployment.ca_file)

    def url(self, path: str) -> str:
        """Upstream URL for a client path below ``/v1/`` (``chat/completions``)."""
        return f"{self.prefix}{path}{self.query}"

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


# Whether the connection the current request went out on had served a request before
# (set by ``_Connector.connect``, in the task that sends the request).
_REUSED: contextvars.ContextVar[bool] = contextvars.ContextVar("reused", default=False)
# Times a request is sent again at once because a pooled connection was found closed.
STALE_RETRIES = 2


class _Connector(aiohttp.TCPConnector):
    """The pool, noting in ``_REUSED`` whether the connection it hands out is a reused
    one: only then is a connection closed without an answer the keep-alive race."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._served: weakref.WeakSet[object] = weakref.WeakSet()

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's signature
    ) -> Connection:
        connection = await super().connect(req, traces, timeout)
        protocol = connection.protocol
        _REUSED.set(protocol in self._served)
        if protocol is not None:
            self._served.add(protocol)
        return connection


def make_session(server: Server) -> aiohttp.ClientSession:
    """The worker's one pooled keep-alive client session."""
    connector = _Connector(
        limit=server.pool_size,
        limit_per_host=server.pool_per_host,
        keepalive_timeout=server.keepalive_timeout,
        ttl_dns_cache=300,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def forward_headers(
    client: CIMultiDictProxy[str], upstream: Upstream, request_id: str
) -> CIMultiDict[str]:
    """Client headers minus hop-by-hop and credentials, plus the deployment's key."""
    drop: Iterable[str] = _DROP
    connection = client.get("Connection")
    if connection:  # headers the client named in Connection are hop-by-hop too
        drop = _DROP | {h.strip().lower() for h in connection.split(",")}
    headers: CIMultiDict[str] = CIMultiDict(
        (k, v) for k, v in client.items() if k.lower() not in drop
    )
    headers.extend(upstream.auth)
    headers["Content-Type"] = _JSON
    headers["Accept-Encoding"] = "identity"
    headers["X-Request-Id"] = request_id
    return headers


async def open_request(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    method: str,
    path: str,
    headers: CIMultiDict[str],
    body: bytes | None,
) -> aiohttp.ClientResponse:
    """Send the request and wait for the response headers (bounded by first_byte)."""
    try:
        async with asyncio.timeout(upstream.timeouts.first_byte):
            for _ in range(STALE_RETRIES):
                try:
                    return await _send(session, upstream, method, path, headers, body)
                except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                    # The keep-alive race: the upstream closed an idle pooled connection
                    # as the request went out on it. No answer came, and the request
                    # can go again on another connection at once; it is nobody's failure.
                    if isinstance(exc, aiohttp.ClientConnectorError) or not _REUSED.get():
                        raise
            return await _send(session, upstream, method, path, headers, body)
    except aiohttp.ServerTimeoutError:  # before TimeoutError: it is one
        raise UpstreamTimeout(
            f"Could not connect to the upstream within {upstream.timeouts.connect:g}s."
        ) from None
    except TimeoutError:
        raise UpstreamTimeout(
            f"The upstream did not answer within {upstream.timeouts.first_byte:g}s."
        ) from None
    except aiohttp.ClientSSLError:
        raise UpstreamUnavailable(
            "TLS handshake with the upstream failed (certificate not trusted?)."
        ) from None
    except aiohttp.ClientConnectorError:
        raise UpstreamUnavailable("Could not connect to the upstream.") from None
    except (aiohttp.ClientError, OSError):
        raise UpstreamUnavailable("The upstream closed the connection before answering.") from None


async def _send(
    session: aiohttp.ClientSession,
    upstream: Upstream,
    method: str,
    path: str,
    headers: CIMultiDict[str],
    body: bytes | None,
) -> aiohttp.ClientResponse:
    return await session.request(
        method,
        upstream.url(path),
        data=body,
        headers=headers,
        ssl=upstream.ssl,
        timeout=upstream.timeout,
        allow_redirects=False,
    )
