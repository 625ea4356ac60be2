"""Talking to upstream deployments: the pooled client session, header hygiene, and
opening a request with aiohttp exceptions translated into the proxy's own errors.

Everything per deployment (URL prefix, auth header, TLS context, timeouts) is built
once in ``Upstream.__init__``; per request only the client's headers are filtered.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable

import aiohttp
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


class Upstream:
    """One deployment, ready to receive requests."""

    __slots__ = ("auth", "base", "deployment", "name", "ssl", "timeout", "timeouts")

    def __init__(self, deployment: Deployment) -> None:
        self.deployment = deployment
        self.name = deployment.name
        self.base = deployment.base_url
        self.auth: tuple[tuple[str, str], ...] = (
            (("Authorization", f"Bearer {deployment.api_key}"),) if deployment.api_key else ()
        )
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
        return f"{self.base}/{path}"


def make_session(server: Server) -> aiohttp.ClientSession:
    """The worker's one pooled keep-alive client session."""
    connector = aiohttp.TCPConnector(
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
            return await session.request(
                method,
                upstream.url(path),
                data=body,
                headers=headers,
                ssl=upstream.ssl,
                timeout=upstream.timeout,
                allow_redirects=False,
            )
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
