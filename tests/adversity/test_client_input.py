"""What a client sends never becomes a 5xx or an echo (issue #15): hostile HTTP over
raw sockets, request bodies in every Content-Encoding (and a zip bomb), the Server
header, CORS, the ops endpoints on the API listener, forwarding headers and query
strings. Every refusal must be an OpenAI-shaped JSON error with the fitting status,
sent before anything goes upstream, quoting nothing the client sent."""

from __future__ import annotations

import gzip
import time
import zlib

import aiohttp
import brotli
import msgspec
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import ConfigError
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Deployment, Model
from tests.support.env import UPSTREAM_KEY, free_port
from tests.support.figures import count
from tests.support.inproc import MakeProxy, Proxy, with_server
from tests.support.keys import declare, keyed
from tests.support.rawhttp import CHAT, Reply, post, roundtrip

MARK = "Zq9-MARK-7Xw"  # planted in every hostile input: no answer may quote it
BODY_TIMEOUT = 10.0


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    config = quick_start(upstream.url, UPSTREAM_KEY)
    return await make_proxy(
        with_server(config, body_timeout=BODY_TIMEOUT, max_body_bytes=1024 * 1024)
    )


def port_of(proxy: Proxy) -> int:
    return int(proxy.url.rsplit(":", 1)[1])


def refused(reply: Reply, status: int) -> dict[str, object]:
    """The reply is the OpenAI-shaped refusal with ``status``; returns its error."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json")
    error = orjson.loads(reply.body)["error"]
    assert isinstance(error["message"], str)
    assert error["type"] == "invalid_request_error"
    assert MARK not in reply.body.decode("latin-1")
    assert MARK not in reply.raw_head.decode("latin-1")
    assert reply.headers["server"] == "morngpt"
    return error


def head(*lines: str) -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


CHAT_HEAD = ("POST /v1/chat/completions HTTP/1.1", "Host: p", "Content-Type: application/json")
HOSTILE = {
    # aiohttp's parser refusals (they used to be text/plain 400s quoting the line)
    "content-length-and-chunked": (
        head(*CHAT_HEAD, f"X-M: {MARK}", "Content-Length: 5", "Transfer-Encoding: chunked")
        + b"0\r\n\r\n",
        400,
    ),
    "two-content-lengths": (
        head(*CHAT_HEAD, f"Content-Length: {len(CHAT)}", f"Content-Length: 1{MARK[:0]}9") + CHAT,
        400,
    ),
    "obs-fold": (
        head(*CHAT_HEAD, f"X-A: b\r\n {MARK}", f"Content-Length: {len(CHAT)}") + CHAT,
        400,
    ),
    "bad-header-token": (
        head(*CHAT_HEAD, f"X({MARK}: 1", f"Content-Length: {len(CHAT)}") + CHAT,
        400,
    ),
    "bad-method": (head(f"G(T /{MARK} HTTP/1.1", "Host: p"), 400),
    "200-headers": (
        head(*CHAT_HEAD, *(f"X-{i}: {MARK}" for i in range(200)), f"Content-Length: {len(CHAT)}")
        + CHAT,
        431,
    ),
    "100-kb-url": (head(f"GET /v1/models?{MARK}{'a' * 100_000} HTTP/1.1", "Host: p"), 414),
    "40-kb-header": (
        head(*CHAT_HEAD, f"X-Big: {MARK}{'a' * 40_000}", "Content-Length: 2") + b"{}",
        431,
    ),
    "transfer-encoding-gzip": (head(*CHAT_HEAD, "Transfer-Encoding: gzip") + CHAT, 501),
    # the proxy's own checks
    "connect": (head(f"CONNECT {MARK}.example:443 HTTP/1.1", f"Host: {MARK}.example:443"), 501),
    "trace": (head(f"TRACE /{MARK} HTTP/1.1", "Host: p"), 501),
    "unknown-path": (head(f"GET /{MARK} HTTP/1.1", "Host: p"), 404),
    "no-length": (head(*CHAT_HEAD), 411),
    "unknown-content-encoding": (
        head(*CHAT_HEAD, f"Content-Encoding: compress-{MARK}", f"Content-Length: {len(CHAT)}")
        + CHAT,
        415,
    ),
    "gzip-that-is-not": (
        head(*CHAT_HEAD, "Content-Encoding: gzip", "Content-Length: 20") + MARK.encode() + b"x" * 8,
        400,
    ),
    "deflate-that-is-not": (
        head(*CHAT_HEAD, "Content-Encoding: deflate", "Content-Length: 20")
        + b"\x78\x9c"
        + MARK.encode()
        + b"x" * 6,
        400,
    ),
    "br-that-is-not": (
        head(*CHAT_HEAD, "Content-Encoding: br", "Content-Length: 20")
        + MARK.encode()
        + b"\xff" * 8,
        400,
    ),
    "invalid-utf8-key-streaming": (
        post(
            "/v1/chat/completions", b'{"model":"m1","stream":true,"\xff' + MARK.encode() + b'":1}'
        ),
        400,
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE))
async def test_hostile_http_gets_a_json_refusal_that_quotes_nothing(
    proxy: Proxy, upstream: FakeUpstream, case: str
) -> None:
    data, status = HOSTILE[case]
    refused(await roundtrip(port_of(proxy), data), status)
    assert upstream.received == []
    # The proxy is fine afterwards.
    assert (await roundtrip(port_of(proxy), post("/v1/chat/completions", CHAT))).status == 200
    count(inputs=1, served=1)


async def test_a_declared_length_over_the_limit_is_a_413_at_once(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    """No body follows the headers: the answer must not wait for it (the body timeout)."""
    started = time.monotonic()
    reply = await roundtrip(port_of(proxy), head(*CHAT_HEAD, "Content-Length: 99999999"))
    refused(reply, 413)
    assert time.monotonic() - started < BODY_TIMEOUT / 2
    assert upstream.received == []


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data)


def _deflate(data: bytes) -> bytes:
    return zlib.compress(data)


CODINGS = {"gzip": _gzip, "deflate": _deflate, "br": brotli.compress}


@pytest.mark.parametrize("coding", list(CODINGS))
async def test_compressed_bodies_go_upstream_decoded(
    proxy: Proxy, upstream: FakeUpstream, coding: str
) -> None:
    body = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "é" * 500}]})
    data = post("/v1/chat/completions", CODINGS[coding](body), f"Content-Encoding: {coding}")
    reply = await roundtrip(port_of(proxy), data)
    assert reply.status == 200, reply.body
    [received] = upstream.received
    assert received.body == body
    assert "Content-Encoding" not in received.headers
    count(inputs=1, served=1)


@pytest.mark.parametrize("coding", ["gzip", "br"])
async def test_a_zip_bomb_is_a_413(proxy: Proxy, upstream: FakeUpstream, coding: str) -> None:
    """64 MB of JSON in well under 1 MB compressed, against max_body_bytes of 1 MB."""
    bomb = b'{"model":"m1","pad":"' + b"0" * (64 * 1024 * 1024) + b'"}'
    packed = CODINGS[coding](bomb)
    assert len(packed) < 1024 * 1024
    started = time.monotonic()
    reply = await roundtrip(
        port_of(proxy), post("/v1/chat/completions", packed, f"Content-Encoding: {coding}")
    )
    refused(reply, 413)
    assert time.monotonic() - started < BODY_TIMEOUT / 2  # stopped early, not unpacked
    assert upstream.received == []
    count(inputs=1)


async def test_server_header_names_no_version(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/healthz"), ("GET", "/x")):
            async with http.request(method, proxy.url + path, data=CHAT) as resp:
                assert resp.headers["Server"] == "morngpt"


# CORS ---------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


async def test_cors_is_off_by_default(proxy: Proxy) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.options(proxy.base + "/chat/completions", headers=PREFLIGHT) as resp:
            assert resp.status == 404
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with http.post(
            proxy.base + "/chat/completions", data=CHAT, headers={"Origin": ORIGIN}
        ) as resp:
            assert resp.status == 200
            assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_when_configured(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    cors = cfg.Cors(allow_origins=[ORIGIN])
    proxy = await make_proxy(with_server(quick_start(upstream.url, UPSTREAM_KEY), cors=cors))
    async with aiohttp.ClientSession() as http:
        async with http.options(proxy.base + "/chat/completions", headers=PREFLIGHT) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "POST" in resp.headers["Access-Control-Allow-Methods"]
            assert (
                resp.headers["Access-Control-Allow-Headers"]
                == PREFLIGHT["Access-Control-Request-Headers"]
            )
            assert resp.headers["Access-Control-Max-Age"] == "600"
        other = {**PREFLIGHT, "Origin": "https://evil.example"}
        async with http.options(proxy.base + "/chat/completions", headers=other) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        put = {**PREFLIGHT, "Access-Control-Request-Method": "DELETE"}
        async with http.options(proxy.base + "/chat/completions", headers=put) as resp:
            assert resp.status == 403
        async with http.post(
            proxy.base + "/chat/completions", data=CHAT, headers={"Origin": ORIGIN}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
            assert "X-Request-Id" in resp.headers["Access-Control-Expose-Headers"]
            assert "Origin" in resp.headers.getall("Vary")
    assert len(upstream.received) == 1  # preflights never go upstream


# Ops endpoints on the API listener ------------------------------------------------------


async def test_with_auth_on_the_api_port_shows_no_ops_endpoint_without_the_ops_token(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    value, key = declare()
    proxy = await make_proxy(keyed(upstream.url, key), auth=True)
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": f"Bearer {value}"}):
            for page in ("/metrics", "/deployments"):
                async with http.get(proxy.url + page, headers=headers) as resp:
                    assert resp.status == 404, page
                    assert upstream.url not in await resp.text()
        for probe in ("/healthz", "/readyz"):
            async with http.get(proxy.url + probe) as resp:
                assert resp.status == 200


async def test_deployments_show_base_urls_only_to_the_ops_token(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MORNGPT_TEST_OPS_15", "ops-token-for-issue-15")
    _, key = declare()
    ops_port = free_port()
    config = with_server(keyed(upstream.url, key), ops_token_env="MORNGPT_TEST_OPS_15")
    guarded = await make_proxy(resolve(config), auth=True)
    apart = await make_proxy(
        with_server(quick_start(upstream.url, UPSTREAM_KEY), ops_port=ops_port)
    )
    async with aiohttp.ClientSession() as http:
        async with http.get(guarded.url + "/deployments") as resp:
            assert resp.status == 401
        ops = {"Authorization": "Bearer ops-token-for-issue-15"}
        async with http.get(guarded.url + "/deployments", headers=ops) as resp:
            assert resp.status == 200
            assert upstream.url in await resp.text()
        async with http.get(f"http://127.0.0.1:{ops_port}/deployments") as resp:
            assert resp.status == 200  # no token configured: open, but without URLs
            text = await resp.text()
            assert upstream.url not in text
            assert "base_url" not in text
    del apart


# Forwarding headers and query strings -----------------------------------------------------

SPOOFED = (
    "X-Forwarded-For: 6.6.6.6",
    "Forwarded: for=6.6.6.6;proto=https",
    "X-Real-IP: 6.6.6.6",
    "Via: 1.1 evil",
)


async def test_forwarding_headers_from_an_untrusted_client_are_replaced(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    reply = await roundtrip(port_of(proxy), post("/v1/chat/completions", CHAT, *SPOOFED))
    assert reply.status == 200
    [received] = upstream.received
    assert received.headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert received.headers.getall("Via") == ["1.1 morngpt"]
    assert "Forwarded" not in received.headers
    assert "X-Real-IP" not in received.headers


async def test_forwarding_headers_from_a_trusted_proxy_are_extended(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    config = with_server(quick_start(upstream.url, UPSTREAM_KEY), trusted_proxies=["127.0.0.0/8"])
    proxy = await make_proxy(resolve(config))
    reply = await roundtrip(port_of(proxy), post("/v1/chat/completions", CHAT, *SPOOFED))
    assert reply.status == 200
    [received] = upstream.received
    assert received.headers.getall("X-Forwarded-For") == ["6.6.6.6, 127.0.0.1"]
    assert received.headers.getall("Via") == ["1.1 evil, 1.1 morngpt"]
    assert received.headers["Forwarded"] == "for=6.6.6.6;proto=https"


def test_trusted_proxies_must_be_addresses() -> None:
    config = with_server(quick_start("http://u/v1", UPSTREAM_KEY), trusted_proxies=["nope"])
    with pytest.raises(ConfigError, match=r"trusted_proxies\[0\]"):
        resolve(config)


async def test_query_strings_go_upstream(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    azure = Deployment(
        base_url=upstream.url.removesuffix("/v1"),
        kind="azure",
        model="dep",
        api_version="2024-10-21",
    )
    models = [Model(name="m1", deployments=[Deployment(base_url=upstream.url)]),
              Model(name="az", deployments=[azure])]  # fmt: skip
    config = msgspec.structs.replace(quick_start(upstream.url, UPSTREAM_KEY), models=models)
    proxy = await make_proxy(resolve(config))
    async with aiohttp.ClientSession() as http:
        for model in ("m1", "az"):
            body = orjson.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
            async with http.post(
                proxy.base + "/chat/completions?user=a%20b&x=1", data=body
            ) as resp:
                assert resp.status == 200, await resp.text()
    plain, az = upstream.received
    assert plain.query == "user=a b&x=1"  # (aiohttp decodes what it shows)
    assert az.query == "user=a b&x=1&api-version=2024-10-21"
