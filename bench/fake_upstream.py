"""A fast, scriptable fake OpenAI-compatible upstream for tests, benchmarks and demos.

Run it standalone::

    python -m bench.fake_upstream --port 9000 [--chunks 8] [--gap-ms 0]

or embed it in async tests::

    async with FakeUpstream(chunks=4) as up:
        client = openai.AsyncOpenAI(base_url=up.url, api_key="x")

Behaviour is scripted per request with ``x-fake-*`` headers (falling back to
:attr:`FakeUpstream.default`), applied to every POST endpoint:

``x-fake-delay-ms: N``
    Sleep N ms before answering.
``x-fake-status: CODE`` (+ ``x-fake-retry-after: S``)
    Answer with an OpenAI-shaped error (and a ``Retry-After`` header).
``x-fake-chunks: N`` / ``x-fake-gap-ms: N``
    Per-request content chunk count / pause between streamed events.
``x-fake-stall: before | N``
    Never answer, or (streams) send N SSE events then hang until the client goes.
``x-fake-cut: headers | N``
    Abort the TCP connection before answering, or (streams) after N SSE events.
``x-fake-malformed: json | sse``
    Invalid JSON body (non-stream), or one good event then a broken one (stream).
``x-fake-echo: 1``
    Non-stream bodies gain ``"echo": {"headers": ..., "body": ...}``.
``x-fake-model: NAME``
    Answers name this model (as OpenAI names a dated snapshot), not the one asked for.

Azure OpenAI paths (``/openai/deployments/{name}/…``, ``/openai/models``) are served
as the ``/v1/…`` paths they stand for; :attr:`FakeUpstream.peak` is the most POST
requests it served at once.

"N SSE events" counts every ``data:`` event written, including the leading role
chunk of chat streams (i.e. what an SDK yields as chunks). For non-stream requests
any ``stall`` value hangs before the headers and any ``cut`` value aborts before them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import ssl
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import orjson
from aiohttp import web
from multidict import CIMultiDict

__all__ = ["Disconnect", "FakeUpstream", "Received", "canned_chat", "main"]

MODEL_IDS = ("fake-model", "fake-embed")
EMBEDDING = (0.1, 0.2, 0.3, 0.4)
_CREATED = 1_700_000_000
_JSON_CT = "application/json"
_SSE_CT = "text/event-stream"
_DONE = b"data: [DONE]\n\n"
_BROKEN_EVENT = b"data: {not json\n\n"
_BROKEN_JSON = b'{"choices": ['
_SHUTDOWN_GRACE_S = 0.1

JSONDict = dict[str, Any]


@dataclass(slots=True)
class Received:
    """One request as seen by the fake upstream."""

    method: str
    path: str
    query: str
    headers: CIMultiDict[str]
    body: bytes
    json: Any
    peer: tuple[str, int]
    at: float


@dataclass(slots=True)
class Disconnect:
    """A request whose client went away before its handler finished."""

    path: str
    at: float
    chunks_sent: int


class _BadBehaviour(ValueError):
    """An ``x-fake-*`` header carried a value that cannot be interpreted."""


@dataclass(slots=True)
class _Plan:
    """Per-request behaviour parsed from ``x-fake-*`` headers."""

    chunks: int
    gap_s: float
    delay_s: float = 0.0
    status: int | None = None
    retry_after: str | None = None
    stall_before: bool = False
    stall_after: int | None = None
    cut_before: bool = False
    cut_after: int | None = None
    malformed: str | None = None
    echo: bool = False
    model: str | None = None


@dataclass(slots=True)
class _Ctx:
    """Everything a response builder needs for one request."""

    id: str
    model: str
    created: int
    chunks: int
    prompt_tokens: int
    include_usage: bool
    body: JSONDict


@dataclass(slots=True)
class _Call:
    """One in-flight POST request and how far its answer got."""

    request: web.Request
    rid: str
    plan: _Plan
    sent: int = 0
    resp: web.StreamResponse | None = None


class _Endpoint(NamedTuple):
    """How one POST endpoint counts prompt tokens and renders its answers."""

    id_prefix: str
    prompt_field: str
    full: Callable[[_Ctx], JSONDict]
    stream: Callable[[_Ctx], Iterator[bytes]] | None
    done: bytes


# --------------------------------------------------------------------------- shapes


@lru_cache(maxsize=64)
def _tokens(n: int) -> tuple[str, ...]:
    return tuple(f"tok{i}" for i in range(n))


@lru_cache(maxsize=64)
def _text(n: int) -> str:
    return " ".join(_tokens(n))


def _words(value: Any) -> int:
    """Count whitespace-separated words in prompt-ish JSON (strings, parts, token ids)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("content")) + _words(value.get("text"))
    return 1 if isinstance(value, int) and not isinstance(value, bool) else 0


def _usage(prompt: int, completion: int) -> JSONDict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _sse(obj: JSONDict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def canned_chat(tokens: int, stream: bool) -> bytes:
    """The whole body of an answer to a chat request for ``tokens`` tokens, as a fixed
    upstream (``bench/nginx.py``) serves it to every request: streams as when the client
    asked for usage (``"usage":null`` in each chunk, the usage chunk, ``[DONE]``)."""
    c = _Ctx("chatcmpl-canned", "bench-model", _CREATED, tokens, 17, stream, {})
    if stream:
        return b"".join(_chat_stream(c)) + _DONE
    return orjson.dumps(_chat_full(c))


def _chat_full(c: _Ctx) -> JSONDict:
    message = {"role": "assistant", "content": _text(c.chunks), "refusal": None}
    return {
        "id": c.id,
        "object": "chat.completion",
        "created": c.created,
        "model": c.model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(c.prompt_tokens, c.chunks),
    }


def _chat_stream(c: _Ctx) -> Iterator[bytes]:
    head = {"id": c.id, "object": "chat.completion.chunk", "created": c.created, "model": c.model}

    def chunk(delta: JSONDict, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = {**head, "choices": [choice]}
        if c.include_usage:
            obj["usage"] = None
        return _sse(obj)

    yield chunk({"role": "assistant", "content": ""})
    for tok in _tokens(c.chunks):
        yield chunk({"content": tok + " "})
    yield chunk({}, "stop")
    if c.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(c.prompt_tokens, c.chunks)})


def _completion_full(c: _Ctx) -> JSONDict:
    choice = {"index": 0, "text": _text(c.chunks), "logprobs": None, "finish_reason": "stop"}
    return {
        "id": c.id,
        "object": "text_completion",
        "created": c.created,
        "model": c.model,
        "choices": [choice],
        "usage": _usage(c.prompt_tokens, c.chunks),
    }


def _completion_stream(c: _Ctx) -> Iterator[bytes]:
    head = {"id": c.id, "object": "text_completion", "created": c.created, "model": c.model}

    def chunk(text: str, finish: str | None = None) -> bytes:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = {**head, "choices": [choice]}
        if c.include_usage:
            obj["usage"] = None
        return _sse(obj)

    for tok in _tokens(c.chunks):
        yield chunk(tok + " ")
    yield chunk("", "stop")
    if c.include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(c.prompt_tokens, c.chunks)})


def _embeddings_full(c: _Ctx) -> JSONDict:
    raw = c.body.get("input")
    inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    data = [
        {"object": "embedding", "index": i, "embedding": list(EMBEDDING)}
        for i in range(len(inputs))
    ]
    usage = {"prompt_tokens": c.prompt_tokens, "total_tokens": c.prompt_tokens}
    return {"object": "list", "data": data, "model": c.model, "usage": usage}


def _response_obj(c: _Ctx, *, done: bool) -> JSONDict:
    output: list[JSONDict] = []
    usage: JSONDict | None = None
    if done:
        text = {"type": "output_text", "text": _text(c.chunks), "annotations": []}
        output.append(_response_message(c, [text]))
        usage = {
            "input_tokens": c.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": c.chunks,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": c.prompt_tokens + c.chunks,
        }
    return {
        "id": c.id,
        "object": "response",
        "created_at": c.created,
        "status": "completed" if done else "in_progress",
        "model": c.model,
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def _response_message(c: _Ctx, content: list[JSONDict]) -> JSONDict:
    return {
        "type": "message",
        "id": "msg_" + c.id,
        "status": "completed",
        "role": "assistant",
        "content": content,
    }


def _responses_full(c: _Ctx) -> JSONDict:
    return _response_obj(c, done=True)


def _responses_stream(c: _Ctx) -> Iterator[bytes]:
    seq = itertools.count()

    def event(kind: str, payload: JSONDict) -> bytes:
        obj = {"type": kind, "sequence_number": next(seq), **payload}
        return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"

    yield event("response.created", {"response": _response_obj(c, done=False)})
    item = {"item_id": "msg_" + c.id, "output_index": 0, "content_index": 0, "logprobs": []}
    for tok in _tokens(c.chunks):
        yield event("response.output_text.delta", {**item, "delta": tok + " "})
    yield event("response.completed", {"response": _response_obj(c, done=True)})


_ENDPOINTS: dict[str, _Endpoint] = {
    "/v1/chat/completions": _Endpoint("chatcmpl-", "messages", _chat_full, _chat_stream, _DONE),
    "/v1/completions": _Endpoint("cmpl-", "prompt", _completion_full, _completion_stream, _DONE),
    "/v1/embeddings": _Endpoint("emb-", "input", _embeddings_full, None, b""),
    "/v1/responses": _Endpoint("resp_", "input", _responses_full, _responses_stream, b""),
}

_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [
            {"id": mid, "object": "model", "created": _CREATED, "owned_by": "fake"}
            for mid in MODEL_IDS
        ],
    }
)


@lru_cache(maxsize=32)
def _status_error(status: int) -> bytes:
    if status == 429:
        kind, code, message = "requests", "rate_limit_exceeded", "Rate limit reached (fake)."
    elif status >= 500:
        kind, code, message = "server_error", None, f"The fake upstream failed ({status})."
    else:
        kind, code, message = "invalid_request_error", None, f"Fake error {status}."
    return _error_body(message, kind, code)


def _error_body(message: str, kind: str, code: str | None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


async def _forever() -> None:
    """Block until cancelled (i.e. until the client disconnects)."""
    await asyncio.get_running_loop().create_future()


# --------------------------------------------------------------------------- server


class FakeUpstream:
    """An in-process fake OpenAI-compatible server with scriptable misbehaviour.

    ``port=0`` picks a free port; after :meth:`start`, :attr:`port` and :attr:`url`
    hold the real values. All requests land in :attr:`received` (unless
    :attr:`keep_received` is false, as in long benchmark runs); requests whose
    client vanished mid-handler land in :attr:`disconnects`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        chunks: int = 8,
        gap_ms: float = 0.0,
        ssl_context: ssl.SSLContext | None = None,
        name: str = "fake",
    ) -> None:
        self.host = host
        self.port = port
        self.chunks = chunks
        self.gap_ms = gap_ms
        self.ssl_context = ssl_context
        self.name = name
        self.received: list[Received] = []
        self.disconnects: list[Disconnect] = []
        self.default: dict[str, str] = {}
        self.keep_received = True
        self._runner: web.AppRunner | None = None
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        # POST requests being served now, and the most at any one time.
        self.active = 0
        self.peak = 0

    @property
    def url(self) -> str:
        """Base URL including ``/v1``, e.g. ``http://127.0.0.1:54321/v1``."""
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/v1"

    async def start(self) -> None:
        """Bind and start serving; returns once the socket accepts connections."""
        if self._runner is not None:
            return
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(
            app,
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=_SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop serving and drop open connections. Safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def peers(self) -> set[tuple[str, int]]:
        """Distinct client ``(host, port)`` pairs seen, i.e. TCP connections used."""
        return {r.peer for r in self.received}

    async def wait_received(self, n: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` requests have arrived (raises TimeoutError)."""
        async with asyncio.timeout(timeout):
            await self._until(lambda: len(self.received) >= n)

    async def wait_disconnect(self, n: int = 1, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until at least ``n`` client disconnects were recorded (raises TimeoutError)."""
        async with asyncio.timeout(timeout):
            await self._until(lambda: len(self.disconnects) >= n)

    def reset(self) -> None:
        """Forget recorded requests/disconnects and clear :attr:`default` behaviours."""
        self.received.clear()
        self.disconnects.clear()
        self.default.clear()

    # ----------------------------------------------------------------- internals

    async def _until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            await self._changed.wait()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def _record(self, request: web.Request, body: bytes, parsed: Any) -> None:
        transport = request.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        rec = Received(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=CIMultiDict(request.headers),
            body=body,
            json=parsed,
            peer=(peer[0], peer[1]) if peer else ("", 0),
            at=time.monotonic(),
        )
        self.received.append(rec)
        self._notify()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parsed = _loads(body)
        if self.keep_received:
            self._record(request, body, parsed)
        rid = request.headers.get("x-request-id") or f"{self.name}-req-{next(self._ids)}"
        path = _openai_path(request.path)
        if request.method == "GET" and path == "/v1/models":
            return web.Response(body=_MODELS_BODY, headers=_headers(rid, _JSON_CT))
        endpoint = _ENDPOINTS.get(path) if request.method == "POST" else None
        if endpoint is None:
            message = f"Unknown request URL: {request.method} {request.path}"
            error = _error_body(message, "invalid_request_error", "not_found")
            return web.Response(status=404, body=error, headers=_headers(rid, _JSON_CT))
        try:
            plan = self._plan(request)
        except _BadBehaviour as exc:
            return _bad_request(rid, str(exc))
        if not isinstance(parsed, dict):
            return _bad_request(rid, "Request body must be a JSON object.")
        return await self._guarded(_Call(request, rid, plan), endpoint, parsed)

    def _plan(self, request: web.Request) -> _Plan:
        headers, default = request.headers, self.default

        def opt(name: str) -> str | None:
            value = headers.get(name)
            return value if value is not None else default.get(name)

        stall, cut, status = opt("x-fake-stall"), opt("x-fake-cut"), opt("x-fake-status")
        chunks = opt("x-fake-chunks")
        return _Plan(
            chunks=_int(chunks) if chunks else self.chunks,
            gap_s=_ms(opt("x-fake-gap-ms"), self.gap_ms),
            delay_s=_ms(opt("x-fake-delay-ms"), 0.0),
            status=_int(status) if status else None,
            retry_after=opt("x-fake-retry-after"),
            stall_before=stall == "before",
            stall_after=_int(stall) if stall and stall != "before" else None,
            cut_before=cut == "headers",
            cut_after=_int(cut) if cut and cut != "headers" else None,
            malformed=opt("x-fake-malformed"),
            echo=opt("x-fake-echo") not in (None, "", "0", "false"),
            model=opt("x-fake-model"),
        )

    async def _guarded(
        self, call: _Call, endpoint: _Endpoint, body: JSONDict
    ) -> web.StreamResponse:
        """Serve ``call``, recording a :class:`Disconnect` if the client goes away."""
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            return await self._serve(call, endpoint, body)
        except asyncio.CancelledError:
            self._disconnected(call)
            raise
        except ConnectionResetError:  # includes aiohttp's ClientConnectionResetError
            self._disconnected(call)
            return call.resp or web.Response()
        finally:
            self.active -= 1

    def _disconnected(self, call: _Call) -> None:
        if self._runner is None:  # our own shutdown cancelled it; the client did not leave
            return
        self.disconnects.append(Disconnect(call.request.path, time.monotonic(), call.sent))
        self._notify()

    async def _serve(self, call: _Call, endpoint: _Endpoint, body: JSONDict) -> web.StreamResponse:
        plan, rid = call.plan, call.rid
        if plan.delay_s > 0:
            await asyncio.sleep(plan.delay_s)
        streamer = endpoint.stream if body.get("stream") is True else None
        stream = streamer is not None
        if plan.cut_before or (plan.cut_after is not None and not stream):
            return _abort(call.request)
        if plan.stall_before or (plan.stall_after is not None and not stream):
            await _forever()
        if plan.status is not None:
            return _status_response(plan.status, plan.retry_after, rid)
        ctx = self._ctx(endpoint, body, plan.chunks, plan.model)
        if streamer is not None:
            return await self._stream(call, streamer(ctx), endpoint.done)
        if plan.malformed == "json":
            return web.Response(body=_BROKEN_JSON, headers=_headers(rid, _JSON_CT))
        obj = endpoint.full(ctx)
        if plan.echo:
            headers = {str(k): v for k, v in call.request.headers.items()}
            obj["echo"] = {"headers": headers, "body": body}
        return web.Response(body=orjson.dumps(obj), headers=_headers(rid, _JSON_CT))

    def _ctx(self, endpoint: _Endpoint, body: JSONDict, chunks: int, answered: str | None) -> _Ctx:
        options = body.get("stream_options")
        model = answered or body.get("model")
        return _Ctx(
            id=f"{endpoint.id_prefix}{self.name}{next(self._ids)}",
            model=model if isinstance(model, str) else MODEL_IDS[0],
            created=int(time.time()),
            chunks=chunks,
            prompt_tokens=max(1, _words(body.get(endpoint.prompt_field))),
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            body=body,
        )

    async def _stream(
        self, call: _Call, events: Iterable[bytes], done: bytes
    ) -> web.StreamResponse:
        plan = call.plan
        if plan.malformed == "sse":
            events = itertools.chain(itertools.islice(events, 1), (_BROKEN_EVENT,))
        if done:
            events = itertools.chain(events, (done,))
        halt = plan.cut_after if plan.cut_after is not None else plan.stall_after
        resp = call.resp = web.StreamResponse(headers=_headers(call.rid, _SSE_CT))
        await resp.prepare(call.request)
        gap = plan.gap_s
        for event in itertools.islice(events, halt):
            if gap > 0 and call.sent:
                await asyncio.sleep(gap)
            await resp.write(event)
            call.sent += 1
        if plan.cut_after is not None:
            _abort(call.request)
            return resp
        if plan.stall_after is not None:
            await _forever()
        await resp.write_eof()
        return resp


def _openai_path(path: str) -> str:
    """Azure OpenAI paths as the ``/v1`` paths they stand for:
    ``/openai/deployments/{name}/chat/completions`` → ``/v1/chat/completions``,
    ``/openai/models`` → ``/v1/models``."""
    if path.startswith("/openai/deployments/"):
        name_and_rest = path[len("/openai/deployments/") :]
        _, slash, rest = name_and_rest.partition("/")
        return "/v1/" + rest if slash else path
    return "/v1/models" if path == "/openai/models" else path


def _headers(rid: str, content_type: str) -> dict[str, str]:
    headers = {"Content-Type": content_type, "x-request-id": rid}
    if content_type == _SSE_CT:
        headers["Cache-Control"] = "no-cache"
    return headers


def _status_response(status: int, retry_after: str | None, rid: str) -> web.Response:
    headers = _headers(rid, _JSON_CT)
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return web.Response(status=status, body=_status_error(status), headers=headers)


def _bad_request(rid: str, message: str) -> web.Response:
    body = _error_body(message, "invalid_request_error", None)
    return web.Response(status=400, body=body, headers=_headers(rid, _JSON_CT))


def _abort(request: web.Request) -> web.Response:
    """Drop the TCP connection so that whatever was sent never terminates properly."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response()


def _loads(body: bytes) -> Any:
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def _int(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _BadBehaviour(f"x-fake-* value must be an integer, got {value!r}") from None


def _ms(value: str | None, fallback_ms: float) -> float:
    """Milliseconds from a header (or the fallback) as seconds."""
    if not value:
        return fallback_ms / 1000
    try:
        return float(value) / 1000
    except ValueError:
        raise _BadBehaviour(f"x-fake-* value must be a number, got {value!r}") from None


# --------------------------------------------------------------------------- CLI


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake OpenAI-compatible upstream server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--chunks", type=int, default=8, help="content chunks per answer")
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between SSE events")
    parser.add_argument("--tls-cert", help="PEM certificate chain (enables HTTPS)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    return args


async def _serve_forever(args: argparse.Namespace) -> None:
    ssl_context = None
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = FakeUpstream(
        host=args.host,
        port=args.port,
        chunks=args.chunks,
        gap_ms=args.gap_ms,
        ssl_context=ssl_context,
    )
    server.keep_received = False  # a long-running server must not grow without bound
    async with server:
        print(f"fake upstream listening on {server.url}", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; serves until SIGINT/SIGTERM."""
    args = _parse_args(argv)
    try:
        import uvloop

        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_forever(args))


if __name__ == "__main__":
    main()
