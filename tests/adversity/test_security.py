"""No one let in, nothing leaked: keys (issued, master, upstream, ops token) never
appear in logs, error bodies, metrics, ops pages or upstream requests; the client's
credentials never go upstream; keys are compared as digests in constant time; no
client input changes which host the proxy connects to; the ops endpoints stay shut
without their token, whatever the path looks like.

(The whole test run is also scanned for keys in every log line: tests/conftest.py.
Oversized headers and bodies: tests/test_proxy.py.)"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Iterator
from typing import NamedTuple

import aiohttp
import msgspec
import openai
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Routing
from proxy.governance.keys.store import KeyStore
from tests.support.env import REDIS_URL, UPSTREAM_KEY
from tests.support.figures import count
from tests.support.inproc import MakeProxy, MakeUpstream, Proxy, with_server
from tests.support.keys import declare, issue, keyed
from tests.support.leaks import SECRETS
from tests.support.rawhttp import CHAT, STREAM, post, roundtrip

MESSAGES = [{"role": "user", "content": "a b c"}]
MASTER = "master-" + os.urandom(24).hex()
OPS_TOKEN = "ops-" + os.urandom(16).hex()
SECRETS.update((MASTER, OPS_TOKEN))


class Everything(logging.Handler):
    """Every log record of the test, formatted with its exception text."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(("openai", "httpx", "httpcore")):  # the clients
            self.lines.append(self.format(record))


@pytest.fixture
def logs() -> Iterator[Everything]:
    handler = Everything()
    root = logging.getLogger()
    levels = {name: logging.getLogger(name).level for name in ("proxy", "aiohttp")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.DEBUG)
    root.addHandler(handler)
    logging.getLogger("proxy.access").addHandler(handler)  # it does not propagate
    yield handler
    logging.getLogger("proxy.access").removeHandler(handler)
    root.removeHandler(handler)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


class Guarded(NamedTuple):
    proxy: Proxy
    key: str  # a declared key that may use model m1 only


@pytest.fixture
async def guarded(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> Guarded:
    """A proxy with every kind of secret: a declared key, a master key, an upstream
    key, an ops token."""
    monkeypatch.setenv("MORNGPT_TEST_MASTER", MASTER)
    monkeypatch.setenv("MORNGPT_TEST_OPS", OPS_TOKEN)
    value, key = declare(models=["m1"])
    config = keyed(upstream.url, key, auth=cfg.Auth(master_key_env="MORNGPT_TEST_MASTER"))
    config = with_server(config, ops_token_env="MORNGPT_TEST_OPS")
    # One attempt each: the upstream errors asked for here must not eject the upstream.
    config = resolve(msgspec.structs.replace(config, routing=Routing(max_attempts=1)))
    return Guarded(await make_proxy(config, auth=True), value)


def keys_in(text: str) -> list[str]:
    return [secret[:12] + "…" for secret in SECRETS if secret in text]


async def exercise(proxy: Proxy, key: str) -> list[str]:
    """Requests of every outcome, carrying keys in every place a client puts them;
    returns every byte the clients got back, as text."""
    seen: list[str] = []
    client = openai.AsyncOpenAI(base_url=proxy.base, api_key=key, max_retries=0)
    master = openai.AsyncOpenAI(base_url=proxy.base, api_key=MASTER, max_retries=0)
    async with client, master:
        await client.chat.completions.create(model="m1", messages=MESSAGES)
        async for _ in await master.chat.completions.create(
            model="m2", messages=MESSAGES, stream=True
        ):
            pass
        failures = [
            client.chat.completions.create(model="m2", messages=MESSAGES),  # 403
            client.chat.completions.create(  # upstream error passed through
                model="m1", messages=MESSAGES, extra_headers={"x-fake-status": "500"}
            ),
            client.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"api-key": key}
            ),
        ]
        for failure in failures:
            try:
                await failure
            except openai.APIStatusError as exc:
                seen.append(exc.response.text + str(exc.response.headers))
        stream = await client.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, extra_headers={"x-fake-cut": "2"}
        )
        try:
            async for _ in stream:
                pass
        except openai.APIError as exc:
            seen.append(str(exc.body))
    port = int(proxy.url.rsplit(":", 1)[1])
    raw = [
        post("/v1/chat/completions", CHAT, f"Authorization: Bearer {key}x"),  # wrong key
        post("/v1/chat/completions", b"{not json", f"Authorization: Bearer {key}"),
        post("/v1/nope/../x", CHAT, f"api-key: {key}"),
        post("/v1/chat/completions", STREAM, f"Authorization: Bearer {MASTER}"),
        # Malformed HTTP: aiohttp's error would quote the line (and the key) in the log.
        post("/v1/chat/completions", CHAT, f"Authorization: Bearer {key}\x01"),
        post("/v1/chat/completions", CHAT, f"Authorization : Bearer {MASTER}"),
        post("/v1/chat/completions", CHAT, f"X-Long: {key}{'x' * 40_000}"),
    ]
    for data in raw:
        reply = await roundtrip(port, data)
        # A malformed request's plain-text 400 quotes the line back to the client that
        # sent it; that is no leak (it is that client's own key).
        if not reply.headers.get("content-type", "").startswith("text/plain"):
            seen.append(reply.raw_head.decode("latin-1") + reply.body.decode("latin-1"))
    return seen


async def test_no_key_appears_anywhere_but_where_it_belongs(
    guarded: Guarded, upstream: FakeUpstream, logs: Everything
) -> None:
    proxy, key = guarded
    answers = await exercise(proxy, key)
    ops = {"Authorization": f"Bearer {OPS_TOKEN}"}
    async with aiohttp.ClientSession(headers=ops) as http:
        for page in ("/metrics", "/deployments"):
            async with http.get(proxy.url + page) as resp:
                assert resp.status == 200
                answers.append(await resp.text())
    await proxy.runner.cleanup()  # the ledger and the access log are flushed
    found = {
        "responses": keys_in("\n".join(answers)),
        "logs": keys_in("\n".join(logs.lines)),
    }
    # Upstream requests carry the deployment's key and nothing else of ours.
    for received in upstream.received:
        headers = received.headers
        assert headers.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
        assert "api-key" not in headers
        sent = str(dict(headers)) + received.body.decode() + received.path + received.query
        found[f"upstream {received.path}"] = keys_in(sent.replace(UPSTREAM_KEY, ""))
    assert len(upstream.received) >= 5
    assert any("malformed HTTP request" in line for line in logs.lines)
    leaked = [where for where, keys in found.items() if keys]
    count(leaked=len(leaked), inputs=len(answers))
    assert leaked == [], found


# Keys are compared as digests, in constant time ------------------------------------------


async def test_keys_are_compared_as_digests_in_constant_time(
    guarded: Guarded, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = guarded.proxy
    compared: list[tuple[object, object]] = []
    looked_up: list[str] = []
    real_compare, real_find = hmac.compare_digest, KeyStore.find

    def compare(a: object, b: object) -> bool:
        compared.append((a, b))
        return real_compare(a, b)  # type: ignore[arg-type]

    async def find(self: KeyStore, digest: str) -> object:
        looked_up.append(digest)
        return await real_find(self, digest)

    monkeypatch.setattr(hmac, "compare_digest", compare)
    monkeypatch.setattr(KeyStore, "find", find)
    issued, _ = await issue(proxy)
    async with aiohttp.ClientSession() as http:
        for key in (MASTER, issued, issued[:-1] + "x", "sk-nothing"):
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post(proxy.base + "/chat/completions", data=CHAT, headers=headers):
                pass
        async with http.get(proxy.url + "/metrics", headers={"Authorization": "Bearer no"}):
            pass
    # The master key and the ops token: hmac.compare_digest, never ==.
    assert any(len(str(a)) == 64 for a, _ in compared), compared  # the master's digest
    assert any(f"Bearer {OPS_TOKEN}".encode() in (a, b) for a, b in compared)
    # The key store is only ever asked for digests: a key never reaches a comparison.
    assert looked_up
    assert all(len(d) == 64 and int(d, 16) >= 0 for d in looked_up), looked_up
    for key in (MASTER, issued):
        assert all(key not in str(pair) for pair in compared)


# No client input picks the host --------------------------------------------------------


@pytest.fixture
async def canary(make_upstream: MakeUpstream) -> FakeUpstream:
    return await make_upstream(name="canary")


async def test_no_client_input_changes_the_upstream_host(
    make_proxy: MakeProxy, upstream: FakeUpstream, canary: FakeUpstream
) -> None:
    proxy = await make_proxy(quick_start(upstream.url, UPSTREAM_KEY))
    there = f"127.0.0.1:{canary.port}"
    headers = [
        f"X-Forwarded-Host: {there}",
        f"Forwarded: host={there};proto=http",
        f"X-Original-URL: http://{there}/v1/chat/completions",
        f"X-Rewrite-URL: http://{there}/v1/chat/completions",
        f"X-Forwarded-For: {there}",
        f"X-Host: {there}",
    ]
    bodies = [
        {"model": f"http://{there}/v1", "messages": MESSAGES},
        {"model": f"@{there}", "messages": MESSAGES},
        {"model": f"../../{there}", "messages": MESSAGES},
        {"model": "m1", "base_url": f"http://{there}/v1", "api_base": f"http://{there}"},
        {"model": "m1", "url": f"http://{there}/v1", "azure_endpoint": f"http://{there}"},
    ]
    port = int(proxy.url.rsplit(":", 1)[1])
    requests = [post("/v1/chat/completions", CHAT, header) for header in headers]
    requests += [post("/v1/chat/completions", orjson.dumps(body)) for body in bodies]
    requests.append(  # absolute-form target naming the canary, and a Host naming it
        post("/v1/chat/completions", CHAT).replace(
            b"POST /v1/", f"POST http://{there}/v1/".encode()
        )
    )
    requests.append(
        post("/v1/chat/completions", CHAT).replace(b"Host: proxy", f"Host: {there}".encode())
    )
    requests += [
        post(path, CHAT)
        for path in (
            f"/v1/chat/completions/..%2f..%2f..%2f{there}",
            "/v1/x/%2e%2e/%2e%2e/admin",
            f"/v1/@{there}/chat/completions",
        )
    ]
    for data in requests:
        reply = await roundtrip(port, data)
        assert reply.status < 500
    assert canary.received == []
    expected = f"127.0.0.1:{upstream.port}"
    assert {r.headers["Host"] for r in upstream.received} == {expected}
    assert all(r.path.startswith("/v1/") and "/." not in r.path for r in upstream.received)
    assert len(upstream.received) >= len(headers) + len(bodies)
    count(inputs=len(requests))


# The ops endpoints stay shut -----------------------------------------------------------


async def test_ops_endpoints_need_their_token_whatever_the_path(guarded: Guarded) -> None:
    tricks = [
        "/metrics",
        "/metrics/",
        "//metrics",
        "/metrics?format=json",
        "/METRICS",
        "/metrics%2f",
        "/./metrics",
        "/v1/../metrics",
        "/deployments",
        "/deployments/",
        "/%64eployments",
    ]
    async with aiohttp.ClientSession() as http:
        for path in tricks:
            for auth in ({}, {"Authorization": "Bearer nope"}, {"X-Ops-Token": OPS_TOKEN}):
                url = guarded.proxy.url + path
                async with http.get(url, headers=auth, allow_redirects=False) as resp:
                    body = await resp.text()
                    assert resp.status in (401, 404), (path, resp.status)
                    assert "morngpt_" not in body
                    assert '"models"' not in body
    count(inputs=len(tricks) * 3)


# A client's numbers cannot break its key's limits ---------------------------------------


async def test_an_absurd_max_tokens_cannot_break_the_token_bucket(
    redis_prefix: str, make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    """``max_tokens: 10**40`` used to go to the Lua bucket as is: its doubles lose every
    digit of the bucket's real level next to 6·10**44 units (the Python twin does not),
    and the rate-limit headers promised a reset in 10**33 hours."""
    value, key = declare(tpm=100_000)
    config = keyed(upstream.url, key, redis=REDIS_URL, prefix=redis_prefix, redis_timeout=2.0)
    proxy = await make_proxy(config, auth=True)
    headers = {"Authorization": f"Bearer {value}"}
    huge = msgspec.json.encode({"model": "m1", "messages": MESSAGES, "max_tokens": 10**40})
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(proxy.base + "/chat/completions", data=huge) as resp:
            assert resp.status == 200  # a full bucket admits it (into debt), as any big ask
            reset = resp.headers["x-ratelimit-reset-tokens"]
        async with http.post(proxy.base + "/chat/completions", data=CHAT) as resp:
            assert resp.status == 200
            remaining = int(resp.headers["x-ratelimit-remaining-tokens"])
    hours = int(reset.partition("h")[0]) if "h" in reset else 0
    assert hours < 1_000, reset  # (2**31 tokens at 100 000 a minute: 358 h)
    # The refund made the bucket whole: both requests used a few dozen tokens, and the
    # second one holds its reservation (~1 000).
    assert remaining > 98_000, remaining
    count(inputs=2)
