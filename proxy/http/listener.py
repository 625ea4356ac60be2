"""The API listener: aiohttp's runner and server, whose connections start with front.py's
protocol where the app has a hot path, and whose own handlers answer parser refusals
with JSON (ingress.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.web_protocol import RequestHandler
from yarl import URL

from . import ingress
from .front import HOT, Door, Front


class _Server(web.Server):
    """aiohttp's server whose connections start with ``Front`` when the app has a hot
    path (``door``), and whose aiohttp handlers answer parser refusals with JSON."""

    door: Door | None = None

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self.door is not None:
            return Front(self.door)
        return self.handler()

    def handler(self) -> RequestHandler:
        return ingress.Handler(self, loop=self._loop, **self._kwargs)

    @property
    def connections(self) -> list[Any]:  # aiohttp's handlers and the fronts
        fronts = list(self.door.fronts) if self.door is not None else []
        return [*super().connections, *fronts]

    def pre_shutdown(self) -> None:
        if self.door is not None:
            self.door.pre_shutdown()
        super().pre_shutdown()

    async def shutdown(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if self.door is not None:
            await asyncio.gather(self.door.shutdown(timeout), super().shutdown(timeout))
        else:
            await super().shutdown(timeout)


class Runner(web.AppRunner):
    """``web.AppRunner`` whose connections start with ``Front`` where the app has a hot
    path (and nothing but ingress.py decorates its responses), and answer parser
    refusals with JSON errors."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        make_request = made.request_factory

        def request_factory(
            message: RawRequestMessage, *args: Any, **kwargs: Any
        ) -> web.BaseRequest:
            if message.method in ingress.UNIMPLEMENTED_METHODS:
                # CONNECT's target (host:port) matches no route, and aiohttp's own 404
                # is plain text: give the catch-all route a path, it answers 501.
                message = message._replace(path="/", url=URL("/"))
            return make_request(message, *args, **kwargs)

        server = _Server(
            made.request_handler,
            request_factory=request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        app = self.app
        hot = app.get(HOT)
        decoration = app.get(ingress.DECORATION)
        signal = app.on_response_prepare
        if hot is not None and decoration is not None and list(signal) == [decoration.prepare]:
            server.door = Door(server.handler, app, hot)
        return server
