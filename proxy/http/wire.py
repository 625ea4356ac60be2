"""The shapes the proxy reads of OpenAI wire bodies — and nothing more: msgspec structs,
which stay plain Python (mypyc cannot compile them).

Requests are decoded into a small view (only the fields we route and account on:
request_body.py); answers and stream events for their ``usage`` (reported.py).
"""

from __future__ import annotations

from typing import Final

import msgspec


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None


class RequestView(msgspec.Struct):
    """The fields of a request body the proxy acts on; the rest is never decoded."""

    model: str
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_output_tokens: int | None = None  # Responses API
    n: int | None = None

    @property
    def wants_usage(self) -> bool:
        """Whether the client itself asked for the usage chunk of a stream."""
        return bool(self.stream_options and self.stream_options.include_usage)


class Usage(msgspec.Struct, frozen=True):
    """Token counts, normalised over chat/completions/embeddings and Responses shapes,
    and the model the answer that reported them names (traces' gen_ai.response.model)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None


class _Details(msgspec.Struct):
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class WireUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: _Details | None = None
    completion_tokens_details: _Details | None = None
    input_tokens_details: _Details | None = None
    output_tokens_details: _Details | None = None


# The most tokens one count may say. An upstream's numbers are not trusted: they go
# into the ledger's integer columns and into bucket arithmetic that is exact only below
# 2**53, so a negative or absurd count must not wedge the ledger or a key's limits.
MAX_COUNT: Final = 2**31 - 1
MAX_MODEL: Final = 256  # characters of an answer's model name kept


class _Nested(msgspec.Struct):
    usage: WireUsage | None = None
    model: str | None = None


class UsageCarrier(msgspec.Struct):
    usage: WireUsage | None = None
    # Present (as a list) on chat/completions stream chunks; [] on the usage chunk.
    choices: list[msgspec.Raw] | None = None
    # Responses API: the final event nests the response object.
    response: _Nested | None = None
    model: str | None = None
