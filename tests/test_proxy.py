"""The core proxy over real loopback HTTP, driven by the official OpenAI SDK."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import re
import time
from pathlib import Path

import aiohttp
import msgspec
import openai
import orjson
import pytest
from aiohttp import web

from bench.fake_upstream import FakeUpstream
from proxy.app import build_app
from proxy.config import schema as cfg
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Deployment, Model, Timeouts
from proxy.exchange import millis, unique_hex
from proxy.state import STATE
from tests.support.env import CLIENT_KEY, UPSTREAM_KEY, free_port
from tests.support.inproc import MakeProxy, Proxy, Recorder

MESSAGES = [{"role": "user", "content": "say three words"}]


# 1. Endpoints ---------------------------------------------------------------------


async def test_chat_completion_passes_through_with_usage(
    client: openai.AsyncOpenAI, proxy: Proxy
) -> None:
    reply = await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert reply.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (3, 8)
    [ex] = proxy.recorder.exchanges
    assert ex.usage is not None
    assert (ex.usage.prompt_tokens, ex.usage.completion_tokens, ex.usage.total_tokens) == (3, 8, 11)
    assert (ex.status, ex.model, ex.stream, ex.error_name) == (200, "m1", False, "")


async def test_completions_embeddings_and_responses(
    client: openai.AsyncOpenAI, proxy: Proxy
) -> None:
    completion = await client.completions.create(model="m1", prompt="one two")
    assert completion.choices[0].text.startswith("tok0")
    embedding = await client.embeddings.create(model="e1", input=["a", "b"])
    assert len(embedding.data) == 2
    assert embedding.usage.prompt_tokens > 0
    response = await client.responses.create(model="m1", input="hello there")
    assert response.output_text.startswith("tok0")
    stream = await client.responses.create(model="m1", input="hello there", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    usages = [ex.usage for ex in proxy.recorder.exchanges]
    assert all(u is not None and u.total_tokens > 0 for u in usages), usages
    assert [ex.endpoint for ex in proxy.recorder.exchanges] == [
        "completions",
        "embeddings",
        "responses",
        "responses",
    ]


async def test_models_lists_configured_models(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    deployment = Deployment(base_url=upstream.url)
    config = resolve(
        cfg.Config(models=[Model(name=n, deployments=[deployment]) for n in ("a", "b")])
    )
    proxy = await make_proxy(config)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        models = await client.models.list()
    assert [m.id for m in models.data] == ["a", "b"]
    assert upstream.received == []


async def test_models_in_quick_start_mode_come_from_the_upstream(
    client: openai.AsyncOpenAI,
) -> None:
    models = await client.models.list()
    assert "fake-model" in [m.id for m in models.data]


async def test_unknown_path_is_an_openai_404(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (("GET", "/nope"), ("GET", "/v1/chat/completions"), ("PUT", "/v1/x")):
            async with http.request(method, proxy.url + path) as resp:
                assert resp.status == 404
                body = await resp.json()
                assert body["error"]["type"] == "invalid_request_error"
                assert resp.headers["X-Request-Id"]


async def test_unknown_model_is_model_not_found(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    deployment = Deployment(base_url=upstream.url)
    config = resolve(cfg.Config(models=[Model(name="a", deployments=[deployment])]))
    proxy = await make_proxy(config)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="zzz", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    assert upstream.received == []


# 2. Body forwarded byte for byte --------------------------------------------------


async def test_body_is_forwarded_byte_for_byte(proxy: Proxy, upstream: FakeUpstream) -> None:
    body = (
        b'{ "model" : "m1",\n "messages": [{"role": "user", "content": "caf\\u00e9 \xe2\x9c\x93"}],'
        b' "temperature": 1.50, "top_p": 1e0, "x_extra": {"nested": [1, 2.0, null]} }'
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=body) as resp:
            assert resp.status == 200
    assert upstream.received[-1].body == body


async def test_model_rename_changes_only_the_model(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    deployment = Deployment(base_url=upstream.url, model="upstream-name")
    config = resolve(cfg.Config(models=[Model(name="alias", deployments=[deployment])]))
    proxy = await make_proxy(config)
    body = (
        b'{"model": "alias", "temperature": 1.50, "messages": [{"role": "user", "content": "hi"}]}'
    )
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=body) as resp:
            assert resp.status == 200
            assert (await resp.json())["model"] == "upstream-name"
    sent = upstream.received[-1].body
    assert orjson.loads(sent) == {**orjson.loads(body), "model": "upstream-name"}
    assert b'"temperature":1.50' in sent  # the float's own bytes survive


# 3 & 4. Streaming -----------------------------------------------------------------


async def test_stream_arrives_chunk_by_chunk(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m1",
        messages=MESSAGES,
        stream=True,
        extra_headers={"x-fake-chunks": "20", "x-fake-gap-ms": "50"},
    )
    arrivals = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter())
    assert len(arrivals) == 20
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # Buffering would bunch chunks together; each must come on its own, ~50 ms apart.
    assert sum(g > 0.025 for g in gaps) >= 17, gaps
    assert arrivals[-1] - arrivals[0] > 0.7 * 19 * 0.05


async def test_stream_without_include_usage_looks_direct(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
    async with aiohttp.ClientSession() as http:
        async with http.post(upstream.url + "/chat/completions", data=body) as resp:
            direct = await resp.read()
        async with http.post(proxy.base + "/chat/completions", data=body) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Accel-Buffering"] == "no"
            assert "Content-Encoding" not in resp.headers
            proxied = await resp.read()
    # The proxy asked upstream for usage, then removed every trace of it.
    assert orjson.loads(upstream.received[-1].body)["stream_options"] == {"include_usage": True}
    assert b"usage" not in proxied

    def normal(raw: bytes) -> bytes:  # ids and timestamps differ between two calls
        return re.sub(rb'"(id|created)":("[^"]*"|\d+)', b"", raw)

    assert normal(proxied) == normal(direct)
    assert proxy.recorder.exchanges[-1].usage is not None
    assert proxy.recorder.exchanges[-1].usage.completion_tokens == 8


async def test_stream_with_include_usage_keeps_the_usage_chunk(
    client: openai.AsyncOpenAI, proxy: Proxy
) -> None:
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert proxy.recorder.exchanges[-1].usage == proxy.recorder.exchanges[-1].usage
    assert proxy.recorder.exchanges[-1].usage is not None


# 6. Client disconnect cancels the upstream call -----------------------------------


@pytest.mark.parametrize(
    ("stream", "behaviour"),
    [
        (True, {"x-fake-stall": "before"}),
        (True, {"x-fake-stall": "2"}),
        (False, {"x-fake-delay-ms": "10000"}),
    ],
    ids=["stream-before-first-byte", "mid-stream", "non-stream-waiting"],
)
async def test_client_disconnect_cancels_upstream(
    proxy: Proxy, upstream: FakeUpstream, stream: bool, behaviour: dict[str, str]
) -> None:
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": stream})
    async with aiohttp.ClientSession() as http:
        if behaviour.get("x-fake-stall") == "2":
            async with http.post(
                proxy.base + "/chat/completions", data=body, headers=behaviour
            ) as r:
                await r.content.readuntil(b"\n\n")
                gone = time.perf_counter()
        else:
            task = asyncio.create_task(
                http.post(proxy.base + "/chat/completions", data=body, headers=behaviour)
            )
            await upstream.wait_received()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            gone = time.perf_counter()
    await upstream.wait_disconnect(timeout=2.0)
    assert upstream.disconnects[0].at - gone < 0.5
    await _until(lambda: len(proxy.recorder.exchanges) == 1)
    assert proxy.recorder.exchanges[0].error_name == "client_disconnected"


async def _until(condition: object, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# 7. Upstream failures never look like success --------------------------------------


async def test_refused_connection_is_502(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(quick_start(f"http://127.0.0.1:{free_port()}/v1", None))
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert caught.value.status_code == 502
    assert "connect" in caught.value.message


async def test_no_answer_in_time_is_504(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    deployment = Deployment(base_url=upstream.url, timeouts=Timeouts(first_byte=0.3))
    proxy = await make_proxy(
        resolve(cfg.Config(models=[Model(name="*", deployments=[deployment])]))
    )
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"x-fake-delay-ms": "3000"}
            )
    assert caught.value.status_code == 504
    await upstream.wait_disconnect()  # the abandoned upstream call was closed


async def test_upstream_429_passes_through_with_retry_after(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="m1",
            messages=MESSAGES,
            extra_headers={"x-fake-status": "429", "x-fake-retry-after": "7"},
        )
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "rate_limit_exceeded"


async def test_upstream_500_is_a_server_error(client: openai.AsyncOpenAI, proxy: Proxy) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="m1", messages=MESSAGES, extra_headers={"x-fake-status": "500"}
        )
    assert caught.value.status_code == 500
    assert proxy.recorder.exchanges[-1].status == 500


@pytest.mark.parametrize("behaviour", [{"x-fake-cut": "3"}, {"x-fake-malformed": "sse"}])
async def test_cut_stream_ends_with_an_error_event(
    client: openai.AsyncOpenAI, proxy: Proxy, behaviour: dict[str, str]
) -> None:
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, extra_headers=behaviour
    )
    received = 0
    with pytest.raises(openai.APIError):
        async for _ in stream:
            received += 1
    assert received >= 1
    if "x-fake-cut" in behaviour:
        assert proxy.recorder.exchanges[-1].error_name == "UpstreamError"


async def test_stalled_stream_ends_with_an_error_event(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    deployment = Deployment(base_url=upstream.url, timeouts=Timeouts(idle=0.3))
    proxy = await make_proxy(
        resolve(cfg.Config(models=[Model(name="*", deployments=[deployment])]))
    )
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, extra_headers={"x-fake-stall": "2"}
        )
        with pytest.raises(openai.APIError, match="stalled"):
            async for _ in stream:
                pass
    assert proxy.recorder.exchanges[-1].error_name == "UpstreamTimeout"
    await upstream.wait_disconnect()


# 8. Timeouts are per gap, not a total cap ------------------------------------------


async def test_long_healthy_stream_outlives_the_idle_timeout(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    deployment = Deployment(base_url=upstream.url, timeouts=Timeouts(first_byte=0.5, idle=0.5))
    proxy = await make_proxy(
        resolve(cfg.Config(models=[Model(name="*", deployments=[deployment])]))
    )
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m1",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-chunks": "15", "x-fake-gap-ms": "100"},
        )
        chunks = [chunk async for chunk in stream]
    assert len(chunks) == 17  # role chunk + 15 tokens + finish chunk


# 9. Bad input ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'"just a string"', None),
        (b"", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 42}', "model"),
        (b'{"model": "m1", "stream": "yes"}', "stream"),
        (b'{"model": "m1", "max_tokens": "lots"}', "max_tokens"),
    ],
)
async def test_bad_bodies_are_400(
    proxy: Proxy, upstream: FakeUpstream, body: bytes, param: str | None
) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert "Traceback" not in error["message"]
    assert upstream.received == []


async def test_bad_types_raise_bad_request_in_the_sdk(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="stream"):
        await client.chat.completions.create(
            model="m1",
            messages=MESSAGES,
            extra_body={"stream": "sometimes"},  # type: ignore[arg-type]
        )


async def test_body_over_the_limit_is_413(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    config = quick_start(upstream.url, None)
    from tests.support.inproc import with_server

    proxy = await make_proxy(with_server(config, max_body_bytes=10_000))
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "x" * 20_000}]
            )
    assert caught.value.status_code == 413
    assert upstream.received == []


async def test_oversized_headers_are_rejected(proxy: Proxy, upstream: FakeUpstream) -> None:
    headers = {f"x-pad-{i}": "v" * 1000 for i in range(40)}
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base + "/chat/completions", data=b'{"model":"m1"}', headers=headers
        ) as resp:
            assert resp.status == 431
            assert (await resp.json())["error"]["code"] == "request_headers_too_large"
    assert upstream.received == []


# 10. Header hygiene ----------------------------------------------------------------


async def test_client_credentials_never_go_upstream(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await client.chat.completions.create(
        model="m1",
        messages=MESSAGES,
        extra_headers={
            "api-key": CLIENT_KEY,
            "Cookie": "session=secret",
            "Proxy-Authorization": "Basic abc",
            "X-Custom": "kept",
        },
    )
    headers = upstream.received[-1].headers
    assert headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert len(headers.getall("Authorization")) == 1
    for dropped in ("api-key", "Cookie", "Proxy-Authorization"):
        assert dropped not in headers
    assert headers["X-Custom"] == "kept"
    assert CLIENT_KEY not in str(dict(headers)) + upstream.received[-1].body.decode()


async def test_hop_by_hop_headers_are_dropped(proxy: Proxy, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base + "/chat/completions",
            data=b'{"model":"m1"}',
            headers={"Connection": "keep-alive, X-Hop", "X-Hop": "1", "TE": "trailers"},
        ) as resp:
            assert resp.status == 200
    headers = upstream.received[-1].headers
    assert "X-Hop" not in headers
    assert "TE" not in headers


async def test_request_id_is_kept_or_generated(proxy: Proxy, upstream: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base + "/chat/completions",
            data=b'{"model":"m1"}',
            headers={"X-Request-Id": "abc-123"},
        ) as resp:
            assert resp.headers["X-Request-Id"] == "abc-123"
        assert upstream.received[-1].headers["X-Request-Id"] == "abc-123"
        async with http.post(proxy.base + "/chat/completions", data=b'{"model":"m1"}') as resp:
            generated = resp.headers["X-Request-Id"]
    assert generated.startswith("req_")
    assert upstream.received[-1].headers["X-Request-Id"] == generated


def test_unique_ids_are_unique_across_calls_and_forks() -> None:
    """Request ids and ledger uids come from a per-process random half and a counter:
    a forked child must not continue its parent's sequence."""
    ids = {unique_hex() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write, unique_hex().encode())
        os._exit(0)
    os.waitpid(child, 0)
    theirs = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert theirs[:16] != unique_hex()[:16]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0.000"),
        (0.0000004, "0.000"),
        (0.0000006, "0.001"),
        (0.0003041, "0.304"),
        (0.000999, "0.999"),
        (0.0009996, "1.000"),
        (0.0123456, "12.346"),
        (86_400.25, "86400250.000"),
        (-0.0015, "-1.500"),
    ],
)
def test_the_overhead_header_is_milliseconds_to_3_decimals(seconds: float, text: str) -> None:
    """``Exchange.overhead_ms``'s value, the proxy's own time: as ``.3f`` writes it."""
    assert millis(seconds) == text == f"{seconds * 1000:.3f}"


# 11. Connection pooling ------------------------------------------------------------


async def test_upstream_connections_are_reused(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    for _ in range(30):
        await client.chat.completions.create(model="m1", messages=MESSAGES)
    stream = await client.chat.completions.create(model="m1", messages=MESSAGES, stream=True)
    async for _ in stream:
        pass
    assert len(upstream.received) == 31
    assert len(upstream.peers()) <= 2


async def test_client_leaving_mid_stream_is_no_error(
    proxy: Proxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
    behaviour = {"x-fake-chunks": "400", "x-fake-gap-ms": "2"}
    for _ in range(5):
        async with aiohttp.ClientSession() as http:
            url = proxy.base + "/chat/completions"
            async with http.post(url, data=body, headers=behaviour) as resp:
                await resp.content.readuntil(b"\n\n")
    await _until(lambda: len(proxy.recorder.exchanges) == 5)
    assert {ex.error_name for ex in proxy.recorder.exchanges} == {"client_disconnected"}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_a_write_to_a_gone_client_is_a_disconnect_not_an_upstream_failure(
    upstream: FakeUpstream, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # Without handler cancellation the relay only learns of the client's departure
    # from a failing write: that must read as the client leaving, quietly.
    config = msgspec.structs.replace(
        quick_start(upstream.url, None),
        auth=cfg.Auth(enabled=False),
        database=cfg.Database(sqlite_path=str(tmp_path / "proxy.db")),
        usage=cfg.Ledger(spool_dir=str(tmp_path / "spool")),
    )
    app = build_app(config)
    recorder = Recorder()
    runner = web.AppRunner(app, handler_cancellation=False, access_log=None)
    await runner.setup()  # opens the State (state.open_state)
    app[STATE].sinks.add(recorder)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        host, port = runner.addresses[0][:2]
        body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
        headers = {"x-fake-chunks": "200", "x-fake-gap-ms": "5"}
        async with aiohttp.ClientSession() as http:
            url = f"http://{host}:{port}/v1/chat/completions"
            async with http.post(url, data=body, headers=headers) as resp:
                await resp.content.readuntil(b"\n\n")
        await _until(lambda: len(recorder.exchanges) == 1, timeout=5.0)
    finally:
        await runner.cleanup()
    assert recorder.exchanges[0].error_name == "client_disconnected"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
