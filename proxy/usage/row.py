"""What a finished ``Exchange`` consumed, and the ledger row (``record.Record``) it leaves.

Compiled with the hot path (setup.py ``HOT``): it runs once per request, and
record.py, which defines a msgspec struct, cannot be.

Counts are exact when the upstream reported usage. When it did not although the
request reached an upstream (stream cut, client gone, upstream error mid-stream), the
row carries an estimate and ``estimated = True`` (docs/usage-ledger.md, "Estimates"):

- prompt tokens: request body bytes / 4, rounded up (about 4 bytes of English or JSON
  per token; the JSON syntax around the prompt makes this err high, which is the
  safe side for a budget);
- completion tokens: the data events relayed to the client (streamed chat and
  completions send about one token per event; 0 when nothing was streamed).

A request that never reached an upstream (bad request, unknown model, refused key) or
that the upstream refused with an HTTP error consumed nothing: zeros, exact.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Final

from ..exchange import Exchange
from ..http.wire import Usage
from .record import Record

BYTES_PER_TOKEN = 4
# Bytes of a record besides its free-text fields (uid, numbers, JSON punctuation):
# what the batch byte limit counts, close to the size of its spool line.
_FIXED_BYTES: Final = 200
_NO_USAGE = Usage()
_FREE: Final = Decimal(0)
# Client-chosen text (the model name, the path) is cut to this many characters: a
# client must not be able to bloat the ledger with megabyte-long model names.
MAX_TEXT: Final = 256


def consumed(exchange: Exchange) -> tuple[Usage, bool]:
    """The tokens a finished exchange consumed, and whether they are an estimate: the
    upstream's own count when it sent one; an estimate when an upstream worked on the
    request but its count never arrived (cut stream, client gone); else nothing (the
    request never reached an upstream, or the upstream refused it with an HTTP error).
    The one rule the ledger, the token buckets and budgets all charge by."""
    if exchange.usage is not None:
        return exchange.usage, False
    if exchange.deployment and not (exchange.status >= 400 and not exchange.error):
        return estimate(exchange.body_bytes, exchange.events), True
    return _NO_USAGE, False


def record_of(exchange: Exchange) -> Record:
    """The ledger row for a finished exchange (cheap: it runs on the request path)."""
    usage, estimated = consumed(exchange)
    ttft = exchange.ttft
    return Record(
        exchange.uid,
        exchange.request_id,
        exchange.key_id,
        exchange.endpoint[:MAX_TEXT],
        exchange.model[:MAX_TEXT],
        exchange.deployment,
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cached_tokens,
        usage.reasoning_tokens,
        estimated,
        exchange.status,
        exchange.stream,
        exchange.error_name or None,
        exchange.started_at,
        exchange.duration * 1000.0,
        None if ttft is None else ttft * 1000.0,
        Decimal(exchange.cost).scaleb(-9) if exchange.cost else _FREE,
        exchange.team_id,
    )


def estimate(body_bytes: int, events: int) -> Usage:
    """Token counts guessed from what the proxy saw (see the module docstring)."""
    prompt = -(-body_bytes // BYTES_PER_TOKEN)
    return Usage(prompt_tokens=prompt, completion_tokens=events, total_tokens=prompt + events)


def size(record: Record) -> int:
    """About how many bytes the record takes in a batch (for the batch byte limit)."""
    return (
        _FIXED_BYTES
        + len(record.request_id)
        + len(record.key_id or "")
        + len(record.team_id or "")
        + len(record.endpoint)
        + len(record.model)
        + len(record.deployment)
        + len(record.error or "")
    )
