"""Issue #14: one bad answer never becomes an outage. A lone deployment keeps serving
after its errors, panic mode routes across deployments that look ill, and the
deployment gauges move with what really happens — real HTTP over loopback, the
official SDK as the client (with its default retries where the case is about them)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import WILDCARD
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Deployment, Model
from proxy.routing.board import EJECTED, Board
from proxy.routing.health import Window
from tests.support import served as processes
from tests.support.env import ROOT, UPSTREAM_KEY, free_port
from tests.support.inproc import MakeProxy, MakeUpstream, Proxy
from tests.support.routing import (
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
from tests.support.wait import until

ALERTS = ROOT / "deploy" / "prometheus"
# What the upstream answers the one failing request, by kind.
ANSWERS = {
    "500": {"x-fake-status": "500"},
    "503": {"x-fake-status": "503"},
    "429": {"x-fake-status": "429", "x-fake-retry-after": "2"},
}


@pytest.fixture
async def fake(make_upstream: MakeUpstream) -> FakeUpstream:
    return await make_upstream(name="fake")


@pytest.mark.parametrize("kind", list(ANSWERS))
async def test_a_lone_deployment_keeps_serving_after_one_bad_request(
    make_proxy: MakeProxy, fake: FakeUpstream, kind: str
) -> None:
    # The quick start (`serve --upstream URL`) with its default routing policy.
    proxy = await make_proxy(quick_start(fake.url, UPSTREAM_KEY))
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="client") as client:  # 2 retries
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="gpt-x", messages=MESSAGES, extra_headers=ANSWERS[kind]
            )
        assert caught.value.status_code == int(kind)
        assert proxy.state.router.wildcard is not None
        [state] = proxy.state.router.wildcard.upstreams
        # Only 503s are ill-health: three in a row take the lone deployment out...
        assert state.healthy == (kind != "503")
        for _ in range(10):
            reply = await client.chat.completions.create(model="gpt-x", messages=MESSAGES)
            assert reply.choices[0].message.content
    assert posts(fake) <= 3 + 10  # the bad request cost no more than the SDK alone would
    assert [ex.status for ex in proxy.recorder.exchanges[-10:]] == [200] * 10
    assert state.healthy  # ...and panic mode served it, which brought it back


async def test_a_429_from_a_lone_deployment_goes_back_at_once(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    fake.default = {"x-fake-status": "429", "x-fake-retry-after": "7"}
    proxy = await make_proxy(config(model("m", dep(fake, "only"))))
    async with sdk(proxy) as client:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as caught:
            await ask(client)
        assert time.monotonic() - started < 2  # not waited out by the proxy
    assert caught.value.response.headers["retry-after"] == "7"
    assert "x-should-retry" not in caught.value.response.headers  # the SDK may retry
    assert posts(fake) == 1
    state = upstreams(proxy)["only"]
    assert state.healthy
    assert state.failures == 0
    assert state.is_throttled(time.monotonic())


async def test_a_429_sends_the_request_to_another_deployment_never_the_same(
    make_proxy: MakeProxy, fake: FakeUpstream, make_upstream: MakeUpstream
) -> None:
    other = await make_upstream(name="other")
    fake.default = {"x-fake-status": "429", "x-fake-retry-after": "0.1"}
    proxy = await make_proxy(config(model("m", dep(fake, "busy", weight=1e6), dep(other, "b"))))
    async with sdk(proxy) as client:
        assert (await ask(client)).startswith("tok0")
        await ask(client)  # the busy one is throttled: the other takes it at once
    assert (posts(fake), posts(other)) == (1, 2)
    [first, second] = proxy.recorder.exchanges
    assert (first.attempts, second.attempts) == (2, 1)


async def test_500s_take_a_deployment_out_only_as_a_rate(
    make_proxy: MakeProxy, fake: FakeUpstream, make_upstream: MakeUpstream
) -> None:
    other = await make_upstream(name="other")
    fake.default = {"x-fake-status": "500"}
    group = model("m", dep(fake, "flaky", weight=1e6), dep(other, "b"))
    proxy = await make_proxy(config(group, error_min_answers=4, error_rate=0.5, cooldown=30))
    state = upstreams(proxy)["flaky"]
    async with sdk(proxy) as client:
        for n in range(1, 5):
            assert state.healthy, n  # one request's 500 ejects nothing
            await ask(client)
    assert not state.healthy  # 4 answers, all 500s: out
    assert state.failures == 0  # never counted as consecutive failures


async def test_panic_mode_with_two_of_three_deployments_dead(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    dead = [dep(refused(), "dead1", weight=1e6), dep(refused(), "dead2", weight=1e6)]
    group = model("m", *dead, dep(fake, "alive"))
    proxy = await make_proxy(config(group, failure_threshold=1, cooldown=30, max_attempts=3))
    state = upstreams(proxy)
    route = proxy.state.router.routes["m"]
    async with sdk(proxy) as client:
        for _ in range(20):
            assert (await ask(client)).startswith("tok0")  # every request served
        async with aiohttp.ClientSession() as http:
            async with http.get(proxy.url + "/deployments") as resp:
                snapshot = await resp.json()
    assert (state["dead1"].healthy, state["dead2"].healthy, state["alive"].healthy) == (
        False,
        False,
        True,
    )
    assert route.in_panic(time.monotonic())  # 1 of 3 in rotation, under 50 %
    assert snapshot["models"][0]["panic"] is True
    # In panic the dead ones still get their (weighted) share of first attempts: the
    # requests fail over to the live one within their attempts.
    attempts = [ex.attempts for ex in proxy.recorder.exchanges]
    assert all(n <= 3 for n in attempts)
    assert sum(n > 1 for n in attempts[1:]) >= 15
    assert posts(fake) == 20


async def test_panic_threshold_is_per_model(make_proxy: MakeProxy, fake: FakeUpstream) -> None:
    dead = [dep(refused(), "dead1", weight=1e6), dep(refused(), "dead2", weight=1e6)]
    group = Model(name="m", deployments=[*dead, dep(fake, "alive")], panic_threshold=0)
    proxy = await make_proxy(config(group, failure_threshold=1, cooldown=30))
    async with sdk(proxy) as client:
        for _ in range(5):
            await ask(client)
    # Threshold 0: panic only when none is in rotation, so once both dead ones are out
    # every request goes straight to the live one.
    attempts = [ex.attempts for ex in proxy.recorder.exchanges]
    assert attempts[-3:] == [1, 1, 1]
    assert not proxy.state.router.routes["m"].in_panic(time.monotonic())


async def scrape(proxy: Proxy, name: str, model_name: str) -> dict[str, float]:
    """``name``'s value per deployment of ``model_name`` from the proxy's /metrics."""
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/metrics") as resp:
            text = await resp.text()
    return {
        s.labels["deployment"]: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and s.labels.get("model") == model_name
    }


async def chat(client: openai.AsyncOpenAI, name: str, **headers: str) -> None:
    """One streamed chat completion of model ``name``, read to its end."""
    stream = await client.chat.completions.create(
        model=name, messages=MESSAGES, stream=True, extra_headers=headers
    )
    async for _ in stream:
        pass


async def test_deployment_gauges_follow_streams_cancels_and_failures(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    name = "gauges-m"  # the registry is per process: a model no other test uses
    down = f"http://127.0.0.1:{free_port()}/v1"
    group = Model(name=name, deployments=[dep(fake, "g-up", weight=1e6), dep(down, "g-down")])
    proxy = await make_proxy(config(group, failure_threshold=1, cooldown=30))

    async def gauge(expected: dict[str, float], metric: str = "inflight") -> None:
        """Until the scraped gauge shows ``expected`` (it follows within 0.5 s)."""
        seen: dict[str, float] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while seen != expected:
                    seen = await scrape(proxy, f"morngpt_deployment_{metric}", name)
                    await asyncio.sleep(0.05)
        assert seen == expected

    await gauge({"g-up": 0, "g-down": 0})
    await gauge({"g-up": 1, "g-down": 1}, "healthy")
    async with sdk(proxy) as client:
        # A stream held open: 1 in flight; read to its end: 0.
        stream = await client.chat.completions.create(
            model=name, messages=MESSAGES, stream=True, extra_headers={"x-fake-gap-ms": "50"}
        )
        await gauge({"g-up": 1, "g-down": 0})
        async for _ in stream:
            pass
        await gauge({"g-up": 0, "g-down": 0})
        # A client that leaves mid-stream and one that leaves before the answer.
        for n, headers in enumerate(({"x-fake-stall": "2"}, {"x-fake-stall": "before"}), 2):
            task = asyncio.create_task(chat(client, name, **headers))
            await fake.wait_received(n)
            await gauge({"g-up": 1, "g-down": 0})
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await until_holds(lambda: upstreams(proxy, name)["g-up"].inflight == 0)
            await gauge({"g-up": 0, "g-down": 0})
        # Failures: an upstream 500, a stream cut mid-way, a deployment that refuses.
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model=name, messages=MESSAGES, extra_headers={"x-fake-status": "500"}
            )
        with pytest.raises(openai.APIError):
            await chat(client, name, **{"x-fake-cut": "2"})
        fake.default = {"x-fake-status": "503"}
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model=name, messages=MESSAGES)
    await until_holds(lambda: len(proxy.recorder.exchanges) == 6)
    await gauge({"g-up": 0, "g-down": 0})
    await gauge({"g-up": 0, "g-down": 0}, "healthy")  # both taken out, and it says so


def test_the_health_table_is_shared_by_the_workers_of_a_host(tmp_path: Path) -> None:
    one, two = Board(3, str(tmp_path)), Board(3, str(tmp_path))
    try:
        assert two.get(2, EJECTED) == 0.0
        with one.exclusive(2):
            one.set(2, EJECTED, 123.5)
        assert two.get(2, EJECTED) == 123.5  # seen at once, no message passed
        assert two.get(1, EJECTED) == 0.0
    finally:
        one.close()
        two.close()
        one.close()  # idempotent


def test_error_window_counts_the_current_and_the_previous_window() -> None:
    window = Window(10)
    for at in (0, 1, 2):
        window.note(True, at)
    window.note(False, 11)  # a new window: the previous one still counts
    assert window.counts() == (4, 3)
    window.note(False, 25)  # more than two windows later: the old ones are gone
    assert window.counts() == (2, 0)


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def promtool_test(healthy: list[tuple[dict[str, str], float]], down: str) -> dict[str, Any]:
    """A promtool unit test of alerts.yml whose input is ``healthy`` (scraped samples of
    morngpt_deployment_healthy) held for 10 minutes, as Prometheus would store them."""
    rules = yaml.safe_load((ALERTS / "alerts.yml").read_text())["groups"]
    [rule] = [r for g in rules for r in g["rules"] if r.get("alert") == "MorngptDeploymentDown"]
    series = []
    for labels, value in healthy:
        labels = {**labels, "job": "morngpt-proxy", "instance": "proxy:8080"}
        selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        series.append(
            {"series": f"morngpt_deployment_healthy{{{selector}}}", "values": f"{value:g}x10"}
        )
    return {
        "rule_files": [str(ALERTS / "alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "MorngptDeploymentDown", "exp_alerts": []},
                    {
                        "eval_time": "5m",
                        "alertname": "MorngptDeploymentDown",
                        "exp_alerts": [
                            {
                                "exp_labels": {
                                    "severity": "page",
                                    "model": "m",
                                    "deployment": down,
                                },
                                "exp_annotations": {
                                    "summary": f"Deployment {down} of model m is out of "
                                    "rotation everywhere",
                                    "description": rule["annotations"]["description"],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }


async def test_two_workers_share_health_and_the_outage_fires_the_alert(
    fake: FakeUpstream, tmp_path: Path
) -> None:
    """`serve --workers 2`: the first worker to find a deployment dead takes it out for
    both (one failed call in all, not one per worker); the aggregated /metrics says so,
    and promtool, fed that scrape, fires MorngptDeploymentDown for it alone."""
    config = {
        "models": [
            {
                "name": "m",
                "deployments": [
                    {"base_url": refused(), "name": "dead", "weight": 1e6},
                    {"base_url": fake.url, "name": "alive"},
                ],
            }
        ],
        "server": {"workers": 2},
        "routing": {"failure_threshold": 1, "cooldown": 120},
        "database": {"sqlite_path": str(tmp_path / "proxy.db")},
        "usage": {"spool_dir": str(tmp_path / "spool")},
    }
    path = tmp_path / "proxy.json"
    path.write_bytes(orjson.dumps(config))
    async with processes.serve("--config", str(path)) as served:
        await served.wait_log("listening", count=2)
        for _ in range(20):  # new connections: the kernel spreads them over both workers
            async with aiohttp.ClientSession() as http:
                async with http.post(
                    served.url + "/v1/chat/completions", data=b'{"model": "m"}'
                ) as resp:
                    assert resp.status == 200
        text = ""

        async def both_counted() -> bool:
            # A worker folds what it served into the metrics FOLD_SECONDS later.
            nonlocal text
            async with aiohttp.ClientSession() as http:
                async with http.get(served.url + "/metrics") as resp:
                    text = await resp.text()
            counts = [v for _, v in samples(text, "morngpt_worker_requests")]
            return sum(counts) == 20

        await until(both_counted)
        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0
    per_worker = [v for _, v in samples(text, "morngpt_worker_requests")]
    assert len(per_worker) == 2
    assert all(v > 0 for v in per_worker), per_worker  # both workers served
    errors = {
        (labels["deployment"], labels["kind"]): v
        for labels, v in samples(text, "morngpt_upstream_errors_total")
    }
    assert errors == {("dead", "unavailable"): 1}  # found dead once, for both workers
    healthy = [(labels, v) for labels, v in samples(text, "morngpt_deployment_healthy")]
    assert {labels["deployment"]: v for labels, v in healthy} == {"dead": 0, "alive": 1}
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    test_file = tmp_path / "outage_test.yml"
    test_file.write_text(yaml.safe_dump(promtool_test(healthy, "dead")))
    proc = await asyncio.create_subprocess_exec(
        *("promtool", "test", "rules", str(test_file)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    async with asyncio.timeout(60):
        output, _ = await proc.communicate()
    assert proc.returncode == 0, output.decode()


async def test_retries_stay_within_the_models_retry_budget(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    fake.default = {"x-fake-status": "503", "x-fake-delay-ms": "200"}
    proxy = await make_proxy(config(model("m", dep(fake, "only")), retry_budget=0, min_retries=1))
    async with sdk(proxy) as client:
        results = await asyncio.gather(ask(client), ask(client), return_exceptions=True)
    # Both first attempts fail together; the budget (one retry in flight) lets one of
    # them retry, the other gets its 503 at once — without x-should-retry, so its SDK
    # may still retry it.
    assert sorted(ex.attempts for ex in proxy.recorder.exchanges) == [1, 3]
    headers = {
        r.response.headers.get("x-should-retry")
        for r in results
        if isinstance(r, openai.InternalServerError)
    }
    assert headers == {None, "false"}
    assert proxy.state.router.routes["m"].retrying == 0  # given back


async def test_a_503_names_the_model_the_client_asked_for(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    deployment = Deployment(base_url=fake.url, name="upstream", max_concurrent=1)
    proxy = await make_proxy(
        resolve(cfg.Config(models=[Model(name=WILDCARD, deployments=[deployment])]))
    )
    async with sdk(proxy) as client:
        held = asyncio.create_task(
            client.chat.completions.create(
                model="gpt-x", messages=MESSAGES, extra_headers={"x-fake-stall": "before"}
            )
        )
        await fake.wait_received(1)
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="gpt-x", messages=MESSAGES)
        held.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await held
    assert caught.value.status_code == 503
    assert "`gpt-x`" in caught.value.message
    assert "`*`" not in caught.value.message


@pytest.mark.parametrize(
    ("sent", "calls"), [("0", 3), ("1", 2), ("2", 1), ("7", 1), ("²", 3), ("-1", 3), ("x", 3)]
)
async def test_a_client_retry_gets_the_calls_left_of_max_attempts(
    make_proxy: MakeProxy, fake: FakeUpstream, sent: str, calls: int
) -> None:
    fake.default = {"x-fake-status": "500"}
    proxy = await make_proxy(config(model("m", dep(fake, "only"))))
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base + "/chat/completions",
            json={"model": "m", "messages": MESSAGES},
            headers={"x-stainless-retry-count": sent},
        ) as resp:
            assert resp.status == 500
            assert resp.headers.get("x-should-retry") == ("false" if calls > 1 else None)
    assert posts(fake) == calls


async def test_only_a_request_sent_in_panic_mode_brings_a_deployment_back(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    proxy = await make_proxy(
        config(model("m", dep(fake, "only")), failure_threshold=1, cooldown=30)
    )
    state = upstreams(proxy)["only"]
    async with sdk(proxy) as client:
        # A stream sent while the deployment is in rotation, still running when it goes out.
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-chunks": "4", "x-fake-gap-ms": "100"},
        )
        with pytest.raises(openai.InternalServerError):
            await ask(client, extra_headers={"x-fake-status": "503"})
        assert not state.healthy
        async for _ in stream:
            pass
        assert not state.healthy  # sent before it went out: proves nothing now
        await ask(client)  # sent to it in panic mode, and served
    assert state.healthy
