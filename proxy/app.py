"""The aiohttp application: routes, the proxy handler, and resource lifecycles.

Request path (DESIGN.md): read body → decode view → route → admit (Gate seam) →
forward → relay → settle + record (Sink seam). Each long-lived resource is one
``cleanup_ctx`` generator under a typed ``AppKey``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import AsyncIterator, Mapping
from time import perf_counter

import aiohttp
from aiohttp import web

from .config import Config
from .db import open_db
from .errors import (
    BadRequest,
    BodyTooLarge,
    NotFound,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    render,
)
from .exchange import OPEN, Exchange, Gate, Grant, OpenGate, Sinks
from .relay import relay_body, relay_stream
from .routing import Router
from .upstream import forward_headers, make_session, open_request
from .wire import RequestView, decode_request, rewrite

log = logging.getLogger("proxy")

# Endpoints whose streams accept stream_options.include_usage.
_USAGE_OPTION = frozenset(("chat/completions", "completions"))
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = "application/json"


class State:
    """Per-worker state shared by the handlers."""

    def __init__(self, config: Config, gate: Gate | None = None) -> None:
        self.config = config
        self.router = Router(config)
        self.gate: Gate = gate or OpenGate()
        self.sinks = Sinks()
        self.draining = False
        self.session: aiohttp.ClientSession | None = None


STATE = web.AppKey("state", State)


def build_app(config: Config, gate: Gate | None = None) -> web.Application:
    server = config.server
    app = web.Application(client_max_size=server.max_body_bytes, handler_args={})
    state = State(config, gate)
    app[STATE] = state
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(lambda app: open_db(app, config))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/{path:[a-z][a-z0-9_./-]*}", proxy)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.session = make_session(state.config.server)
    try:
        yield
    finally:
        await state.session.close()


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return "req_" + os.urandom(12).hex()


def error_response(err: ProxyError, request_id: str, extra: Mapping[str, str] = {}) -> web.Response:
    headers = {**extra, **err.headers, "X-Request-Id": request_id}
    return web.Response(body=render(err), status=err.status, content_type=_JSON, headers=headers)


async def read_body(request: web.Request, state: State) -> bytes:
    server = state.config.server
    size = sum(len(k) + len(v) for k, v in request.raw_headers)
    if size > server.max_header_bytes:
        raise BadRequest(
            f"Request headers are too large ({size} bytes; limit {server.max_header_bytes}).",
            code="request_headers_too_large",
        )
    try:
        async with asyncio.timeout(server.body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise BodyTooLarge(
            f"The request body is larger than {server.max_body_bytes} bytes."
        ) from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {server.body_timeout:g}s."
        ) from None


async def proxy(request: web.Request) -> web.StreamResponse:
    """POST /v1/{path}: the hot path."""
    state = request.app[STATE]
    path = request.match_info["path"]
    exchange = Exchange(request_id(request), path)
    grant = OPEN
    try:
        if state.draining:
            raise ServiceUnavailable(
                "The proxy is shutting down; retry shortly.", headers={"Retry-After": "1"}
            )
        body = await read_body(request, state)
        view = decode_request(body)
        exchange.model = view.model
        exchange.stream = bool(view.stream)
        route = state.router.route(view.model)
        grant = await state.gate.admit(request, view)
        exchange.key_id = grant.key_id
        upstream = route.pick()
        exchange.deployment = upstream.name
        rename = upstream.deployment.model or None
        strip = exchange.stream and path in _USAGE_OPTION and not view.wants_usage
        if strip or rename:
            body = rewrite(body, model=rename, include_usage=strip)
        headers = forward_headers(request.headers, upstream, exchange.request_id)
        assert state.session is not None
        sent = perf_counter()
        async with await open_request(state.session, upstream, "POST", path, headers, body) as up:
            exchange.upstream_time = perf_counter() - sent
            extra = {**grant.headers, "X-Request-Id": exchange.request_id}
            if up.status < 400 and up.content_type == "text/event-stream":
                return await relay_stream(request, up, upstream, exchange, extra, strip)
            return await relay_body(request, up, upstream, exchange, extra)
    except ProxyError as err:
        exchange.status = err.status
        exchange.error = type(err).__name__
        return error_response(err, exchange.request_id, grant.headers)
    except (asyncio.CancelledError, ConnectionResetError):
        exchange.error = "client_disconnected"
        exchange.status = exchange.status or 499
        raise
    except Exception as exc:
        log.exception("unexpected error serving %s", exchange.request_id)
        exchange.status = 500
        exchange.error = type(exc).__name__
        return error_response(
            ProxyError("The proxy failed to handle this request."), exchange.request_id
        )
    finally:
        grant.settle(exchange)
        state.sinks.record(exchange)


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: configured models in OpenAI's list shape; in wildcard mode the
    upstream's own list is passed through."""
    state = request.app[STATE]
    rid = request_id(request)
    try:
        grant = await state.gate.admit(request, None)
        names = [n for n in state.router.names() if grant.allows(n)]
        wildcard = state.router.wildcard
        if wildcard is not None and not names:
            upstream = wildcard.pick()
            headers = forward_headers(request.headers, upstream, rid)
            assert state.session is not None
            async with await open_request(
                state.session, upstream, "GET", "models", headers, None
            ) as up:
                return await relay_body(
                    request, up, upstream, Exchange(rid, "models"), {"X-Request-Id": rid}
                )
    except ProxyError as err:
        return error_response(err, rid)
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "morngpt"} for n in names]
    return web.json_response({"object": "list", "data": data}, headers={"X-Request-Id": rid})


async def not_found(request: web.Request) -> web.Response:
    return error_response(
        NotFound(f"Unknown request URL: {request.method} {request.path[:200]}."),
        request_id(request),
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].draining:
        return web.json_response({"status": "draining"}, status=503)
    return web.json_response({"status": "ready"})


__all__ = ["STATE", "Grant", "RequestView", "State", "build_app"]
