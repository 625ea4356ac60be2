"""The access log: one JSON line per finished request on the logger ``proxy.access``.

Invariants:
- The request path only builds a small dict of plain values and hands a LogRecord to
  a queue; JSON encoding and the write to stderr happen in a ``QueueListener`` thread.
- A line carries the key *id*, never a key; no header or body content goes in it.
- One listener per process however many apps run in it (tests start several): the
  first app to start starts it, the last one to stop flushes and stops it. While it
  runs, ``proxy.access`` does not propagate, so a line is not printed twice by the
  root handler.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import queue
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .exchange import Exchange

LOGGER = "proxy.access"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


class AccessLog:
    """A ``Sink`` that logs each finished exchange as one record on ``proxy.access``."""

    __slots__ = ("level", "logger")

    def __init__(self, level: str) -> None:
        self.logger = logging.getLogger(LOGGER)
        self.level = _LEVELS[level]

    def record(self, exchange: Exchange) -> None:
        logger = self.logger
        if not logger.isEnabledFor(self.level):
            return
        # makeRecord + handle: the same record logger.log makes, without its stack walk.
        logger.handle(logger.makeRecord(LOGGER, self.level, "", 0, fields(exchange), (), None))


def fields(exchange: Exchange) -> dict[str, Any]:
    """What the access line says about one exchange (times in milliseconds)."""
    duration = exchange.duration
    usage = exchange.usage
    ttft = exchange.ttft
    return {
        "request_id": exchange.request_id,
        "key_id": exchange.key_id,
        "endpoint": exchange.endpoint,
        "model": exchange.model[:200],  # client-chosen text: bounded
        "deployment": exchange.deployment or None,
        "status": exchange.status,
        "stream": exchange.stream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "duration_ms": round(duration * 1000, 3),
        "ttft_ms": None if ttft is None else round(ttft * 1000, 3),
        "overhead_ms": round((duration - exchange.upstream_time) * 1000, 3),
        "error": exchange.error or None,
        "attempts": exchange.attempts,  # upstream requests sent: retries show here
    }


class JsonFormatter(logging.Formatter):
    """Formats access records (a dict message) as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        if not isinstance(record.msg, dict):
            return super().format(record)
        time = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        return orjson.dumps({"time": time, **record.msg}).decode()


class _QueueHandler(logging.handlers.QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The stock prepare() formats the message here, on the event loop; the
        # listener thread formats instead. Access records hold only plain values.
        return record


class _Output:
    """The process's one queue → listener thread → stderr pipeline, reference-counted."""

    users = 0
    listener: logging.handlers.QueueListener | None = None
    handler: logging.Handler | None = None

    @classmethod
    def acquire(cls) -> None:
        cls.users += 1
        if cls.users > 1:
            return
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(JsonFormatter())
        cls.listener = logging.handlers.QueueListener(records, stream)
        cls.handler = _QueueHandler(records)
        logger = logging.getLogger(LOGGER)
        logger.addHandler(cls.handler)
        logger.propagate = False
        cls.listener.start()

    @classmethod
    async def release(cls) -> None:
        cls.users -= 1
        if cls.users > 0 or cls.listener is None or cls.handler is None:
            return
        logger = logging.getLogger(LOGGER)
        logger.removeHandler(cls.handler)
        logger.propagate = True
        listener, cls.listener, cls.handler = cls.listener, None, None
        await asyncio.to_thread(listener.stop)  # writes out what is queued, joins


async def listener(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the access log's writer thread runs while the app does."""
    _Output.acquire()
    try:
        yield
    finally:
        await _Output.release()
