"""The worker's state: everything a handler reaches, built once per worker process."""

from __future__ import annotations

import sys

from aiohttp import web

from .config.schema import Config
from .db import Db
from .exchange import Gate, OpenGate, Sinks
from .governance.identity import Authenticator
from .governance.pricing import Prices
from .http import ingress
from .http.h1 import Client
from .ops.tracer import Tracer
from .routing.routes import Router


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
        self.tracer = Tracer(config.tracing) if config.tracing.endpoint else None
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
