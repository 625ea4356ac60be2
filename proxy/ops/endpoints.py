"""Operator endpoints: ``GET /metrics`` and the token that guards the ops endpoints.

``protect`` wraps an ops handler (``/metrics``, ``/deployments``) so that, when
``server.ops_token_env`` is configured, it answers only requests carrying
``Authorization: Bearer <token>``; the probes (``/healthz``, ``/readyz``) are never
wrapped. The token is compared in constant time and never logged.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from ..errors import Unauthorized, render
from . import metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="morngpt-ops"'}


def protect(handler: Handler, token: str) -> Handler:
    """``handler`` behind the ops token; unchanged when no token is configured."""
    if not token:
        return handler
    expected = f"Bearer {token}".encode()

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            err = Unauthorized("This endpoint needs the ops token (Authorization: Bearer …).")
            return web.Response(
                body=render(err), status=err.status, content_type="application/json",
                headers=_CHALLENGE,
            )  # fmt: skip
        return await handler(request)

    return guarded


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: every worker's metrics in Prometheus text format."""
    # In multi-worker mode this reads the workers' files: keep it off the event loop.
    body = await asyncio.get_running_loop().run_in_executor(None, metrics.scrape)
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})
