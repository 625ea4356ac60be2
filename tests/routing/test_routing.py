"""Routing over several deployments: weighted selection, retries and failover, passive
health with probes, fallbacks, caps and Azure — real HTTP against several fake
upstreams, the official SDK as the client."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import aiohttp
import openai
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import ConfigError
from proxy.config.load import load, resolve
from proxy.config.upstreams import Deployment, Model, Routing, Timeouts
from proxy.http.upstream import Upstream
from proxy.routing.board import Board
from proxy.routing.failover import backoff, retry_after
from proxy.routing.health import DeploymentState
from proxy.routing.routes import pick_weighted
from tests.support.env import UPSTREAM_KEY
from tests.support.inproc import MakeProxy, MakeUpstream
from tests.support.routing import (
    HEAVY,
    MESSAGES,
    ask,
    config,
    dep,
    model,
    posts,
    refused,
    sdk,
    until_holds,
    upstreams,
)


@pytest.fixture
async def a(make_upstream: MakeUpstream) -> FakeUpstream:
    return await make_upstream(name="a")


@pytest.fixture
async def b(make_upstream: MakeUpstream) -> FakeUpstream:
    return await make_upstream(name="b")


# 1. Selection ----------------------------------------------------------------------


async def test_weighted_split_follows_the_weights(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    proxy = await make_proxy(config(model("m", dep(a, "a", weight=3), dep(b, "b", weight=1))))
    async with sdk(proxy) as client:
        # One at a time: idle traffic splits by weight alone. (Concurrent requests also
        # weigh in-flight counts, which on a busy machine moves the split by chance.)
        for _ in range(1000):
            await ask(client)
    assert posts(a) + posts(b) == 1000
    # Binomial(1000, 3/4): these bounds are about four standard deviations out.
    assert 2.3 <= posts(a) / posts(b) <= 3.9, (posts(a), posts(b))


async def test_traffic_shifts_to_the_faster_deployment(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    b.default = {"x-fake-delay-ms": "80"}
    proxy = await make_proxy(config(model("m", dep(a, "fast"), dep(b, "slow"))))
    async with sdk(proxy) as client:

        async def worker() -> None:
            for _ in range(25):
                await ask(client)

        await asyncio.gather(*(worker() for _ in range(8)))
    assert posts(a) + posts(b) == 200
    assert posts(a) > 2 * posts(b), (posts(a), posts(b))
    state = upstreams(proxy)
    assert state["slow"].latency > state["fast"].latency


def state_of(name: str, weight: float = 1.0) -> DeploymentState:
    upstream = Upstream(Deployment(base_url="http://x/v1", name=name, weight=weight))
    return DeploymentState(upstream, "m", Board(1), 0, Routing())


def test_power_of_two_choices_prefers_the_less_loaded() -> None:
    busy, idle = (state_of(n) for n in "xy")
    busy.inflight = 3
    assert all(pick_weighted([busy, idle]) is idle for _ in range(50))
    heavy = state_of("h", weight=4)
    heavy.inflight = 3  # 3/4 per unit of weight beats 1/1
    idle.inflight = 1
    assert all(pick_weighted([heavy, idle]) is heavy for _ in range(50))
    assert pick_weighted([]) is None


# 2. Retries and failover -------------------------------------------------------------

FAILURES: dict[str, dict[str, str]] = {
    "refused": {},
    "timeout-before-headers": {"x-fake-stall": "before"},
    "429-retry-after": {"x-fake-status": "429", "x-fake-retry-after": "1"},
    "500": {"x-fake-status": "500"},
    "502": {"x-fake-status": "502"},
    "503": {"x-fake-status": "503"},
    "504": {"x-fake-status": "504"},
}


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
@pytest.mark.parametrize("kind", list(FAILURES))
async def test_failover_to_another_deployment(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream, kind: str, stream: bool
) -> None:
    a.default = FAILURES[kind]
    bad = dep(
        refused() if kind == "refused" else a,
        "bad",
        weight=HEAVY,
        timeouts=Timeouts(first_byte=0.3),
    )
    proxy = await make_proxy(config(model("m", bad, dep(b, "good"))))
    async with sdk(proxy) as client:
        text = await ask(client, stream=stream)
    assert text.startswith("tok0")
    [ex] = proxy.recorder.exchanges
    assert (ex.attempts, ex.deployment, ex.status, ex.error_name) == (2, "good", 200, "")
    assert posts(b) == 1
    assert posts(a) == (0 if kind == "refused" else 1)
    state = upstreams(proxy)
    # Ill-health counts; a 500 only as a rate, a 429 is backpressure (throttled).
    ill = kind not in ("500", "429-retry-after")
    assert (state["bad"].failures, state["good"].failures) == (int(ill), 0)
    assert state["bad"].is_throttled(time.monotonic()) == (kind == "429-retry-after")
    await until_holds(lambda: state["bad"].inflight == state["good"].inflight == 0)


async def test_retry_on_the_same_deployment_waits_for_retry_after(
    make_proxy: MakeProxy, a: FakeUpstream
) -> None:
    a.default = {"x-fake-status": "503", "x-fake-retry-after": "0.4"}
    proxy = await make_proxy(config(model("m", dep(a, "only"))))
    async with sdk(proxy) as client:
        started = time.monotonic()
        task = asyncio.create_task(ask(client))
        await a.wait_received(1)
        a.default.clear()  # the deployment recovers while the proxy waits
        assert (await task).startswith("tok0")
        elapsed = time.monotonic() - started
    assert elapsed >= 0.4  # the proxy waited out the upstream's Retry-After
    [ex] = proxy.recorder.exchanges
    assert (ex.attempts, ex.status) == (2, 200)


async def test_retry_after_beyond_the_limit_goes_back_to_the_client(
    make_proxy: MakeProxy, a: FakeUpstream
) -> None:
    a.default = {"x-fake-status": "429", "x-fake-retry-after": "30"}
    proxy = await make_proxy(config(model("m", dep(a, "only")), retry_after_max=5))
    async with sdk(proxy) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await ask(client)
    assert caught.value.response.headers["retry-after"] == "30"
    assert posts(a) == 1
    assert proxy.recorder.exchanges[0].attempts == 1


async def test_last_failure_is_what_the_client_gets(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.default = {"x-fake-status": "500"}
    b.default = {"x-fake-status": "502"}
    group = model("m", dep(a, "a"), dep(b, "b"))
    proxy = await make_proxy(config(group, max_attempts=4, failure_threshold=10))
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await ask(client)
    assert posts(a) + posts(b) == 4  # both, then each once more
    assert posts(a) >= 1
    assert posts(b) >= 1
    last = proxy.recorder.exchanges[0]
    assert last.attempts == 4
    assert caught.value.status_code == (500 if last.deployment == "a" else 502)


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_caller_errors_are_not_retried(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream, status: int
) -> None:
    a.default = {"x-fake-status": str(status)}
    proxy = await make_proxy(config(model("m", dep(a, "a", weight=HEAVY), dep(b, "b"))))
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await ask(client)
    assert caught.value.status_code == status
    assert (posts(a), posts(b)) == (1, 0)
    assert proxy.recorder.exchanges[0].attempts == 1
    assert upstreams(proxy)["a"].failures == 0  # the caller's fault, not the deployment's


async def test_no_retry_once_the_stream_has_started(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.default = {"x-fake-cut": "3"}
    proxy = await make_proxy(config(model("m", dep(a, "a", weight=HEAVY), dep(b, "b"))))
    async with sdk(proxy) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        received = 0
        with pytest.raises(openai.APIError):
            async for _ in stream:
                received += 1
    assert received >= 1
    assert (posts(a), posts(b)) == (1, 0)
    await until_holds(lambda: len(proxy.recorder.exchanges) == 1)
    ex = proxy.recorder.exchanges[0]
    assert (ex.attempts, ex.error_name) == (1, "UpstreamError")
    assert upstreams(proxy)["a"].failures == 1  # a broken stream counts against it
    assert upstreams(proxy)["a"].inflight == 0


@pytest.mark.parametrize("how", ["client-cancels", "client-timeout"])
async def test_a_client_that_leaves_counts_against_no_deployment(
    make_proxy: MakeProxy, a: FakeUpstream, how: str
) -> None:
    a.default = {"x-fake-stall": "before"}
    proxy = await make_proxy(config(model("m", dep(a, "a")), failure_threshold=1))
    async with sdk(proxy, timeout=0.3 if how == "client-timeout" else 30) as client:
        task = asyncio.create_task(ask(client))
        await a.wait_received(1)
        if how == "client-cancels":
            task.cancel()
        with pytest.raises((asyncio.CancelledError, openai.APITimeoutError)):
            await task
    await a.wait_disconnect()
    await until_holds(lambda: len(proxy.recorder.exchanges) == 1)
    state = upstreams(proxy)["a"]
    assert (state.failures, state.healthy, state.inflight) == (0, True, 0)
    assert proxy.recorder.exchanges[0].error_name == "client_disconnected"


# 3. Passive health -------------------------------------------------------------------


async def test_cooldown_then_probe_brings_a_deployment_back(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    await a.close()  # a refuses connections until it is started again on its port
    proxy = await make_proxy(
        config(
            model("m", dep(a, "a", weight=HEAVY), dep(b, "b")),
            failure_threshold=2,
            cooldown=0.2,
        )
    )
    state = upstreams(proxy)
    async with sdk(proxy) as client:
        for _ in range(2):
            await ask(client)
        assert [ex.attempts for ex in proxy.recorder.exchanges] == [2, 2]
        assert not state["a"].healthy  # two consecutive failures: out of rotation
        await ask(client)
        assert proxy.recorder.exchanges[-1].attempts == 1  # a is skipped, not tried
        first_cooldown = state["a"].ejected_until
        # The probe finds a still down and starts another cooldown.
        await until_holds(lambda: state["a"].ejected_until > first_cooldown)
        assert not state["a"].healthy
        await a.start()
        await until_holds(lambda: state["a"].healthy)
        assert state["a"].failures == 0
        probes = list(a.received)
        assert probes
        assert all(r.method == "GET" and r.path == "/v1/models" for r in probes)
        assert probes[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
        await ask(client)
    assert proxy.recorder.exchanges[-1].deployment == "a"
    assert posts(a) == 1  # probes never spent a completion


async def test_all_deployments_down_is_a_prompt_502_in_panic(make_proxy: MakeProxy) -> None:
    group = model("m", dep(refused(), "a"), dep(refused(), "b"))
    proxy = await make_proxy(config(group, failure_threshold=1, cooldown=30))
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError) as first:
            await ask(client)
        assert first.value.status_code == 502  # both tried: the last failure
        assert not any(u.healthy for u in upstreams(proxy).values())
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            await ask(client)
        assert time.monotonic() - started < 2.0  # prompt, not a hang
    # None in rotation: panic mode tries them anyway, and the client gets the failure.
    assert caught.value.status_code == 502
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert [ex.attempts for ex in proxy.recorder.exchanges] == [3, 3]


async def test_probe_tasks_end_with_the_app(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(config(model("m", dep(refused(), "a")), failure_threshold=1))
    async with sdk(proxy) as client:
        with pytest.raises(openai.InternalServerError):
            await ask(client)
    tasks = set(proxy.state.router.health.tasks)
    assert sorted(t.get_name() for t in tasks) == ["deployment gauges", "probe a"]
    await proxy.runner.cleanup()
    assert all(t.done() for t in tasks)
    assert not proxy.state.router.health.tasks


# 4. Fallbacks and caps ---------------------------------------------------------------


async def test_fallback_model_takes_over(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.default = {"x-fake-status": "503"}
    models = (
        model("m", dep(a, "primary"), fallbacks=("cheap",)),
        model("cheap", dep(b, "secondary")),
    )
    proxy = await make_proxy(config(*models, failure_threshold=1, cooldown=30))
    async with sdk(proxy) as client:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES)
        assert reply.model == "cheap"  # the fallback's name went upstream
        await ask(client)
    first, second = proxy.recorder.exchanges
    assert (first.model, first.deployment, first.attempts) == ("m", "secondary", 2)
    assert (second.deployment, second.attempts) == ("secondary", 1)  # primary is cooling
    assert posts(a) == 1
    assert b.received[0].json["model"] == "cheap"


async def test_concurrency_cap_is_respected_under_load(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    for fake in (a, b):
        fake.default = {"x-fake-delay-ms": "300"}
    group = model("m", dep(a, "a", max_concurrent=2), dep(b, "b", max_concurrent=2))
    proxy = await make_proxy(config(group))
    async with sdk(proxy) as client:
        results = await asyncio.gather(*(ask(client) for _ in range(12)), return_exceptions=True)
    served = [r for r in results if isinstance(r, str)]
    refused_ = [r for r in results if not isinstance(r, str)]
    assert (a.peak, b.peak) == (2, 2)  # full, never over
    assert len(served) >= 4
    for error in refused_:
        assert isinstance(error, openai.InternalServerError), error
        assert error.status_code == 503
        assert error.response.headers["retry-after"] == "1"
    state = upstreams(proxy)
    assert state["a"].inflight == state["b"].inflight == 0


async def test_outbound_rpm_cap_is_honoured(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    models = (
        model("m", dep(a, "capped", weight=HEAVY, rpm=5), dep(b, "spare")),
        model("solo", dep(b, "solo", rpm=2)),
    )
    proxy = await make_proxy(config(*models, rate_wait=0.05))
    async with sdk(proxy) as client:
        for _ in range(20):
            await ask(client)
        assert (posts(a), posts(b)) == (5, 15)  # the cap, then the other deployment
        for _ in range(2):
            await client.chat.completions.create(model="solo", messages=MESSAGES)
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="solo", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "30"  # one request per 30 s
    assert posts(b) == 17


# 5. Azure OpenAI -----------------------------------------------------------------------


def azure(fake: FakeUpstream, name: str, **fields: object) -> Deployment:
    root = fake.url.removesuffix("/v1")
    return dep(root, name, kind="azure", model="gpt4o-east", api_version="2024-10-21", **fields)


@pytest.mark.parametrize("stream", [False, True], ids=["body", "stream"])
async def test_azure_deployment_serves_an_openai_request(
    make_proxy: MakeProxy, a: FakeUpstream, stream: bool
) -> None:
    proxy = await make_proxy(config(model("m", azure(a, "az"))))
    async with sdk(proxy) as client:
        assert (await ask(client, stream=stream)).startswith("tok0")
    [sent] = a.received
    assert sent.path == "/openai/deployments/gpt4o-east/chat/completions"
    assert sent.query == "api-version=2024-10-21"
    assert sent.headers["api-key"] == UPSTREAM_KEY
    assert "Authorization" not in sent.headers
    assert sent.json["model"] == "gpt4o-east"


async def test_one_request_fails_over_from_openai_to_azure(
    make_proxy: MakeProxy, a: FakeUpstream, b: FakeUpstream
) -> None:
    a.default = {"x-fake-status": "503"}
    proxy = await make_proxy(config(model("m", dep(a, "openai", weight=HEAVY), azure(b, "az"))))
    async with sdk(proxy) as client:
        assert (await ask(client)).startswith("tok0")
    assert proxy.recorder.exchanges[0].deployment == "az"
    assert a.received[0].headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert b.received[0].path.startswith("/openai/deployments/gpt4o-east/")


async def test_azure_probe_uses_the_azure_models_path(
    make_proxy: MakeProxy, a: FakeUpstream
) -> None:
    proxy = await make_proxy(config(model("m", azure(a, "az"))))
    assert await proxy.state.router.health.probe(upstreams(proxy)["az"].upstream)
    [probe] = a.received
    assert (probe.method, probe.path, probe.query) == (
        "GET",
        "/openai/models",
        "api-version=2024-10-21",
    )
    assert probe.headers["api-key"] == UPSTREAM_KEY


# 6. The ops endpoint -------------------------------------------------------------------


async def test_deployments_endpoint_shows_routing_state(
    make_proxy: MakeProxy, a: FakeUpstream
) -> None:
    models = (
        model("m", dep(refused(), "down", weight=HEAVY), dep(a, "up", max_concurrent=8)),
        model("e", azure(a, "az", rpm=600)),
    )
    proxy = await make_proxy(config(*models, failure_threshold=1, cooldown=30))
    async with sdk(proxy) as client, aiohttp.ClientSession() as http:
        stalled = asyncio.create_task(ask(client, extra_headers={"x-fake-stall": "before"}))
        await a.wait_received(1)
        async with http.get(proxy.url + "/deployments") as resp:
            assert resp.status == 200
            text = await resp.text()
            data = await resp.json()
        stalled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stalled
    assert UPSTREAM_KEY not in text
    by_name = {d["name"]: d for m in data["models"] for d in m["deployments"]}
    assert [m["name"] for m in data["models"]] == ["m", "e"]
    down, up, az = by_name["down"], by_name["up"], by_name["az"]
    assert (down["healthy"], down["consecutive_failures"]) == (False, 1)
    assert 25 < down["cooldown_remaining"] <= 30
    assert (up["healthy"], up["inflight"], up["max_concurrent"]) == (True, 1, 8)
    assert (az["kind"], az["rpm"], az["inflight"]) == ("azure", 600, 0)
    assert set(up) == {  # no base_url: only holders of the ops token see those
        "name",
        "kind",
        "weight",
        "inflight",
        "max_concurrent",
        "rpm",
        "healthy",
        "cooldown_remaining",
        "throttled_remaining",
        "latency_ms",
        "consecutive_failures",
    }


# 7. Config and pure helpers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [model("m", Deployment(base_url="https://x", kind="azure", model="d"))],
            "api_version",
        ),
        (
            [model("m", Deployment(base_url="https://x", kind="azure", api_version="v"))],
            "model",
        ),
        ([model("m", Deployment(base_url="https://x"), fallbacks=("m",))], "itself"),
        ([model("m", Deployment(base_url="https://x"), fallbacks=("nope",))], "nope"),
        (
            [
                model("m", Deployment(base_url="https://x"), fallbacks=("*",)),
                model("*", Deployment(base_url="https://x")),
            ],
            re.escape("no model named '*'"),
        ),
    ],
    ids=["azure-no-version", "azure-no-name", "self-fallback", "unknown-fallback", "wildcard"],
)
def test_routing_config_errors_name_the_field(models: list[Model], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve(cfg.Config(models=models))


def test_routing_config_loads_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AZ_KEY", "k")
    path = tmp_path / "proxy.yaml"
    path.write_text(
        """
routing: {max_attempts: 2, cooldown: 1.5, failure_threshold: 4}
models:
  - name: m
    fallbacks: [n]
    deployments:
      - {base_url: "https://res.openai.azure.com", kind: azure, model: dep,
         api_version: "2024-10-21", api_key_env: AZ_KEY, rpm: 60, weight: 2}
  - name: n
    deployments: [{base_url: "http://127.0.0.1:9/v1", health_url: "http://127.0.0.1:9/up"}]
"""
    )
    loaded = load(path)
    assert (loaded.routing.max_attempts, loaded.routing.cooldown) == (2, 1.5)
    assert loaded.models[0].fallbacks == ["n"]
    upstream = Upstream(loaded.models[0].deployments[0])
    assert upstream.url("chat/completions") == (
        "https://res.openai.azure.com/openai/deployments/dep/chat/completions"
        "?api-version=2024-10-21"
    )
    assert upstream.auth == (("api-key", "k"),)
    assert Upstream(loaded.models[1].deployments[0]).health_url == "http://127.0.0.1:9/up"


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"Retry-After": "7"}, 7, 7),
        ({"Retry-After": "0.5"}, 0.5, 0.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25, 0.25),
        ({"Retry-After": "-3"}, 0, 0),
    ],
)
def test_retry_after_is_read_in_every_form(
    headers: Mapping[str, str], low: float, high: float
) -> None:
    wait = retry_after(headers)
    assert wait is not None
    assert low <= wait <= high


def test_retry_after_as_an_http_date() -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    wait = retry_after({"Retry-After": when})
    assert wait is not None
    assert 25 <= wait <= 30


@pytest.mark.parametrize("headers", [{}, {"Retry-After": "soon"}])
def test_retry_after_absent_or_unreadable(headers: Mapping[str, str]) -> None:
    assert retry_after(headers) is None


def test_backoff_is_jittered_and_bounded() -> None:
    policy = Routing(backoff_base=0.1, backoff_max=0.3)
    waits = [backoff(n, policy) for n in (1, 2, 3, 4, 5) for _ in range(200)]
    assert all(0 <= w <= 0.3 for w in waits)
    assert len(set(waits)) > 900  # jittered, not a fixed schedule
    assert max(backoff(1, policy) for _ in range(200)) <= 0.1
