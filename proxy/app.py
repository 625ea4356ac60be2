"""The aiohttp application: routes, the proxy handler, and resource lifecycles.

Request path (DESIGN.md): authenticate (Gate seam, headers only) → read body →
decode view → admit (Gate seam: model permission, limits) → route → forward → relay
→ settle + record (Sink seam). Each long-lived resource is one
``cleanup_ctx`` generator under a typed ``AppKey``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from . import accesslog, console, ingress, metrics, tracing
from .admin import api as admin
from .config import Config
from .db import DB, Db, open_db
from .errors import (
    BodyTooLarge,
    HeadersTooLarge,
    NotFound,
    NotImplementedByProxy,
    Overloaded,
    ProxyError,
    RequestTimeout,
    ServiceUnavailable,
    render,
)
from .exchange import (
    OPEN,
    OVERHEAD_HEADER,
    Exchange,
    Gate,
    Grant,
    OpenGate,
    Sinks,
    may_use,
    unique_hex,
)
from .failover import Outbound, dispatch
from .gate import open_gate
from .h1 import Client
from .identity import Authenticator
from .oidc import OidcLogin
from .ops import metrics_endpoint, protect
from .pricing import Prices
from .ratelimit.limiter import open_limiter
from .ratelimit.shared import open_redis
from .relay import relay_body, relay_stream
from .routing import Router
from .upstream import forward_headers, make_client, open_request
from .usage.writer import open_ledger
from .wire import RequestView, decode_request

log = logging.getLogger("proxy")

# Endpoints whose streams accept stream_options.include_usage.
_USAGE_OPTION = frozenset(("chat/completions", "completions"))
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_JSON = "application/json"
_RETRY_SOON = {"Retry-After": "1"}


class State:
    """Per-worker state shared by the handlers."""

    def __init__(self, config: Config, gate: Gate | None = None) -> None:
        self.config = config
        self.router = Router(config)
        self.prices = Prices(config)
        self.gate: Gate = gate or OpenGate()
        self.sinks = Sinks()
        self.draining = False
        self.session: Client | None = None
        self.tracer = tracing.Tracer(config.tracing) if config.tracing.endpoint else None
        # Proxied requests being served, and the most allowed at once (server.max_inflight).
        self.inflight = 0
        self.max_inflight = config.server.max_inflight or sys.maxsize
        self.forwarding = ingress.Forwarding(config.server.trusted_proxies)
        # The worker's database handle, for the admin API on the ops listener.
        self.db: Db | None = None
        # Credentials → Principal for the admin API (identity.py); the gate replaces it
        # with one that knows the keys when auth is on.
        self.authenticator = Authenticator(None, config.server.ops_token)


STATE = web.AppKey("state", State)


def build_app(config: Config, gate: Gate | None = None) -> web.Application:
    server = config.server
    app = web.Application(client_max_size=server.max_body_bytes, handler_args={})
    state = State(config, gate)
    app[STATE] = state
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_health_probes)
    app.cleanup_ctx.append(lambda app: open_db(app, config))
    app.cleanup_ctx.append(_share_db)
    # After open_db: cleanup runs in reverse, so the ledger drains before the Db closes.
    app.cleanup_ctx.append(lambda app: open_ledger(app, config, state.sinks))
    if gate is None and config.auth.enabled:  # API keys and their limits (gate.py)
        app.cleanup_ctx.append(lambda app: open_redis(app, config.redis))
        app.cleanup_ctx.append(lambda app: open_limiter(app, config))
        app.cleanup_ctx.append(lambda app: open_gate(app, config, state))
    _observe(app, state)
    ingress.install(app, server)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if server.ops_port is None:  # else they are served by build_ops_app's listener
        if config.auth.enabled and not server.ops_token:
            # With keys on, this listener is for API clients: metrics and routing state
            # (upstream URLs) are no business of theirs without the ops token.
            log.warning(
                "/metrics and /deployments are off on the API port: set server.ops_port "
                "or server.ops_token_env to serve them"
            )
        else:
            add_ops_routes(app)
    app.router.add_get("/v1/models", list_models)
    # No segment may start with a dot: upstream URLs are {base}/{path}, and a `..` would
    # climb out of the deployment's prefix to any path of its host, with its key.
    app.router.add_post("/v1/{path:[a-z][a-z0-9_.-]*(?:/[a-z0-9_-][a-z0-9_.-]*)*}", proxy)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def _observe(app: web.Application, state: State) -> None:
    """Metrics, the tracer and the access log see every finished exchange."""
    metrics.declare(state.config)
    state.sinks.sinks.append(metrics.MetricsSink(state.config))
    if state.tracer is not None:  # before the access log: it decides what is exported
        app.cleanup_ctx.append(state.tracer.running)
        state.sinks.sinks.append(state.tracer)
    level = state.config.server.access_log
    if level != "off":
        app.cleanup_ctx.append(accesslog.listener)
        state.sinks.sinks.append(accesslog.AccessLog(level))


def add_ops_routes(app: web.Application) -> None:
    """The operator endpoints, behind the ops token when one is configured; the admin
    API and the console, behind their own roles (admin/access.py)."""
    state = app[STATE]
    token = state.config.server.ops_token
    app.router.add_get("/metrics", protect(metrics_endpoint, token))
    app.router.add_get("/deployments", protect(deployments, token))
    login = None
    if state.config.oidc is not None:  # single sign-on for the console (oidc.py)
        login = OidcLogin(state.config.oidc)
        app.cleanup_ctx.append(login.context)
        login.add_routes(app.router)  # before the console's own catch-all route
    admin.add_routes(
        app,
        admin.Admin(
            state.config,
            lambda: state.db,
            lambda: state.inflight,
            lambda: state.authenticator,
            login,
        ),
    )
    console.add_routes(app)


async def _share_db(app: web.Application) -> AsyncIterator[None]:
    """The Db on the state too, where the ops listener's app finds it."""
    state = app[STATE]
    state.db = app[DB]
    try:
        yield
    finally:
        state.db = None


def build_ops_app(state: State) -> web.Application:
    """The app behind ``server.ops_port``: the ops endpoints and the probes, sharing
    the main app's state (serve.py runs it as a resource of the main app)."""
    # The admin API's bodies are held to the same limit as the API's.
    app = web.Application(client_max_size=state.config.server.max_body_bytes)
    app[STATE] = state
    ingress.install(app, state.config.server)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_ops_routes(app)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.session = make_client(state.config.server)
    try:
        yield
    finally:
        await state.session.close()


async def _health_probes(app: web.Application) -> AsyncIterator[None]:
    """Recovery probes of deployments out of rotation; cancelled before the session closes."""
    state = app[STATE]
    assert state.session is not None
    state.router.health.start(state.session)
    try:
        yield
    finally:
        await state.router.health.close()


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return "req_" + unique_hex()


def error_response(err: ProxyError, request_id: str, extra: Mapping[str, str] = {}) -> web.Response:
    headers = {**extra, **err.headers, "X-Request-Id": request_id}
    return web.Response(body=render(err), status=err.status, content_type=_JSON, headers=headers)


async def read_body(request: web.Request, state: State) -> bytes:
    """The request body, decoded (ingress.py), within the size and time limits."""
    server = state.config.server
    size = sum(len(k) + len(v) for k, v in request.raw_headers)
    if size > server.max_header_bytes:
        raise HeadersTooLarge(
            f"Request headers are too large ({size} bytes; limit {server.max_header_bytes})."
        )
    ingress.check_framing(request, server)
    try:
        content = request.content
        if content.is_eof():  # all of it came with the headers: nothing to wait for
            body = content.read_nowait()  # what request.read() would join, at once
            if len(body) > server.max_body_bytes:
                raise BodyTooLarge(
                    f"The request body is larger than {server.max_body_bytes} bytes."
                )
            return body
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
    except (HttpProcessingError, RequestPayloadError) as exc:
        raise ingress.body_refusal(exc) from None


def with_query(path: str, request: web.Request) -> str:
    """``path`` with the client's query string, which goes upstream as it came (still
    percent-encoded: ``query_string`` is the decoded one)."""
    query = request.rel_url.raw_query_string
    return f"{path}?{query}" if query else path


async def proxy(request: web.Request) -> web.StreamResponse:
    """POST /v1/{path}: the hot path."""
    state = request.app[STATE]
    path = request.match_info["path"]
    exchange = Exchange(request_id(request), path)
    if state.tracer is not None:
        exchange.trace = state.tracer.start(request.headers)
    grant = OPEN
    metrics.INFLIGHT.inc()
    state.inflight += 1
    try:
        if state.draining:
            raise ServiceUnavailable(
                "The proxy is shutting down; retry shortly.", headers=_RETRY_SOON
            )
        if state.inflight > state.max_inflight:  # shed before reading anything
            raise Overloaded("The proxy is at capacity; retry shortly.", headers=_RETRY_SOON)
        # Who is asking, from the headers: a caller without a valid key costs no body
        # read and learns nothing, not even which models exist.
        caller = await state.gate.authenticate(request)
        exchange.key_id = caller.id
        exchange.team_id = getattr(caller, "team_id", None)
        body = await read_body(request, state)
        exchange.body_bytes = len(body)
        view = decode_request(body)
        exchange.model = view.model
        exchange.stream = bool(view.stream)
        grant = await state.gate.admit(caller, view, exchange)
        route = state.router.route(view.model)
        strip = exchange.stream and path in _USAGE_OPTION and not view.wants_usage
        headers = state.forwarding.headers(request)
        if exchange.trace is not None:
            exchange.trace.asked(view)  # and each attempt sends its own traceparent
        elif state.config.server.tracing:
            headers = tracing.ensure_traceparent(headers)
        target = with_query(path, request)
        outbound = Outbound(target, body, headers, exchange.request_id, view.model, strip)
        assert state.session is not None
        # Retries and failover happen in dispatch, before any byte goes to the client.
        lease = await dispatch(state.session, state.router, route, outbound, exchange)
        upstream = lease.upstream
        async with lease as up:
            extra = {**grant.headers, **lease.headers, "X-Request-Id": exchange.request_id}
            if up.status < 400 and up.content_type == "text/event-stream":
                return await relay_stream(request, up, upstream, exchange, extra, strip)
            return await relay_body(request, up, upstream, exchange, extra)
    except ProxyError as err:
        exchange.status = err.status
        exchange.error = type(err).__name__
        extra = {**grant.headers, OVERHEAD_HEADER: exchange.overhead_ms()}
        return error_response(err, exchange.request_id, extra)
    except (asyncio.CancelledError, ConnectionResetError):
        exchange.error = "client_disconnected"
        exchange.status = exchange.status or 499
        raise
    except Exception as exc:
        log.exception("unexpected error serving %s", exchange.request_id)
        exchange.status = 500
        exchange.error = type(exc).__name__
        return error_response(
            ProxyError("The proxy failed to handle this request."),
            exchange.request_id,
            {**grant.headers, OVERHEAD_HEADER: exchange.overhead_ms()},
        )
    finally:
        metrics.INFLIGHT.dec()
        state.inflight -= 1
        exchange.cost = state.prices.cost(exchange)  # before settling: budgets charge it
        grant.settle(exchange)
        state.sinks.record(exchange)


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: configured models in OpenAI's list shape; in wildcard mode the
    upstream's own list is passed through."""
    state = request.app[STATE]
    rid = request_id(request)
    try:
        caller = await state.gate.authenticate(request)
        names = [n for n in state.router.names() if may_use(caller, n)]
        wildcard = state.router.wildcard
        if wildcard is not None and caller.allowed_models is not None:
            # The wildcard serves every name the key may use.
            names = sorted(caller.allowed_models)
        if wildcard is not None and not names:
            upstream = wildcard.pick()
            headers = forward_headers(state.forwarding.headers(request), upstream, rid)
            assert state.session is not None
            target = upstream.target(with_query("models", request))
            async with await open_request(
                state.session, upstream, "GET", target, headers, None
            ) as up:
                return await relay_body(
                    request, up, upstream, Exchange(rid, "models"), {"X-Request-Id": rid}
                )
    except ProxyError as err:
        return error_response(err, rid)
    data = [{"id": n, "object": "model", "created": 0, "owned_by": "morngpt"} for n in names]
    return web.json_response({"object": "list", "data": data}, headers={"X-Request-Id": rid})


async def not_found(request: web.Request) -> web.Response:
    if request.method in ingress.UNIMPLEMENTED_METHODS:
        err: ProxyError = NotImplementedByProxy(f"The proxy does not implement {request.method}.")
    else:
        # The URL is not quoted back: no refusal echoes what the client sent.
        err = NotFound("Unknown request URL; the API is served under /v1/.")
    return error_response(err, request_id(request))


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def deployments(request: web.Request) -> web.Response:
    """GET /deployments: every deployment's routing state (in-flight, health, cooldown,
    latency) as JSON, for operators. Never shows a key; the upstream base URLs only to
    holders of the ops token (without one configured, nobody is asked for it)."""
    state = request.app[STATE]
    snapshot = state.router.snapshot()
    if not state.config.server.ops_token:
        for model in snapshot["models"]:
            for deployment in model["deployments"]:
                deployment.pop("base_url", None)
    return web.json_response(snapshot)


async def readyz(request: web.Request) -> web.Response:
    """Ready = config loaded, upstream pool open, not draining. The database is not
    asked: while it is down the usage ledger spools, so traffic can still be served."""
    state = request.app[STATE]
    if state.draining:
        return web.json_response({"status": "draining"}, status=503)
    if state.session is None or state.session.closed:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})


__all__ = ["STATE", "Grant", "RequestView", "State", "build_app"]
