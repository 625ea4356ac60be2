"""Talking to upstream deployments: header hygiene, and opening a request on the
worker's pooled client (``h1.py``) with its exceptions translated into the proxy's
own errors.

Everything per deployment (origin and TLS context, path prefix, auth header,
timeouts) is built once in ``Upstream.__init__``. The header lines a client's headers
become are made once per headers object (``Upstream.block``): the front hands every
request of a keep-alive client that repeats its headers the same object
(``front.Door.known``). Per request only ``X-Request-Id`` and the trace context are
added.

Two kinds share one request path: OpenAI-compatible (``{base}/{path}``, Bearer key)
and Azure OpenAI (``{base}/openai/deployments/{name}/{path}?api-version=…``,
``api-key`` header).

An ``Upstream`` is fixed once built: what changes while the proxy runs (requests in
flight, health, latency) is its ``health.DeploymentState``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

from multidict import CIMultiDictProxy

from ..config.schema import Server
from ..config.upstreams import Deployment
from ..errors import UpstreamTimeout, UpstreamUnavailable
from . import h1
from .faults import ConnectFailed, ConnectTimeout, TLSFailed
from .h1_conn import Origin, Response

if TYPE_CHECKING:
    from .ingress import Forwarding


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
        # The trace context goes per request, not in the kept block
        # (``tracing.trace_context``).
        "traceparent",
        "tracestate",
    )
)
# Kept header blocks per deployment; when full the table starts again.
_BLOCKS = 256
_JSON = "application/json"


class Upstream:
    """One deployment, ready to receive requests (fixed; its state is elsewhere)."""

    __slots__ = (
        "auth",
        "base",
        "blocks",
        "cap",
        "deployment",
        "health_origin",
        "health_target",
        "health_url",
        "model",
        "name",
        "origin",
        "prefix",
        "query",
        "target_prefix",
        "timeouts",
        "weight",
    )

    def __init__(self, deployment: Deployment, model: str | None = None) -> None:
        """``model`` is the name to send upstream when the deployment names none (None:
        the client's own)."""
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
        self.origin = Origin(self.base, deployment.ca_file)
        self.target_prefix = urlsplit(self.prefix).path
        if urlsplit(self.health_url)[:2] == urlsplit(self.base)[:2]:
            self.health_origin = self.origin
        else:
            self.health_origin = Origin(self.health_url, deployment.ca_file)
        health = urlsplit(self.health_url)
        self.health_target = health.path or "/"
        if health.query:
            self.health_target += f"?{health.query}"
        self.weight = deployment.weight
        self.cap = deployment.max_concurrent or sys.maxsize
        # Connect and first byte are timed here, idle gaps by the relay.
        self.timeouts = deployment.timeouts
        self.blocks: dict[tuple[int, str | None], tuple[CIMultiDictProxy[str], str]] = {}

    def block(self, given: CIMultiDictProxy[str], peer: str | None, forwarding: Forwarding) -> str:
        """The header lines a client's headers (``given``, from ``peer``) become on
        their way to this deployment (``forward_headers`` after ``forwarding``), made
        once per headers object and peer. The object is kept beside its lines, so its
        id is not another's while they are kept."""
        key = (id(given), peer)
        kept = self.blocks.get(key)
        if kept is not None and kept[0] is given:
            return kept[1]
        lines = h1.header_lines(forward_headers(forwarding.headers(given, peer), self.auth))
        if len(self.blocks) >= _BLOCKS:
            self.blocks.clear()
        self.blocks[key] = (given, lines)
        return lines

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


def make_client(server: Server) -> h1.Client:
    """The worker's one pooled keep-alive upstream client."""
    return h1.Client(
        limit=server.pool_size,
        limit_per_host=server.pool_per_host,
        keepalive=server.keepalive_timeout,
    )


def forward_headers(
    client: Mapping[str, str], auth: tuple[tuple[str, str], ...]
) -> list[tuple[str, str]]:
    """Client headers minus hop-by-hop, credentials and the trace context, plus the
    deployment's key (``auth``)."""
    drop = _DROP
    connection = client.get("Connection")
    if connection:  # headers the client named in Connection are hop-by-hop too
        drop = _DROP | {h.strip().lower() for h in connection.split(",")}
    headers = [(k, v) for k, v in client.items() if k.lower() not in drop]
    headers.extend(auth)
    headers.append(("Content-Type", _JSON))
    headers.append(("Accept-Encoding", "identity"))
    return headers


async def open_request(
    client: h1.Client,
    upstream: Upstream,
    method: str,
    target: str,
    block: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    origin: Origin | None = None,
) -> Response:
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
            block=block,
            connect_timeout=timeouts.connect,
            first_byte=timeouts.first_byte,
            idle=timeouts.idle,
        )
    except ConnectTimeout:
        raise UpstreamTimeout(
            f"Could not connect to the upstream within {timeouts.connect:g}s."
        ) from None
    except TimeoutError:
        raise UpstreamTimeout(
            f"The upstream did not answer within {timeouts.first_byte:g}s."
        ) from None
    except TLSFailed:
        raise UpstreamUnavailable(
            "TLS handshake with the upstream failed (certificate not trusted?)."
        ) from None
    except ConnectFailed:
        raise UpstreamUnavailable("Could not connect to the upstream.") from None
    except OSError:  # h1.Disconnected included
        raise UpstreamUnavailable("The upstream closed the connection before answering.") from None
