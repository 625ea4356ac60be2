"""Tests for the fake OpenAI-compatible upstream in bench.fake_upstream."""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import trustme

from bench.fake_upstream import FakeUpstream

CHAT = {"model": "m-1", "messages": [{"role": "user", "content": "hello there world"}]}


@pytest.fixture
async def up() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(chunks=4) as server:
        yield server


@pytest.fixture
async def client(up: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=up.url, api_key="x", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def sse_payloads(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The `data:` payloads of an SSE body, in order."""
    body = await resp.read()
    return [
        line.removeprefix(b"data: ") for line in body.split(b"\n") if line.startswith(b"data: ")
    ]


async def collect(stream: AsyncIterator[Any], into: list[Any]) -> None:
    """Append every item of ``stream`` to ``into`` (keeps partial results on error)."""
    async for item in stream:
        into.append(item)


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in client.models.list()]
    assert models == ["fake-model", "fake-embed"]


async def test_chat_non_stream_usage(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="m-1",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there world"}]},
        ],
    )
    assert resp.object == "chat.completion"
    assert resp.model == "m-1"
    assert resp.choices[0].message.content == "tok0 tok1 tok2 tok3"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (5, 4)
    assert resp.usage.total_tokens == 9


async def test_chat_stream_without_usage(
    client: openai.AsyncOpenAI, up: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    stream = await client.chat.completions.create(**CHAT, stream=True)
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None and c.choices for c in chunks)

    async with http.post(f"{up.url}/chat/completions", json={**CHAT, "stream": True}) as resp:
        assert resp.content_type == "text/event-stream"
        payloads = await sse_payloads(resp)
    assert payloads[-1] == b"[DONE]"
    assert len(payloads) == 1 + 4 + 1 + 1
    assert all(b'"usage"' not in p for p in payloads)


async def test_chat_stream_include_usage(
    client: openai.AsyncOpenAI, up: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    stream = await client.chat.completions.create(
        **CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 4)
    assert all(c.usage is None for c in chunks[:-1])
    assert last.id == chunks[0].id

    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(f"{up.url}/chat/completions", json=body) as resp:
        payloads = await sse_payloads(resp)
    assert payloads[-1] == b"[DONE]"
    events = [orjson.loads(p) for p in payloads[:-1]]
    assert all("usage" in e and e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == []
    assert events[-1]["usage"]["total_tokens"] == 7


async def test_completions(client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model="m-2", prompt="one two")
    assert resp.object == "text_completion"
    assert resp.choices[0].text == "tok0 tok1 tok2 tok3"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 2

    stream = await client.completions.create(
        model="m-2", prompt="one two", stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 6


async def test_embeddings(client: openai.AsyncOpenAI) -> None:
    resp = await client.embeddings.create(model="fake-embed", input=["a b", "c"])
    assert [d.index for d in resp.data] == [0, 1]
    assert resp.data[0].embedding == [0.1, 0.2, 0.3, 0.4]
    assert resp.model == "fake-embed"
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == 3

    single = await client.embeddings.create(model="fake-embed", input="just one")
    assert len(single.data) == 1


async def test_responses(client: openai.AsyncOpenAI, up: FakeUpstream) -> None:
    resp = await client.responses.create(model="m-3", input="say something nice")
    assert resp.output_text == "tok0 tok1 tok2 tok3"
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (3, 4)

    stream = await client.responses.create(model="m-3", input="say something", stream=True)
    events = [event async for event in stream]
    kinds = [e.type for e in events]
    assert kinds == [
        "response.created",
        *["response.output_text.delta"] * 4,
        "response.completed",
    ]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "tok0 tok1 tok2 tok3 "
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.usage is not None
    assert completed.response.usage.total_tokens == 6


async def test_responses_stream_has_no_done(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    body = {"model": "m", "input": "x", "stream": True}
    async with http.post(f"{up.url}/responses", json=body) as resp:
        text = await resp.text()
    assert text.startswith("event: response.created\ndata: {")
    assert "[DONE]" not in text


async def test_rate_limit_with_retry_after(client: openai.AsyncOpenAI, up: FakeUpstream) -> None:
    up.default["x-fake-status"] = "429"
    up.default["x-fake-retry-after"] = "7"
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(**CHAT)
    assert info.value.response.headers["retry-after"] == "7"
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.type == "requests"


async def test_server_error_per_request_header(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(**CHAT, extra_headers={"x-fake-status": "502"})
    assert info.value.status_code == 502
    assert info.value.type == "server_error"


async def test_not_found(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{up.url}/nope", headers={"x-request-id": "r-404"}) as resp:
        assert resp.status == 404
        assert resp.headers["x-request-id"] == "r-404"
        error = (await resp.json())["error"]
    assert error["code"] == "not_found"
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None


async def test_cut_mid_stream_fails_the_read(
    client: openai.AsyncOpenAI, up: FakeUpstream, http: aiohttp.ClientSession
) -> None:
    headers = {"x-fake-cut": "2"}
    async with http.post(
        f"{up.url}/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()

    stream = await client.chat.completions.create(**CHAT, stream=True, extra_headers=headers)
    seen: list[Any] = []
    with pytest.raises(openai.APIConnectionError):
        await collect(stream, seen)
    assert len(seen) == 2
    assert up.disconnects == []


async def test_cut_before_headers(client: openai.AsyncOpenAI, http: aiohttp.ClientSession) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(**CHAT, extra_headers={"x-fake-cut": "headers"})


async def test_disconnect_is_recorded(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    request = http.post(f"{up.url}/chat/completions", json=CHAT, headers={"x-fake-stall": "before"})
    task = asyncio.create_task(request.__aenter__())
    await up.wait_received()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await up.wait_disconnect(1)
    assert up.disconnects[0].path == "/v1/chat/completions"
    assert up.disconnects[0].chunks_sent == 0


async def test_stall_mid_stream_records_chunks_sent(
    client: openai.AsyncOpenAI, up: FakeUpstream
) -> None:
    stream = await client.chat.completions.create(
        **CHAT, stream=True, extra_headers={"x-fake-stall": "3"}
    )
    async with stream:
        got = [await anext(aiter(stream)) for _ in range(3)]
    assert len(got) == 3
    await up.wait_disconnect()
    assert up.disconnects[0].chunks_sent == 3


async def test_wait_disconnect_times_out(up: FakeUpstream) -> None:
    with pytest.raises(TimeoutError):
        await up.wait_disconnect(timeout=0.01)


async def test_received_records_request(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    headers = {"x-request-id": "rid-123", "X-Custom": "yes"}
    async with http.post(f"{up.url}/chat/completions?debug=1", json=CHAT, headers=headers) as resp:
        assert resp.headers["x-request-id"] == "rid-123"
        await resp.read()
    async with http.post(f"{up.url}/chat/completions", json=CHAT) as resp:
        assert resp.headers["x-request-id"]
    first = up.received[0]
    assert (first.method, first.path, first.query) == ("POST", "/v1/chat/completions", "debug=1")
    assert first.headers["x-custom"] == "yes"
    assert first.json == CHAT
    assert orjson.loads(first.body) == CHAT
    assert first.peer[0] == "127.0.0.1"
    assert first.at <= up.received[1].at

    up.reset()
    assert up.received == []
    assert up.default == {}


async def test_peers_counts_connections(up: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(f"{up.url}/chat/completions", json=CHAT) as resp:
                await resp.read()
    assert len(up.peers()) == 1

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(2):
            async with session.post(f"{up.url}/chat/completions", json=CHAT) as resp:
                await resp.read()
    assert len(up.peers()) == 3


async def test_per_request_chunks_and_gap(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    headers = {"x-fake-chunks": "2", "x-fake-gap-ms": "20"}
    start = time.monotonic()
    async with http.post(
        f"{up.url}/chat/completions", json={**CHAT, "stream": True}, headers=headers
    ) as resp:
        payloads = await sse_payloads(resp)
    # role + 2 content + stop + [DONE] = 5 events, 4 gaps between them
    assert len(payloads) == 5
    assert time.monotonic() - start >= 0.08


async def test_delay(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    start = time.monotonic()
    headers = {"x-fake-delay-ms": "50"}
    async with http.post(f"{up.url}/embeddings", json={"input": "x"}, headers=headers) as resp:
        assert resp.status == 200
    assert time.monotonic() - start >= 0.05


async def test_malformed(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    headers = {"x-fake-malformed": "json"}
    async with http.post(f"{up.url}/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        assert await resp.read() == b'{"choices": ['

    headers = {"x-fake-malformed": "sse"}
    body = {**CHAT, "stream": True}
    async with http.post(f"{up.url}/chat/completions", json=body, headers=headers) as resp:
        payloads = await sse_payloads(resp)
    assert orjson.loads(payloads[0])["object"] == "chat.completion.chunk"
    assert payloads[1:] == [b"{not json", b"[DONE]"]


async def test_echo(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    headers = {"x-fake-echo": "1", "x-trace": "abc"}
    async with http.post(f"{up.url}/chat/completions", json=CHAT, headers=headers) as resp:
        echo = (await resp.json())["echo"]
    assert echo["body"] == CHAT
    assert echo["headers"]["x-trace"] == "abc"


async def test_bad_behaviour_value(up: FakeUpstream, http: aiohttp.ClientSession) -> None:
    headers = {"x-fake-chunks": "many"}
    async with http.post(f"{up.url}/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_tls(tmp_path: Any) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with (
        FakeUpstream(ssl_context=server_ctx) as up,
        aiohttp.ClientSession() as session,
        session.get(f"{up.url}/models", ssl=client_ctx) as resp,
    ):
        assert up.url.startswith("https://127.0.0.1:")
        assert resp.status == 200


async def test_close_is_idempotent() -> None:
    up = FakeUpstream()
    await up.start()
    assert up.port != 0
    await up.close()
    await up.close()


async def test_cli_serves_until_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fake_upstream",
        "--port",
        "0",
        "--chunks",
        "2",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert line.startswith("fake upstream listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{url}/chat/completions", json=CHAT) as resp,
        ):
            body = await resp.json()
        assert body["choices"][0]["message"]["content"] == "tok0 tok1"
    finally:
        proc.terminate()
        await proc.communicate()
    assert proc.returncode == 0
