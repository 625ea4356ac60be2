"""The aiohttp application: routes and the proxy handler.

The request path, as the packages read: authenticate (the ``Gate`` of exchange.py,
headers only) → read the body (http/ingress.py) → decode its view (http/request_body.py) →
admit (the Gate: model permission, limits, budgets; governance/) → route and forward
(routing/) → relay (http/relay.py) → settle + record (the ``Sink`` seam: ops/, usage/).
The worker's resources are opened by state.py, the composition root, in the app's one
resource context.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Final

from aiohttp import web
from multidict import istr

from .admin import api as admin
from .admin import console
from .admin.common import Admin
from .admin.oidc import OidcLogin
from .config.schema import Config
from .errors import (
    ClientDisconnected,
    NotFound,
    NotImplementedByProxy,
    Overloaded,
    ProxyError,
    ServiceUnavailable,
    render,
)
from .exchange import (
    OPEN,
    OVERHEAD_HEADER,
    Exchange,
    Gate,
    made_request_id,
    may_use,
    unique_hex,
)
from .http import front, ingress
from .http.lean import Answer, Incoming, deliver, for_aiohttp
from .http.relay import relay_body, relay_stream
from .http.request_body import decode_request
from .http.upstream import open_request
from .ops import metrics, tracing
from .ops.endpoints import metrics_endpoint, protect
from .routing.failover import Outbound, dispatch
from .state import STATE, State, opened

log = logging.getLogger("proxy")

# Endpoints whose streams accept stream_options.include_usage.
_USAGE_OPTION: Final = frozenset(("chat/completions", "completions"))
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_REQUEST_ID_NAME: Final = istr("X-Request-Id")  # looked up without lowering it each time
_JSON = "application/json"
_RETRY_SOON: Final = {"Retry-After": "1"}
# The tails of POST /v1/... that are proxied. No segment may start with a dot: upstream
# URLs are {base}/{path}, and a `..` would climb out of the deployment's prefix to any
# path of its host, with its key.
_PATH = r"[a-z][a-z0-9_.-]*(?:/[a-z0-9_-][a-z0-9_.-]*)*"


def build_app(config: Config, gate: Gate | None = None) -> web.Application:
    """The API app. Its one resource context opens the worker's ``State``
    (state.open_state) under ``app[STATE]``; ``gate`` replaces the key gate."""
    server = config.server
    app = web.Application(client_max_size=server.max_body_bytes, handler_args={})
    app.cleanup_ctx.append(opened(config, gate))
    metrics.declare(config)
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
            add_ops_routes(app, config, lambda: app[STATE])
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/{path:" + _PATH + "}", proxy)
    app[front.HOT] = front.Hot(re.compile(_PATH), _hot, server)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def add_ops_routes(app: web.Application, config: Config, state: Callable[[], State]) -> None:
    """The operator endpoints, behind the ops token when one is configured; the admin
    API and the console, behind their own roles (admin/access.py)."""
    token = config.server.ops_token

    async def scrape(request: web.Request) -> web.Response:
        served = state()
        served.traffic.publish()  # this worker's in-flight count, exact
        served.metrics.fold()  # and the requests it finished
        return await metrics_endpoint(request)

    app.router.add_get("/metrics", protect(scrape, token))
    app.router.add_get("/deployments", protect(deployments, token))
    login = None
    if config.oidc is not None:  # single sign-on for the console (oidc.py)
        login = OidcLogin(config.oidc)
        app.cleanup_ctx.append(login.context)
        login.add_routes(app.router)  # before the console's own catch-all route
    admin.add_routes(
        app,
        Admin(
            config,
            lambda: state().db,
            lambda: state().traffic.inflight,
            lambda: state().metrics.fold(),
            lambda: state().authenticator,
            lambda: state().router.snapshot(),
            login,
        ),
    )
    console.add_routes(app)


def build_ops_app(state: State) -> web.Application:
    """The app behind ``server.ops_port``: the ops endpoints and the probes, sharing
    the main app's state (serve.py runs it as a resource of the main app)."""
    # The admin API's bodies are held to the same limit as the API's.
    app = web.Application(client_max_size=state.config.server.max_body_bytes)
    app[STATE] = state
    ingress.install(app, state.config.server)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    add_ops_routes(app, state.config, lambda: state)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


def client_request_id(headers: Mapping[str, str]) -> str | None:
    """The client's own ``X-Request-Id``, when it is one the proxy passes on."""
    given = headers.get(_REQUEST_ID_NAME)
    return given if given and _REQUEST_ID.fullmatch(given) else None


def request_id(headers: Mapping[str, str]) -> str:
    return client_request_id(headers) or made_request_id(unique_hex())


def error_response(err: ProxyError, request_id: str, extra: Mapping[str, str] = {}) -> web.Response:
    headers = {**extra, **err.headers, "X-Request-Id": request_id}
    return web.Response(body=render(err), status=err.status, content_type=_JSON, headers=headers)


def with_query(path: str, query: str) -> str:
    """``path`` with the client's query string, which goes upstream as it came (still
    percent-encoded)."""
    return f"{path}?{query}" if query else path


async def proxy(request: web.Request) -> web.StreamResponse:
    """POST /v1/{path} on a connection aiohttp serves (front.py hands it those whose
    requests it does not take)."""
    state = request.app[STATE]
    server = state.config.server
    call = Incoming.of(
        request, request.match_info["path"], lambda: ingress.read_request_body(request, server)
    )
    return for_aiohttp(await answer(state, call))


def _hot(app: web.Application) -> Callable[[Incoming], Coroutine[Any, Any, Answer]]:
    """What answers POST /v1/{path} parsed by front.py: ``answer`` with the app's
    state, called directly (a coroutine that awaits it would be one more level for
    every resumption of the request's task to pass through)."""
    return functools.partial(answer, app[STATE])


async def answer(state: State, call: Incoming) -> Answer:
    """The hot path: one proxied request, answered (lean.py writes it)."""
    path = call.path
    exchange = Exchange(client_request_id(call.headers), path)
    if state.tracer is not None:
        exchange.trace = state.tracer.start(call.headers)
    grant = OPEN
    traffic = state.traffic
    traffic.inflight += 1
    try:
        if traffic.draining:
            raise ServiceUnavailable(
                "The proxy is shutting down; retry shortly.", headers=_RETRY_SOON
            )
        if traffic.inflight > state.max_inflight:  # shed before reading anything
            raise Overloaded("The proxy is at capacity; retry shortly.", headers=_RETRY_SOON)
        # Who is asking, from the headers: a caller without a valid key costs no body
        # read and learns nothing, not even which models exist.
        caller = await state.gate.authenticate(call.headers)
        exchange.key_id = caller.id
        exchange.team_id = caller.team_id
        body = await call.read()
        exchange.body_bytes = len(body)
        view = decode_request(body)
        exchange.model = view.model
        exchange.stream = bool(view.stream)
        grant = await state.gate.admit(caller, view, exchange)
        route = state.router.route(view.model)
        strip = exchange.stream and path in _USAGE_OPTION and not view.wants_usage
        trace = exchange.trace
        if trace is not None:
            trace.asked(view)  # and each attempt sends its own traceparent
        ensure = trace is None and state.config.server.tracing
        sent = [("X-Request-Id", exchange.request_id)]
        sent += tracing.trace_context(call.headers, ensure)
        target = with_query(path, call.query)
        outbound = Outbound(
            target, body, call.headers, call.remote, state.forwarding, sent, view.model, strip
        )
        # Retries and failover happen in dispatch, before any byte goes to the client.
        lease = await dispatch(state.session, state.router, route, outbound, exchange)
        upstream = lease.upstream
        async with lease as up:
            extra = {**grant.headers, **lease.headers, "X-Request-Id": exchange.request_id}
            if up.status < 400 and up.content_type == "text/event-stream":
                return await relay_stream(call, up, upstream, exchange, extra, strip)
            return await relay_body(call, up, upstream, exchange, extra)
    except ProxyError as err:
        exchange.status = err.status
        exchange.error = type(err)
        extra = {**grant.headers, OVERHEAD_HEADER: exchange.overhead_ms()}
        return await deliver(call, error_response(err, exchange.request_id, extra))
    except (asyncio.CancelledError, ConnectionResetError):
        exchange.error = ClientDisconnected
        exchange.status = exchange.status or 499
        raise
    except Exception as exc:
        log.exception("unexpected error serving %s", exchange.request_id)
        exchange.status = 500
        exchange.error = type(exc)
        failed = ProxyError("The proxy failed to handle this request.")
        extra = {**grant.headers, OVERHEAD_HEADER: exchange.overhead_ms()}
        return await deliver(call, error_response(failed, exchange.request_id, extra))
    finally:
        traffic.inflight -= 1
        exchange.cost = state.prices.cost(exchange)  # before settling: budgets charge it
        grant.settle(exchange)
        state.sinks.record(exchange)


async def list_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models: configured models in OpenAI's list shape; in wildcard mode the
    upstream's own list is passed through."""
    state = request.app[STATE]
    rid = request_id(request.headers)
    try:
        caller = await state.gate.authenticate(request.headers)
        names = [n for n in state.router.names() if may_use(caller, n)]
        wildcard = state.router.wildcard
        if wildcard is not None and caller.allowed_models is not None:
            # The wildcard serves every name the key may use.
            names = sorted(caller.allowed_models)
        if wildcard is not None and not names:
            upstream = wildcard.pick()
            block = upstream.block(request.headers, request.remote, state.forwarding)
            sent = [("X-Request-Id", rid), *tracing.trace_context(request.headers, False)]
            target = upstream.target(with_query("models", request.rel_url.raw_query_string))
            async with await open_request(
                state.session, upstream, "GET", target, block, sent, None
            ) as up:
                call = Incoming.of(request, "models", request.read)
                exchange = Exchange(rid, "models")
                return for_aiohttp(
                    await relay_body(call, up, upstream, exchange, {"X-Request-Id": rid})
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
    return error_response(err, request_id(request.headers))


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
    if state.traffic.draining:
        return web.json_response({"status": "draining"}, status=503)
    if state.session.closed:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})
