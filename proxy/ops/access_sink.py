"""The access log's sink: what a finished request puts on the access log's queue
(accesslog.py formats and writes it, in its own thread). On the request path, so
compiled with the hot path (setup.py), apart from accesslog.py, which mypyc cannot
compile (it holds an async generator): interpreted, this cost ~18,000 instructions a
request (callgrind of ``bench.inproc --subject governed``).

Invariants (accesslog.py's): a line carries the key *id*, never a key; no header or
body content goes in it.
"""

from __future__ import annotations

import logging
from time import time
from typing import Any

from ..exchange import Exchange
from .accesslog import LOGGER, Output

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
        output = Output.handler
        if output is not None and _alone(logger, output):
            output.queue.put_nowait((time(), fields(exchange)))
            return
        # makeRecord + handle: the same record logger.log makes, without its stack walk.
        logger.handle(logger.makeRecord(LOGGER, self.level, "", 0, fields(exchange), (), None))


def _alone(logger: logging.Logger, output: logging.Handler) -> bool:
    """Whether the writer's queue is all that gets ``logger``'s records."""
    return logger.handlers == [output] and not logger.filters and not output.filters


def fields(exchange: Exchange) -> dict[str, Any]:
    """What the access line says about one exchange (times in milliseconds)."""
    duration = exchange.duration
    usage = exchange.usage
    ttft = exchange.ttft
    line = {
        "request_id": exchange.request_id,
        "key_id": exchange.key_id,
        "endpoint": exchange.endpoint,
        "model": exchange.model[:200],  # client-chosen text: bounded
        "deployment": exchange.deployment or None,
        "status": exchange.status,
        "stream": exchange.stream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "duration_ms": _ms(duration),
        "ttft_ms": None if ttft is None else _ms(ttft),
        "overhead_ms": _ms(duration - exchange.upstream_time),
        "error": exchange.error_name or None,
        "attempts": exchange.attempts,  # upstream requests sent: retries show here
    }
    trace = exchange.trace
    if trace is not None and trace.span_id:  # its spans are exported (Jaeger)
        line["trace_id"] = trace.trace_id
        line["span_id"] = trace.span_id
    return line


def _ms(seconds: float) -> float:
    """``seconds`` (not negative) in milliseconds, rounded to 3 decimals: a float whose
    shortest form has at most 3 (~4 times cheaper than ``round``, which goes by way of
    decimal digits)."""
    return int(seconds * 1_000_000 + 0.5) / 1000
