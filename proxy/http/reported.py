"""The usage an upstream reported, in an answer's body or a stream event: found with
substring searches, decoded only where it is (``UsageCarrier``), normalised over the
chat/completions/embeddings and Responses shapes. Compiled with the hot path (setup.py):
it runs for every non-streamed answer and every stream's usage chunk, and wire.py,
which defines the msgspec structs, cannot be compiled.

Invariants:
- Never raises for what an upstream sent: a payload that does not decode has no usage.
- Every count is bounded (``wire.MAX_COUNT``, negatives 0), and so is the model name
  (``wire.MAX_MODEL``): an upstream's numbers and strings go into the ledger, the
  limits' arithmetic and traces.
"""

from __future__ import annotations

from typing import Final

import msgspec

from .wire import MAX_COUNT, MAX_MODEL, Usage, UsageCarrier, WireUsage

_KEY: Final = b'"usage"'
# Decodes an answer or event for its usage (a ``Final`` name: a C static once compiled,
# not a lookup in the module's dict).
_CARRIER: Final = msgspec.json.Decoder(UsageCarrier)


def find_usage(payload: bytes) -> tuple[Usage | None, bool, bool]:
    """Usage in a JSON body or stream event; whether the payload is a chat-style
    usage-only chunk (``choices: []``); and whether it was decoded whole, which shows
    it well-formed JSON (msgspec checks the syntax of the members it skips as a
    ``msgspec.Raw`` decode does), so that the relay need not check it again. Cheap
    when there is no usage: substring searches, no decoding."""
    at = payload.find(_KEY)
    # A nested `"usage": null` may come before the real one; null only if all are.
    while at >= 0 and null_after(payload, at + 7):
        at = payload.find(_KEY, at + 7)
    if at < 0:
        return None, False, False
    try:
        carrier = _CARRIER.decode(payload)
    except (msgspec.DecodeError, RecursionError):  # an upstream's payload: no usage in it
        return None, False, False
    response = carrier.response
    wire = carrier.usage or (response.usage if response is not None else None)
    if wire is None:
        return None, False, True
    model = carrier.model or (response.model if response is not None else None)
    return normalised(wire, model), carrier.choices == [], True


def normalised(wire: WireUsage, model: str | None) -> Usage:
    """``wire``'s counts in ``Usage``'s terms, bounded, with the answer's ``model``."""
    # Each member read once: a struct's members are attribute lookups (~160
    # instructions each, compiled), not fields of a native class.
    prompt = wire.prompt_tokens
    if prompt is None:
        prompt = wire.input_tokens
    completion = wire.completion_tokens
    if completion is None:
        completion = wire.output_tokens
    prompt, completion = _count(prompt), _count(completion)
    cached = wire.prompt_tokens_details or wire.input_tokens_details
    reasoning = wire.completion_tokens_details or wire.output_tokens_details
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=_count(wire.total_tokens or prompt + completion),
        cached_tokens=_count(cached.cached_tokens) if cached is not None else 0,
        reasoning_tokens=_count(reasoning.reasoning_tokens) if reasoning is not None else 0,
        model=model[:MAX_MODEL] if model else None,
    )


def _count(value: int | None) -> int:
    if not value or value < 0:  # (a comparison, not min/max: 6 times cheaper)
        return 0
    return MAX_COUNT if value > MAX_COUNT else value


def null_after(payload: bytes, i: int) -> bool:
    """Whether the value after the key that ends at ``payload[i]`` is null: the colon
    and any spaces, then ``null`` (a `"usage": null` on every chunk must stay cheap:
    compiled, these byte tests cost ~300 instructions a call, a regular expression's
    match call ~1,600: callgrind, docs/performance.md, nineteenth pass)."""
    end = len(payload)
    while i < end:
        byte = payload[i]
        if byte != 0x3A and byte != 0x20 and byte != 0x0A and byte != 0x0D and byte != 0x09:
            return payload[i : i + 4] == b"null"
        i += 1
    return False
