"""The relay: the one loop that reads the upstream and writes the client.

Invariants:
- A streamed chunk is written to the client as soon as it is read, cut at event
  boundaries: the complete events it holds go out at once, in one write; only the
  bytes of an event that is not complete yet wait for its end (a client cannot use
  half an event anyway). This is what lets the proxy drop the usage chunk it asked
  for itself (``strip``) and end a broken stream with a clean error event instead of
  a half-written one.
- The work is per upstream read, not per event, for the events the proxy does not
  need to read: a read's complete events are looked at in one pass (``_Watch.take``,
  scan.plain_run: C where built, else a few C-speed byte scans); only the events the
  proxy must read (usage, an error, the end, anything but plain ``data: {...}``
  lines) are parsed one by one (``_Watch.keep``).
  What that leaves unchecked: docs/performance.md, "What the relay checks".
- A stream ends either with the upstream's own terminal event or with an SSE error
  event in OpenAI's shape: never silently, so clients can tell a cut from a short
  answer.
- The upstream response is closed on every path (the caller's ``async with``); a
  client that goes away cancels the handler, which closes the upstream connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from time import perf_counter
from typing import Final

import msgspec
from aiohttp import web

from ..errors import (
    ClientDisconnected,
    ProxyError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamStreamError,
    UpstreamTimeout,
    error_body,
    render,
)
from ..exchange import OVERHEAD_HEADER, Exchange
from . import lean
from .faults import Disconnected
from .h1_conn import Response, text_of
from .reported import find_usage
from .scan import DONE, NULL_USAGE, plain_run
from .sse import Cutter, events_in
from .upstream import Upstream
from .wire import Usage

# Upstream response headers worth passing to the client; everything else (hop-by-hop,
# the upstream's own rate-limit state, cookies, server banners) stays behind. Each
# with the lowered name it is looked up by (among h1_conn.READ: ``Response.fields``).
PASS_HEADERS: Final = tuple(
    (name, name.lower().encode())
    for name in (
        "Content-Type",
        "Retry-After",
        "Retry-After-Ms",
        "X-Should-Retry",
        "OpenAI-Processing-Ms",
        "OpenAI-Version",
    )
)
STREAM_HEADERS: Final = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# Events after which a stream is complete (chat/completions end with [DONE]; the
# Responses API ends with one of its terminal events).
_TERMINAL_NAMES: Final = frozenset(
    (b"response.completed", b"response.failed", b"response.incomplete", b"error")
)
MAX_BODY = 64 * 1024 * 1024
# The most bytes of one stream event held back waiting for its end: an upstream that
# never ends an event must not grow the proxy without bound. Generous: the Responses
# API's last event repeats the whole answer.
MAX_EVENT = 16 * 1024 * 1024
_JSON = "application/json"


def response_headers(upstream: Response, extra: Mapping[str, str]) -> dict[str, str]:
    fields = upstream.fields
    headers: dict[str, str] = {
        name: text_of(v) for name, lowered in PASS_HEADERS if (v := fields.get(lowered)) is not None
    }
    headers.update(extra)
    return headers


async def read_body(up: Response, upstream: Upstream) -> bytes:
    """The whole upstream body, each read bounded by the idle timeout (the response's)."""
    parts: list[bytes] = []
    size = 0
    try:
        body = up.body_if_complete()
        if body is not None:  # all of it came with the headers: nothing to wait for
            _check_size(len(body))
            return body
        while chunk := await up.read_chunk():
            size += len(chunk)
            _check_size(size)
            parts.append(chunk)
        return b"".join(parts)
    except TimeoutError:
        raise UpstreamTimeout(
            f"The upstream went silent for {upstream.timeouts.idle:g}s mid-response."
        ) from None
    except Disconnected:
        raise UpstreamError("The upstream connection broke mid-response.") from None


def _check_size(size: int) -> None:
    if size > MAX_BODY:
        raise UpstreamProtocolError(f"The upstream response exceeded {MAX_BODY} bytes.")


async def relay_body(
    call: lean.Incoming,
    up: Response,
    upstream: Upstream,
    exchange: Exchange,
    headers: Mapping[str, str],
) -> lean.Answer:
    """A non-streamed answer: read it, take its usage, send it on (sent on return)."""
    start = perf_counter()
    body = await read_body(up, upstream)
    exchange.upstream_time += perf_counter() - start
    exchange.status = up.status
    exchange.first_byte = perf_counter()
    if up.status < 400:
        exchange.usage = _answer_usage(up.content_type, body, exchange.stream)
    else:
        body = upstream_error_body(up.status, body)
    out = response_headers(up, headers)
    out[OVERHEAD_HEADER] = exchange.overhead_ms()
    # Sent here rather than by aiohttp once the handler returns: the handler's
    # accounting (ledger, metrics, settlement) then runs after the client has its
    # answer, off the latency it sees, as it does for streams.
    try:
        sent = await lean.send(call, up.status, out, body)
        if sent is not None:  # written below web.Response (lean.py)
            return sent
        assert call.request is not None  # send answers every front.py request
        response = web.Response(body=body, status=up.status, headers=out)
        await response.prepare(call.request)
        await response.write_eof()
    except ConnectionResetError:
        exchange.error = ClientDisconnected
        return lean.Sent(up.status, False)
    return response


def upstream_error_body(status: int, body: bytes) -> bytes:
    """Pass an OpenAI-shaped upstream error through; wrap anything else."""
    if body.lstrip().startswith(b"{") and body.find(b'"error"') >= 0:
        return body
    return error_body(
        f"The upstream answered HTTP {status}.",
        "server_error" if status >= 500 else "invalid_request_error",
        "upstream_error",
    )


async def relay_stream(
    call: lean.Incoming,
    up: Response,
    upstream: Upstream,
    exchange: Exchange,
    headers: Mapping[str, str],
    strip: bool,
) -> lean.Answer:
    """Relay an SSE stream chunk by chunk; see the module invariants."""
    head = {**STREAM_HEADERS, **headers, OVERHEAD_HEADER: exchange.overhead_ms()}
    exchange.status = up.status
    # The head and the chunk frames written by the proxy (lean.py), or, where it
    # cannot, by aiohttp's response and its writer: one layer less per write.
    writer: lean.Chunked | lean.Ordinary | None = lean.Chunked.start(call, up.status, head)
    if writer is None:
        assert call.request is not None  # Chunked starts every front.py stream
        response = web.StreamResponse(status=up.status, headers=head)
        await response.prepare(call.request)
        writer = lean.Ordinary(call.request, response)
    out = writer.response
    relay = _Relay(exchange, strip)
    kept = relay.kept
    idle = upstream.timeouts.idle
    failure: ProxyError | None = None
    waited = 0.0
    try:
        while True:
            t0 = perf_counter()
            if relay.transport is not None:
                # The head is out: reads go to the client from the upstream's
                # data_received, without waking this task (_Relay.__call__); it is back
                # for the end, a failure, the last events or a full client buffer.
                busy = relay.busy
                await up.pump(relay)  # bounded by the idle timeout (the response's)
                # The relay's own work in the pump is the proxy's time, not the upstream's.
                waited += perf_counter() - t0 - (relay.busy - busy)
                if relay.failure is not None:
                    raise relay.failure
            else:
                chunk = await up.read_chunk()
                waited += perf_counter() - t0
                if not chunk:
                    break
                relay.cut(chunk)
            if kept:
                if relay.watch.finished and up.is_complete():
                    break  # the upstream's end came with them: one write for both, below
                try:
                    await writer.write(kept)
                except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
                    exchange.error = ClientDisconnected
                    return out
                kept.clear()
                relay.transport = writer.transport  # the head went with the first write
            elif relay.transport is not None:
                if up.is_complete():
                    break
                try:  # the pump stopped for the client's full buffer
                    await writer.drain()
                except ConnectionResetError:
                    exchange.error = ClientDisconnected
                    return out
    except ProxyError as exc:
        failure = exc
    except TimeoutError:
        failure = UpstreamTimeout(f"The upstream stream stalled for more than {idle:g}s.")
    except Disconnected:
        failure = UpstreamError("The upstream connection broke mid-stream.")
    finally:
        exchange.upstream_time += waited
    if failure is None and not relay.watch.finished:
        failure = UpstreamError("The upstream stream ended before it was complete.")
    # What is left (the last events, or those that came before a failure in the same
    # read) and the error event go out with the end of the response, in one write.
    if failure is not None:
        exchange.error = type(failure)
        kept.append(b"data: " + render(failure) + b"\n\n")
    try:
        await writer.write_eof(kept)
    except ConnectionResetError:
        exchange.error = exchange.error or ClientDisconnected
    return out


# Bytes waiting in the client's socket buffer above which the pump hands over to the
# handler's task, which waits for them to drain (the upstream's reading is paused
# meanwhile, by h1's own limit): the transport's default high-water mark.
_CLIENT_HIGH = 64 * 1024


class _Relay:
    """One stream's state between reads: the cut, the watch, the bytes kept for the
    client, and (once the head is out) the client transport that reads are written
    to straight from the upstream connection's ``data_received``."""

    __slots__ = ("busy", "cutter", "exchange", "failure", "kept", "transport", "watch")

    def __init__(self, exchange: Exchange, strip: bool) -> None:
        self.exchange = exchange
        self.cutter = Cutter()
        self.watch = _Watch(exchange, strip)
        self.kept: list[bytes] = []
        self.failure: Exception | None = None
        self.transport: asyncio.WriteTransport | None = None
        self.busy = 0.0  # seconds spent in __call__

    def cut(self, chunk: bytes) -> None:
        """Add to ``kept`` what the client gets of this read; raises ``ProxyError``."""
        block = self.cutter.feed(chunk)
        if block:
            self.watch.take(block, self.kept)
        if self.cutter.pending > MAX_EVENT:
            raise UpstreamProtocolError(f"A stream event exceeded {MAX_EVENT} bytes.")
        if self.kept and self.exchange.first_byte is None:
            self.exchange.first_byte = perf_counter()

    def __call__(self, chunk: bytes) -> bool:
        """h1's pump: relay one read to the client in a chunked frame. False hands the
        stream back to the task: a failure (in ``failure``), the stream's end among the
        events (they go with the terminator), a client gone or its buffer full."""
        start = perf_counter()
        try:
            return self._relay(chunk)
        except Exception as exc:  # raised again in the task
            self.failure = exc
            return False
        finally:
            self.busy += perf_counter() - start

    def _relay(self, chunk: bytes) -> bool:
        self.cut(chunk)
        kept = self.kept
        if not kept:
            return True
        transport = self.transport
        if self.watch.finished or transport is None or transport.is_closing():
            return False
        transport.write(lean.frame(kept, b"\r\n"))
        kept.clear()
        return transport.get_write_buffer_size() <= _CLIENT_HIGH


class _Watch:
    """Reads complete events for the facts the proxy needs (end of stream, usage,
    errors), refuses those clients could not parse, and decides which bytes of them
    the client gets."""

    __slots__ = ("exchange", "finished", "strip")

    def __init__(self, exchange: Exchange, strip: bool) -> None:
        self.exchange = exchange
        self.strip = strip
        self.finished = False

    def take(self, block: bytes, kept: list[bytes]) -> None:
        """Append to ``kept`` what the client gets of ``block``, a run of complete
        events. Raises ``UpstreamProtocolError`` at a malformed event, once the bytes
        of the events before it are in ``kept``."""
        # A pass over the whole read, not one per event (scan.py).
        head, count, rest, data = plain_run(block, self.strip)
        if count:  # nothing to read in them: relayed as they are
            self.exchange.events += count
            kept.append(head)
        if not rest:
            return
        if data is not None:  # one data line (a usage chunk, most often), then [DONE]?
            done = rest.endswith(DONE) and len(rest) > len(DONE)
            raw = self.keep(rest[: len(rest) - len(DONE)] if done else rest, b"", data)
            if raw is not None:
                kept.append(raw)
            if done:
                self.finished = True
                kept.append(DONE)
            return
        for event in events_in(rest):
            raw = self.keep(event.raw, event.name, event.data)
            if raw is not None:
                kept.append(raw)

    def keep(self, raw: bytes, name: bytes, data: bytes | None) -> bytes | None:
        """What the client gets of one event (``sse.Event``'s parts): None for
        nothing."""
        if data is None:  # comments and keep-alives pass through
            return raw
        if data == b"[DONE]":
            self.finished = True
            return raw
        if self.strip:  # what is checked is what the client gets
            stripped = _without_null_usage(raw)
            if stripped is not raw:  # none in the raw event: none in its data lines
                data, raw = _without_null_usage(data), stripped
        usage, usage_only = _usage_of(data, "stream event")
        self.exchange.events += 1  # the usage ledger's estimate when usage never comes
        if name in _TERMINAL_NAMES:
            self.finished = True
        elif data.startswith(b'{"error"'):
            self.finished = True  # the upstream ended the stream with its own error
            self.exchange.error = UpstreamStreamError
        if usage is not None:
            self.exchange.usage = usage
            if self.strip and usage_only:
                return None
        return raw


_raw_decoder = msgspec.json.Decoder(msgspec.Raw)


def _usage_of(data: bytes, what: str) -> tuple[Usage | None, bool]:
    """The usage in ``data`` and whether it is a usage-only chunk (``find_usage``);
    refuses to relay JSON the client could not parse. One decode where ``data`` holds
    a usage: ``find_usage``'s shows it well-formed. Else a validation (~0.2 µs for an
    event); nesting deeper than the recursion limit counts: the SDK could not read
    it."""
    usage, usage_only, parsed = find_usage(data)
    if not parsed:
        try:
            _raw_decoder.decode(data)
        except (msgspec.DecodeError, RecursionError):
            raise UpstreamProtocolError(f"The upstream sent a malformed {what}.") from None
    return usage, usage_only


def _answer_usage(content_type: str, body: bytes, stream: bool) -> Usage | None:
    """The usage of a successful answer; refuses one the client could not use rather
    than pass it on as a success: a JSON body that does not parse, or a stream request
    answered with neither a stream nor JSON (say, an HTML page from something in
    between)."""
    if content_type == _JSON:
        return _usage_of(body, "response body")[0]
    if stream:
        raise UpstreamProtocolError(
            f"The upstream answered a stream request with {content_type[:100]!r}."
        )
    return find_usage(body)[0]


# Each spelling of NULL_USAGE holds one of these.
_NULL_TIGHT: Final = b'"usage":null'
_NULL_SPACED: Final = b'"usage": null'


def _without_null_usage(raw: bytes) -> bytes:
    """``raw`` without the ``"usage":null`` members the upstream added to each chunk
    because the proxy asked for usage: every occurrence, of each spelling; ``raw``
    itself when it holds none, found in two scans, not four (callgrind,
    bench/RESULTS.md)."""
    if raw.find(_NULL_TIGHT) < 0 and raw.find(_NULL_SPACED) < 0:
        return raw
    for pattern in NULL_USAGE:
        if raw.find(pattern) >= 0:
            raw = raw.replace(pattern, b"")
    return raw
