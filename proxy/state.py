"""The composition root: the one place a worker's resources are opened, in order, and
put together as its ``State``.

``open_state`` opens the upstream session (and the health probes that use it), the
database, the usage ledger, Redis, the limiter and the gate, then the tracer's and
the access log's threads, and yields a complete ``State``; on the way out it closes
them in reverse (so the ledger drains into the database before the database closes).
Nothing is swapped in later: a ``State`` is frozen, and what changes while the worker
runs (requests in flight, draining) is its ``Traffic``.

``tracer`` is None when tracing has no endpoint and ``limiter`` when API keys are off
(the config says so, not the point in the worker's life).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .config.schema import Config
from .db import Db, open_db
from .exchange import Gate, OpenGate, Sink, Sinks
from .governance.budgets import Budgets
from .governance.gate import KeyGate
from .governance.identity import Authenticator
from .governance.keys.lookup import KeyCache, KeyLookup
from .governance.keys.store import KeyStore
from .governance.keys.teams import TeamStore
from .governance.pricing import Prices
from .governance.ratelimit.limiter import Limiter
from .governance.ratelimit.shared import RedisClient, open_redis
from .governance.tokens import TokenVerifier
from .http.h1 import Client
from .http.ingress import Forwarding
from .http.upstream import make_client
from .ops import accesslog, metrics
from .ops.access_sink import AccessLog
from .ops.metrics_sink import MetricsSink
from .ops.tracer import Tracer
from .routing.health import PUBLISH_INTERVAL
from .routing.routes import Router
from .usage.poison import Sifting
from .usage.retention import upkeep
from .usage.spool import Spool
from .usage.store import store_for
from .usage.writer import Writer


class Traffic:
    """What changes while a worker serves: proxied requests in flight, and whether it
    is draining (shutting down)."""

    __slots__ = ("draining", "inflight")

    def __init__(self) -> None:
        self.inflight = 0
        self.draining = False

    def publish(self) -> None:
        """Set the in-flight gauge from the count: at every scrape of this worker and
        every ``PUBLISH_INTERVAL`` (``publishing``), not twice per request (a locked
        update each, ~3 % of a bare request)."""
        metrics.INFLIGHT.set(self.inflight)

    @contextlib.asynccontextmanager
    async def publishing(self) -> AsyncIterator[None]:
        async def every_interval() -> None:
            while True:
                self.publish()
                await asyncio.sleep(PUBLISH_INTERVAL)

        task = asyncio.create_task(every_interval(), name="in-flight gauge")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.inflight = 0
            self.publish()


@dataclass(frozen=True, slots=True)
class State:
    """Per-worker state shared by the handlers; built by ``open_state`` only."""

    config: Config
    router: Router
    prices: Prices
    session: Client
    db: Db
    ledger: Writer
    gate: Gate
    # Credentials → Principal for the admin API (identity.py): the gate's keys when auth is on.
    authenticator: Authenticator
    sinks: Sinks
    # The request metrics' sink (among ``sinks``): a scrape folds it first.
    metrics: MetricsSink
    forwarding: Forwarding
    tracer: Tracer | None
    limiter: Limiter | None
    # The most proxied requests served at once (server.max_inflight).
    max_inflight: int
    traffic: Traffic


STATE = web.AppKey("state", State)


def opened(config: Config, gate: Gate | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """The app's cleanup_ctx: the worker's ``State`` under ``app[STATE]`` while the app
    runs. (Here, not in app.py: that module is compiled, and mypyc does not compile
    async generators.)"""

    async def run(app: web.Application) -> AsyncIterator[None]:
        async with open_state(config, gate) as state:
            app[STATE] = state
            yield

    return run


@contextlib.asynccontextmanager
async def open_state(config: Config, gate: Gate | None = None) -> AsyncIterator[State]:
    """The worker's resources, opened in order, as one ``State`` (see the module
    docstring). ``gate`` replaces the key gate (tests, benchmarks)."""
    router = Router(config)
    prices = Prices(config)
    async with contextlib.AsyncExitStack() as stack:
        session = make_client(config.server)
        stack.push_async_callback(session.close)
        # Recovery probes of deployments out of rotation; stopped before the session closes.
        router.health.start(session)
        stack.push_async_callback(router.health.close)
        db = await stack.enter_async_context(open_db(config.database))
        ledger = await stack.enter_async_context(open_ledger(config, db))
        authenticator = Authenticator(None, config.server.ops_token)
        limiter = None
        if gate is None and config.auth.enabled:  # API keys and their limits (gate.py)
            redis = await stack.enter_async_context(open_redis(config.redis))
            limiter = await stack.enter_async_context(open_limiter(config, redis))
            gate, authenticator = await stack.enter_async_context(
                open_gate(config, db, limiter, prices)
            )
        # Metrics, the tracer and the access log see every finished exchange, then the
        # ledger; the tracer before the access log: it decides what is exported.
        metrics_sink = MetricsSink(config)
        stack.callback(metrics_sink.fold)  # what the last requests gathered, kept
        sinks: list[Sink] = [metrics_sink]
        tracer = None
        if config.tracing.endpoint:
            tracer = Tracer(config.tracing)
            await stack.enter_async_context(tracer.running())
            sinks.append(tracer)
        level = config.server.access_log
        if level != "off":
            await stack.enter_async_context(accesslog.listener())
            sinks.append(AccessLog(level))
        sinks.append(ledger)
        traffic = Traffic()
        await stack.enter_async_context(traffic.publishing())
        yield State(
            config=config,
            router=router,
            prices=prices,
            session=session,
            db=db,
            ledger=ledger,
            gate=gate or OpenGate(),
            authenticator=authenticator,
            sinks=Sinks(sinks),
            metrics=metrics_sink,
            forwarding=Forwarding(config.server.trusted_proxies),
            tracer=tracer,
            limiter=limiter,
            max_inflight=config.server.max_inflight or sys.maxsize,
            traffic=traffic,
        )


@contextlib.asynccontextmanager
async def open_gate(
    config: Config, db: Db, limiter: Limiter, prices: Prices
) -> AsyncIterator[tuple[KeyGate, Authenticator]]:
    """The worker's ``KeyGate`` on its database and limiter, and the ``Authenticator``
    (identity.py) that knows the same keys, for the admin API."""
    timeout = config.database.timeout
    cache = KeyCache(KeyStore(db), config.auth, timeout)
    teams = KeyCache(TeamStore(db), config.auth, timeout)
    async with contextlib.AsyncExitStack() as stack:
        tokens = None
        if config.auth.jwt is not None:  # JWKS fetches: their own small session
            session = await stack.enter_async_context(aiohttp.ClientSession())
            tokens = TokenVerifier(config.auth.jwt, session)
        lookup = KeyLookup(cache, config.auth, config.keys, tokens)
        share = config.limits.budget_alert_share
        budgets = Budgets(prices, db, timeout, share)
        gate = KeyGate(lookup, limiter, config.limits, budgets, teams)
        yield gate, Authenticator(lookup, config.server.ops_token)


@contextlib.asynccontextmanager
async def open_limiter(config: Config, redis: RedisClient | None) -> AsyncIterator[Limiter]:
    """The worker's ``Limiter``, on ``redis`` when there is one."""
    limiter = Limiter(config.limits, config.redis, redis)
    limiter.start()
    try:
        yield limiter
    finally:
        await limiter.close()


@contextlib.asynccontextmanager
async def open_ledger(config: Config, db: Db) -> AsyncIterator[Writer]:
    """The worker's usage writer (the caller registers it as a sink) and the ledger's
    upkeep (retention.py). Open it after the database: on the way out it drains into
    the database, so it must close before the database does."""
    store = store_for(db)
    sifting = Sifting(store, config.usage.spool_dir)  # poison rows set aside (poison.py)
    writer = Writer(config.usage, sifting, Spool(config.usage.spool_dir))
    writer.start()
    tending = asyncio.create_task(upkeep(db, config.usage, store.partitions))
    try:
        yield writer
    finally:
        tending.cancel()
        await asyncio.gather(tending, return_exceptions=True)
        await writer.close()
