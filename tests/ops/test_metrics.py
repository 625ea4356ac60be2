"""Observability over real HTTP: /metrics (one process and across workers), the
overhead header, probes and ops protection, the JSON access log, trace context."""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import msgspec
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import ConfigError, Secret
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model
from proxy.exchange import Exchange
from proxy.http.wire import Usage
from proxy.ops import accesslog, metrics
from proxy.ops.accesslog import JsonFormatter
from proxy.ops.metrics_sink import FOLD_SECONDS, MetricsSink, _bucket, _Observations
from tests.support.env import CLIENT_KEY, UPSTREAM_KEY, free_port
from tests.support.inproc import MakeProxy, Proxy, with_server
from tests.support.leaks import CAPTURED, SECRETS
from tests.support.properties import examples
from tests.support.served import serve_upstream

MESSAGES = [{"role": "user", "content": "say three words"}]
OVERHEAD = re.compile(r"\d+\.\d{3}")
TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[str, Samples]:
    """The /metrics text and its samples keyed by (name, labels)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics", headers=headers) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def one_model(upstream: FakeUpstream, **server: object) -> cfg.Config:
    """Model m1 served by deployment d1 (no wildcard: other names are unknown)."""
    deployment = Deployment(base_url=upstream.url, name="d1", api_key=UPSTREAM_KEY)
    config = cfg.Config(models=[Model(name="m1", deployments=[deployment])])
    return resolve(with_server(config, **server))


# 1. /metrics in one process ----------------------------------------------------------


async def test_requests_are_counted_by_outcome(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(one_model(upstream))
    _, before = await scrape(proxy.url)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=CLIENT_KEY, max_retries=0) as c:
        await c.chat.completions.create(model="m1", messages=MESSAGES)
        async for _ in await c.chat.completions.create(model="m1", messages=MESSAGES, stream=True):
            pass
        cut = await c.chat.completions.create(
            model="m1", messages=MESSAGES, stream=True, extra_headers={"x-fake-cut": "2"}
        )
        with pytest.raises(openai.APIError):
            async for _ in cut:
                pass
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.create(model="zzz-free-text", messages=MESSAGES)
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=b"{not json") as resp:
            assert resp.status == 400
    text, after = await scrape(proxy.url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"model": "m1", "deployment": "d1"}
    assert delta("morngpt_requests_total", **ok, status_class="2xx", stream="false") == 1
    assert delta("morngpt_requests_total", **ok, status_class="2xx", stream="true") == 2
    # Names outside the config share one label value; a refused body has no deployment.
    other = {"model": "*", "deployment": "", "status_class": "4xx", "stream": "false"}
    assert delta("morngpt_requests_total", **other) == 2
    assert "zzz-free-text" not in text
    assert delta("morngpt_request_duration_seconds_count", **ok, stream="false") == 1
    assert delta("morngpt_time_to_first_token_seconds_count", **ok, stream="true") == 2
    assert delta("morngpt_upstream_errors_total", deployment="d1", kind="broken") == 1
    assert delta("morngpt_upstream_duration_seconds_count", deployment="d1") == 3
    overhead = sum(
        delta("morngpt_proxy_overhead_seconds_count", stream=s) for s in ("true", "false")
    )
    assert overhead == 5
    usages = [ex.usage for ex in proxy.recorder.exchanges if ex.usage is not None]
    assert usages
    for kind in ("prompt", "completion"):
        tokens = sum(getattr(u, f"{kind}_tokens") for u in usages)
        assert delta("morngpt_tokens_total", **ok, kind=kind) == tokens
    # Labels never carry a key or a request id.
    for secret in (CLIENT_KEY, UPSTREAM_KEY, *(ex.request_id for ex in proxy.recorder.exchanges)):
        assert secret not in text


async def test_resting_series_are_declared_at_start(proxy: Proxy) -> None:
    _, samples = await scrape(proxy.url)
    assert value(samples, "morngpt_deployment_healthy", model="*", deployment="upstream") == 1
    inflight = frozenset({("model", "*"), ("deployment", "upstream")})
    assert ("morngpt_deployment_inflight", inflight) in samples
    for kind in ("requests", "tokens"):
        assert ("morngpt_ratelimited_requests_total", frozenset({("kind", kind)})) in samples
    for name in (
        "morngpt_usage_queue_depth",
        "morngpt_usage_spooled_records",
        "morngpt_usage_written_records_total",
        "morngpt_usage_dropped_records_total",
        "morngpt_inflight_requests",
    ):
        assert (name, frozenset()) in samples, name
    backends = {dict(labels)["backend"] for n, labels in samples if n == "morngpt_limiter_backend"}
    assert backends == {"redis", "local", "memory"}


async def test_inflight_gauge_follows_open_requests(proxy: Proxy) -> None:
    _, before = await scrape(proxy.url)
    base = value(before, "morngpt_inflight_requests")
    body = orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True})
    async with aiohttp.ClientSession() as http:
        async with http.post(
            proxy.base + "/chat/completions", data=body, headers={"x-fake-stall": "2"}
        ) as resp:
            await resp.content.readuntil(b"\n\n")
            _, during = await scrape(proxy.url)
            assert value(during, "morngpt_inflight_requests") == base + 1
    deadline = time.monotonic() + 5
    while value((await scrape(proxy.url))[1], "morngpt_inflight_requests") != base:
        assert time.monotonic() < deadline, "in-flight gauge did not come back down"
        await asyncio.sleep(0.02)


def test_folded_observations_equal_observe() -> None:
    """The sink adds a fold's observations to a histogram's buckets and sum
    at once (private prometheus-client fields): the same samples as ``observe``."""
    registry = CollectorRegistry()
    direct = Histogram("direct", "d", buckets=metrics.OVERHEAD_BUCKETS, registry=registry)
    folded = Histogram("folded", "f", buckets=metrics.OVERHEAD_BUCKETS, registry=registry)
    gathered = _Observations(folded)
    values = [0.0, -0.001, 0.0001, 0.00011, 0.3, 1.0, 7.5, *(i / 997 for i in range(300))]
    for n, v in enumerate(values):
        direct.observe(v)
        gathered.observe(v)
        if n % 7 == 0:
            gathered.fold()
    gathered.fold()
    gathered.fold()  # nothing gathered: nothing added

    def samples(name: str) -> dict[tuple[str, str], float]:
        return {
            (s.name.removeprefix(name), s.labels.get("le", "")): s.value
            for family in registry.collect()
            if family.name == name
            for s in family.samples
            if not s.name.endswith("_created")
        }

    want, got = samples("direct"), samples("folded")
    assert got.pop(("_sum", "")) == pytest.approx(want.pop(("_sum", "")))
    assert got == want


@settings(max_examples=examples(300), deadline=None)
@given(
    buckets=st.sampled_from(
        [metrics.LATENCY_BUCKETS, metrics.TTFT_BUCKETS, metrics.OVERHEAD_BUCKETS, (1.0,)]
    ),
    value=st.one_of(st.floats(allow_nan=True), st.sampled_from(metrics.OVERHEAD_BUCKETS)),
)
def test_a_value_goes_to_the_bucket_observe_picks(buckets: tuple[float, ...], value: float) -> None:
    bounds = Histogram("b", "b", buckets=buckets, registry=CollectorRegistry())._upper_bounds
    assert _bucket(bounds, value) == bisect.bisect_left(bounds, value)


async def test_requests_of_one_fold_are_counted_once_each() -> None:
    config = cfg.Config(models=[Model(name="fold", deployments=[Deployment(base_url="http://x")])])
    sink = MetricsSink(config)
    exchanges = []
    for n in range(6):
        ex = Exchange(f"r{n}", "chat/completions")
        ex.model, ex.deployment = "fold", "fold-d"
        ex.status = 200 if n % 3 else 201  # two series, one status class, shared children
        ex.usage = Usage(prompt_tokens=10, completion_tokens=n, total_tokens=10 + n)
        ex.first_byte = ex.started
        ex.upstream_time = 0.001
        ex.cost = 1_500_000  # nano-units: 0.0015
        exchanges.append(ex)

    def now() -> dict[str, float]:
        ok = {"model": "fold", "deployment": "fold-d"}
        wanted = {
            "requests": ("requests_total", {**ok, "status_class": "2xx", "stream": "false"}),
            "durations": ("request_duration_seconds_count", {**ok, "stream": "false"}),
            "ttfts": ("time_to_first_token_seconds_count", {**ok, "stream": "false"}),
            "upstream": ("upstream_duration_seconds_count", {"deployment": "fold-d"}),
            "prompt": ("tokens_total", {**ok, "kind": "prompt"}),
            "completion": ("tokens_total", {**ok, "kind": "completion"}),
            "cost": ("cost_total", {"model": "fold"}),
            "worker": ("worker_requests", {}),
        }
        return {
            key: REGISTRY.get_sample_value(f"morngpt_{name}", labels) or 0.0
            for key, (name, labels) in wanted.items()
        }

    before = now()
    for ex in exchanges:
        sink.record(ex)
    await asyncio.sleep(0)
    assert now() == before  # gathered: the fold comes FOLD_SECONDS after the first
    await asyncio.sleep(2 * FOLD_SECONDS)  # a later timer than the fold's
    after = now()
    delta = {k: after[k] - before[k] for k in after}
    assert delta.pop("cost") == pytest.approx(6 * 0.0015)
    assert delta == {
        "requests": 6,
        "durations": 6,
        "ttfts": 6,
        "upstream": 6,
        "prompt": 60,
        "completion": sum(range(6)),
        "worker": 6,
    }
    sink.record(exchanges[0])  # after a fold, alone: counted too
    await asyncio.sleep(2 * FOLD_SECONDS)
    assert now()["requests"] - after["requests"] == 1
    sink.record(exchanges[0])  # and at once where a scrape folds first
    sink.fold()
    assert now()["requests"] - after["requests"] == 2


# 2. /metrics across worker processes ------------------------------------------------


async def test_two_workers_are_aggregated_in_one_scrape(upstream: FakeUpstream) -> None:
    async with serve_upstream(upstream, "--workers", "2") as served:
        await served.wait_log("listening", count=2)
        pids = {line.split("pid ")[1].rstrip(")\n") for line in served.log if "listening" in line}
        [announce] = [line for line in served.log if "metrics aggregated from" in line]
        metrics_dir = Path(announce.split("metrics aggregated from ")[1].strip())
        assert metrics_dir.is_dir()
        await served.chat_on_new_connections(20)
        # A worker folds a request into the metrics FOLD_SECONDS after it answered
        # it: a scrape served by the other worker may come first.
        deadline = time.monotonic() + 5
        while total((samples := (await scrape(served.url))[1]), "morngpt_requests_total") < 20:
            assert time.monotonic() < deadline, "requests not counted"
            await asyncio.sleep(0.02)
        assert total(samples, "morngpt_requests_total") == 20
        per_worker = {
            dict(labels)["pid"]: v for (n, labels), v in samples.items()
            if n == "morngpt_worker_requests"
        }  # fmt: skip
        assert per_worker.keys() == pids
        assert all(count > 0 for count in per_worker.values()), per_worker  # both served
        assert sum(per_worker.values()) == 20

        # A worker that dies: its counts stay in the totals, its live series goes.
        victim = sorted(pids)[0]
        os.kill(int(victim), signal.SIGKILL)
        await served.wait_log("starting another")
        await served.wait_log("listening", count=3)
        _, samples = await scrape(served.url)
        assert total(samples, "morngpt_requests_total") == 20
        live = {dict(labels)["pid"] for n, labels in samples if n == "morngpt_worker_requests"}
        assert victim not in live

        served.proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0
    assert not metrics_dir.exists()


def test_metrics_dir_is_fresh_and_stale_ones_are_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(metrics.ENV, raising=False)
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], check=True, capture_output=True
    )
    stale = tmp_path / f"morngpt-metrics-{int(gone.stdout)}-abc"  # its supervisor was killed
    stale.mkdir()
    alive = tmp_path / f"morngpt-metrics-{os.getpid()}-abc"  # a running supervisor's
    alive.mkdir()
    with metrics.shared_dir() as path:
        assert os.environ[metrics.ENV] == path
        assert os.listdir(path) == []
        assert not stale.exists()
        assert alive.exists()
    assert metrics.ENV not in os.environ
    assert not Path(path).exists()


# 3. The overhead header ---------------------------------------------------------------


async def test_every_proxied_response_carries_the_overhead(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(one_model(upstream))
    chat = orjson.dumps({"model": "m1", "messages": MESSAGES})
    cases = [
        (chat, {}, 200),
        (orjson.dumps({"model": "m1", "messages": MESSAGES, "stream": True}), {}, 200),
        (chat, {"x-fake-status": "400"}, 400),  # the upstream's error, passed through
        (b"{not json", {}, 400),  # the proxy's own error
        (orjson.dumps({"model": "nope"}), {}, 404),
    ]
    async with aiohttp.ClientSession() as http:
        for body, headers, status in cases:
            async with http.post(
                proxy.base + "/chat/completions", data=body, headers=headers
            ) as resp:
                await resp.read()
                assert resp.status == status
                assert OVERHEAD.fullmatch(resp.headers["x-proxy-overhead-ms"]), resp.headers
        # Waiting on the upstream is not overhead.
        started = time.perf_counter()
        async with http.post(
            proxy.base + "/chat/completions", data=chat, headers={"x-fake-delay-ms": "400"}
        ) as resp:
            await resp.read()
            elapsed_ms = (time.perf_counter() - started) * 1000
            overhead_ms = float(resp.headers["x-proxy-overhead-ms"])
    assert elapsed_ms >= 400
    assert 0 <= overhead_ms < 200  # generous: it is well under a millisecond when idle


# 4. Probes and ops protection ---------------------------------------------------------


async def test_ops_token_guards_metrics_and_deployments(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = "ops-token-" + os.urandom(8).hex()
    SECRETS.add(token)
    monkeypatch.setenv("MORNGPT_TEST_OPS_TOKEN", token)
    proxy = await make_proxy(one_model(upstream, ops_token_env="MORNGPT_TEST_OPS_TOKEN"))
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/deployments"):
            for auth in (None, "Bearer wrong", token, f"Bearer {token}x"):
                headers = {"Authorization": auth} if auth else {}
                async with http.get(proxy.url + path, headers=headers) as resp:
                    assert resp.status == 401, (path, auth)
                    error = (await resp.json())["error"]
                    assert error["code"] == "invalid_api_key"
                    assert token not in error["message"]
            good = {"Authorization": f"Bearer {token}"}
            async with http.get(proxy.url + path, headers=good) as resp:
                assert resp.status == 200, path
        for probe in ("/healthz", "/readyz"):  # probes stay open
            async with http.get(proxy.url + probe) as resp:
                assert resp.status == 200, probe


async def test_ops_port_serves_the_ops_endpoints_apart(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    ops_port = free_port()
    proxy = await make_proxy(one_model(upstream, ops_port=ops_port))
    ops = f"http://127.0.0.1:{ops_port}"
    async with aiohttp.ClientSession() as http:
        for path in ("/metrics", "/deployments"):
            async with http.get(proxy.url + path) as resp:
                assert resp.status == 404, path
            async with http.get(ops + path) as resp:
                assert resp.status == 200, path
        async with http.post(ops + "/v1/chat/completions", data=b'{"model": "m1"}') as resp:
            assert resp.status == 404
        for base in (proxy.url, ops):
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 200
        proxy.state.traffic.draining = True
        for base in (proxy.url, ops):
            async with http.get(base + "/readyz") as resp:
                assert resp.status == 503
            async with http.get(base + "/healthz") as resp:
                assert resp.status == 200
    assert "morngpt_requests_total" in (await scrape(ops))[0]


async def test_readyz_stays_ready_while_the_database_is_down(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    down = cfg.Database(url=f"postgresql://postgres@127.0.0.1:{free_port()}/test", timeout=1)
    config = msgspec.structs.replace(one_model(upstream), database=down)
    proxy = await make_proxy(config)
    async with aiohttp.ClientSession() as http:
        async with http.get(proxy.url + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"


def test_ops_config_is_checked() -> None:
    base = cfg.Config(models=[Model(name="m", deployments=[Deployment("http://x")])])
    with pytest.raises(ConfigError, match="ops_token_env"):
        resolve(with_server(base, ops_token_env="MORNGPT_TEST_SURELY_UNSET"))
    with pytest.raises(ConfigError, match="ops_port"):
        resolve(with_server(base, port=9000, ops_port=9000))
    assert repr(Secret("hidden")) == "'***'"


# 5. The access log --------------------------------------------------------------------


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_records() -> Iterator[_Records]:
    logger = logging.getLogger("proxy.access")
    handler = _Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


async def test_access_log_is_one_json_line_per_request(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    access_records: _Records,
    capsys: pytest.CaptureFixture[str],
) -> None:
    proxy = await make_proxy(one_model(upstream))  # its log writer uses capsys's stderr
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=CLIENT_KEY, max_retries=0) as c:
        await c.chat.completions.create(
            model="m1", messages=MESSAGES, extra_headers={"X-Request-Id": "obs-plain"}
        )
        cut = await c.chat.completions.create(
            model="m1",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Request-Id": "obs-cut", "x-fake-cut": "2"},
        )
        with pytest.raises(openai.APIError):
            async for _ in cut:
                pass
    lines = {r.msg["request_id"]: r.msg for r in access_records.records if isinstance(r.msg, dict)}
    plain, broken = lines["obs-plain"], lines["obs-cut"]
    assert len(access_records.records) == 2
    assert (plain["model"], plain["deployment"]) == ("m1", "d1")
    assert (plain["status"], plain["stream"], plain["error"]) == (200, False, None)
    assert (plain["prompt_tokens"], plain["completion_tokens"]) == (3, 8)
    assert plain["duration_ms"] >= plain["ttft_ms"] >= 0
    assert plain["overhead_ms"] >= 0
    assert (plain["key_id"], plain["attempts"]) == (None, 1)
    assert (broken["stream"], broken["error"]) == (True, "UpstreamError")

    # The writer thread prints each record as one JSON object per line on stderr.
    deadline = time.monotonic() + 5
    printed = ""
    while printed.count("obs-") < 2:
        assert time.monotonic() < deadline, printed
        await asyncio.sleep(0.02)
        printed += capsys.readouterr().err
    rows = [json.loads(line) for line in printed.splitlines() if '"request_id":"obs-' in line]
    assert [row["request_id"] for row in rows] == ["obs-plain", "obs-cut"]
    assert rows[0]["time"].endswith("+00:00")
    assert {k: v for k, v in rows[0].items() if k != "time"} == plain
    assert CLIENT_KEY not in printed
    assert UPSTREAM_KEY not in printed
    assert JsonFormatter().format(access_records.records[0]).startswith('{"time":')


async def test_access_lines_skip_the_log_record_while_nobody_else_listens(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the writer's queue as the only handler, a line is queued without a
    LogRecord and printed the same; a handler attached later gets records again."""
    proxy = await make_proxy(one_model(upstream))  # its log writer uses capsys's stderr
    logger = logging.getLogger("proxy.access")
    made: list[object] = []
    make_record = logger.makeRecord
    monkeypatch.setattr(
        logger, "makeRecord", lambda *a, **k: made.append(a[4]) or make_record(*a, **k)
    )
    others = [h for h in logger.handlers if h is not accesslog.Output.handler]
    assert len(others) < len(logger.handlers)  # the writer's queue is attached
    late = _Records()
    for handler in others:  # the session's key scan: this test checks the lines itself
        logger.removeHandler(handler)
    try:
        async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as c:
            await c.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"X-Request-Id": "fast-1"}
            )
            logger.addHandler(late)
            await c.chat.completions.create(
                model="m1", messages=MESSAGES, extra_headers={"X-Request-Id": "fast-2"}
            )
    finally:
        logger.removeHandler(late)
        for handler in others:
            logger.addHandler(handler)
    deadline = time.monotonic() + 5
    printed = ""
    while printed.count("fast-") < 2:
        assert time.monotonic() < deadline, printed
        await asyncio.sleep(0.02)
        printed += capsys.readouterr().err
    rows = [json.loads(line) for line in printed.splitlines() if '"request_id":"fast-' in line]
    first, second = rows
    assert (first["request_id"], second["request_id"]) == ("fast-1", "fast-2")
    assert list(first) == list(second)  # the same line, either way
    assert first["time"].endswith("+00:00")
    assert (first["status"], first["model"], first["prompt_tokens"]) == (200, "m1", 3)
    [record] = late.records  # only the request after the handler came
    assert made == [record.msg]  # the first line had no LogRecord
    assert record.msg == {k: v for k, v in second.items() if k != "time"}
    assert UPSTREAM_KEY not in printed


@pytest.mark.parametrize("level", ["off", "debug"])
async def test_access_log_level_is_configurable(
    make_proxy: MakeProxy, upstream: FakeUpstream, access_records: _Records, level: str
) -> None:
    proxy = await make_proxy(one_model(upstream, access_log=level))  # logger is at INFO
    async with aiohttp.ClientSession() as http:
        async with http.post(proxy.base + "/chat/completions", data=b'{"model":"m1"}') as resp:
            assert resp.status == 200
    assert access_records.records == []


async def test_key_scan_sees_the_proxy_logs(client: openai.AsyncOpenAI, proxy: Proxy) -> None:
    """The end-of-run key scan (conftest) is not vacuous: access lines reach it."""
    await client.chat.completions.create(
        model="m1", messages=MESSAGES, extra_headers={"X-Request-Id": "scan-me"}
    )
    assert any("scan-me" in text for text in CAPTURED)
    assert not any(CLIENT_KEY in text or UPSTREAM_KEY in text for text in CAPTURED)


# 6. Trace context ---------------------------------------------------------------------


@pytest.mark.parametrize("tracing", [False, True])
async def test_client_trace_context_goes_upstream_unchanged(
    make_proxy: MakeProxy, upstream: FakeUpstream, tracing: bool
) -> None:
    proxy = await make_proxy(one_model(upstream, tracing=tracing))
    context = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7",
    }
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        await client.chat.completions.create(model="m1", messages=MESSAGES, extra_headers=context)
    sent = upstream.received[-1].headers
    assert {k: sent[k] for k in context} == context


async def test_tracing_starts_a_trace_when_the_client_sent_none(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(one_model(upstream, tracing=True))
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
        for _ in range(2):
            await client.chat.completions.create(model="m1", messages=MESSAGES)
    started = [r.headers["traceparent"] for r in upstream.received]
    assert all(TRACEPARENT.fullmatch(t) for t in started), started
    assert started[0].split("-")[1] != started[1].split("-")[1]  # one trace per request


async def test_without_tracing_no_trace_is_invented(
    client: openai.AsyncOpenAI, upstream: FakeUpstream
) -> None:
    await client.chat.completions.create(model="m1", messages=MESSAGES)
    assert "traceparent" not in upstream.received[-1].headers
