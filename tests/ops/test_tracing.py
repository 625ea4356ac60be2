"""OpenTelemetry traces: what the proxy sends a real OTLP/HTTP receiver on loopback,
decoded with opentelemetry-proto; sampling; and collectors that refuse or hang."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import msgspec
import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import REGISTRY

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import ConfigError
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model, Routing
from proxy.db import Db
from proxy.governance.keys.teams import TeamStore
from proxy.ops import tracing
from proxy.ops.tracer import Tracer
from tests.support.env import CLIENT_KEY, UPSTREAM_KEY, free_port
from tests.support.inproc import MakeProxy, MakeUpstream, Proxy
from tests.support.keys import declare, keyed
from tests.support.leaks import SECRETS

MESSAGES = [{"role": "user", "content": "hi"}]
PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
HEAVY = 1e6  # a weight that makes a deployment the first choice (all but surely)


class Collector:
    """An OTLP/HTTP traces receiver: decodes every export and keeps its spans. With
    ``hang`` set it accepts an export and never answers it (until ``release``)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.hang = False
        self.pending = 0
        self.changed = asyncio.Event()
        self.released = asyncio.Event()
        self.url = ""

    async def receive(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        body = await request.read()
        if self.hang:
            self.pending += 1
            self._changed()
            await self.released.wait()
            self.pending -= 1
        export = ExportTraceServiceRequest.FromString(body)
        self.bodies.append(body)
        for resource_spans in export.resource_spans:
            self.resources.append(attrs(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        self._changed()
        return web.Response(content_type="application/x-protobuf")

    def _changed(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    async def until(self, ready: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not ready():
                await self.changed.wait()

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in self.spans if s.trace_id.hex() == trace_id]

    async def spans_of(self, trace_id: str, n: int) -> tuple[Span, list[Span]]:
        """The server span and the client spans (by attempt) of one trace."""
        await self.until(lambda: len(self.trace(trace_id)) >= n)
        spans = self.trace(trace_id)
        assert len(spans) == n
        [server] = [s for s in spans if s.kind == Span.SPAN_KIND_SERVER]
        clients = [s for s in spans if s.kind == Span.SPAN_KIND_CLIENT]
        clients.sort(key=lambda s: attrs(s.attributes)["morngpt.attempt"])
        return server, clients


def attrs(pairs: Any) -> dict[str, Any]:
    """Decoded attributes: {key: plain value}."""
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


@pytest.fixture
async def collector() -> AsyncIterator[Collector]:
    receiver = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.receive)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/traces"
    yield receiver
    receiver.released.set()
    await runner.cleanup()


@pytest.fixture
async def upstream(make_upstream: MakeUpstream) -> FakeUpstream:
    return await make_upstream(chunks=4)


def traced(config: cfg.Config, endpoint: str, **tracing: Any) -> cfg.Config:
    settings = {"export_interval": 0.02, **tracing}
    return resolve(
        msgspec.structs.replace(config, tracing=cfg.Tracing(endpoint=endpoint, **settings))
    )


def one_model(*deployments: Deployment) -> cfg.Config:
    return cfg.Config(
        models=[Model(name="m", deployments=list(deployments))],
        routing=Routing(backoff_base=0.01, backoff_max=0.02),
    )


def dep(up: FakeUpstream | str, name: str, **fields: Any) -> Deployment:
    url = up if isinstance(up, str) else up.url
    return Deployment(base_url=url, name=name, api_key=UPSTREAM_KEY, **fields)


def sdk(proxy: Proxy, key: str = CLIENT_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base, api_key=key, max_retries=0)


def dropped(reason: str) -> float:
    value = REGISTRY.get_sample_value("morngpt_trace_spans_dropped_total", {"reason": reason})
    return value or 0.0


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, dict):
            self.lines.append(record.msg)


@pytest.fixture
def access_lines() -> Iterator[list[dict[str, Any]]]:
    logger = logging.getLogger("proxy.access")
    handler = _Records()
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


# 1. Spans, attributes, parentage ------------------------------------------------------


async def test_a_stream_under_a_client_trace(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    collector: Collector,
    access_lines: list[dict[str, Any]],
) -> None:
    key, declared = declare()
    config = keyed(upstream.url, declared)
    config = msgspec.structs.replace(
        config,
        models=[Model(name="m", deployments=[dep(upstream, "d1", model="fake-model")])],
    )
    proxy = await make_proxy(traced(config, collector.url, sample_ratio=0.0), auth=True)
    context = {
        "traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-01",
        "tracestate": "congo=t61rcWkgMzE",
    }
    async with sdk(proxy, key) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            stream=True,
            max_tokens=50,
            stream_options={"include_usage": True},
            extra_headers=context,
        )
        chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None

    server, [attempt] = await collector.spans_of(PARENT_TRACE, 2)
    # The client's span is the parent (sampled by it, though the ratio is 0); the
    # attempt's span is the upstream's parent.
    assert server.parent_span_id.hex() == PARENT_SPAN
    assert attempt.parent_span_id == server.span_id
    [sent] = upstream.received
    assert sent.headers["traceparent"] == f"00-{PARENT_TRACE}-{attempt.span_id.hex()}-01"
    assert sent.headers["tracestate"] == context["tracestate"]
    assert server.trace_state == context["tracestate"]

    assert server.name == "chat m"
    server_attrs = attrs(server.attributes)
    assert server_attrs.pop("morngpt.overhead_ms") > 0
    assert server_attrs.pop("morngpt.request_id").startswith("req_")
    assert server_attrs == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "gen_ai.request.max_tokens": 50,
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "http.request.method": "POST",
        "url.path": "/v1/chat/completions",
        "http.response.status_code": 200,
        "morngpt.key_id": declared.id,
        "morngpt.deployment": "d1",
        "morngpt.attempts": 1,
        "morngpt.stream": True,
    }
    assert server.status.code == Status.STATUS_CODE_UNSET
    first, end = server.events
    assert (first.name, end.name) == ("first_token", "end_of_stream")
    assert server.start_time_unix_nano < first.time_unix_nano <= end.time_unix_nano
    assert end.time_unix_nano == server.end_time_unix_nano

    assert attempt.name == "chat fake-model"
    port = int(upstream.url.split(":")[2].split("/")[0])
    assert attrs(attempt.attributes) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "fake-model",
        "gen_ai.response.model": "fake-model",
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.request.method": "POST",
        "http.response.status_code": 200,
        "morngpt.deployment": "d1",
        "morngpt.attempt": 1,
    }
    assert server.start_time_unix_nano < attempt.start_time_unix_nano
    assert attempt.end_time_unix_nano <= server.end_time_unix_nano

    assert collector.resources[0]["service.name"] == "morngpt-proxy"
    # No key or secret in anything the proxy sent the collector.
    for secret in (*SECRETS, key, UPSTREAM_KEY, CLIENT_KEY):
        assert all(secret.encode() not in body for body in collector.bodies)

    [line] = [line for line in access_lines if line["trace_id"] == PARENT_TRACE]
    assert line["span_id"] == server.span_id.hex()


async def test_retries_and_failover_are_client_spans_and_always_kept(
    make_proxy: MakeProxy,
    make_upstream: MakeUpstream,
    collector: Collector,
    access_lines: list[dict[str, Any]],
) -> None:
    a = await make_upstream(name="a")
    b = await make_upstream(name="b")
    a.default = {"x-fake-status": "503"}  # the first deployment fails
    config = one_model(dep(a, "bad", weight=HEAVY), dep(b, "good"))
    proxy = await make_proxy(traced(config, collector.url, sample_ratio=0.0))
    async with sdk(proxy) as client:
        reply = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert reply.http_response.status_code == 200
    [first], [second] = a.received, b.received
    # Sampled out at the start (ratio 0, no parent): no trace went upstream...
    assert "traceparent" not in first.headers
    assert "traceparent" not in second.headers
    # ...but a retried request is always exported.
    await collector.until(lambda: len(collector.spans) >= 3)
    server, (failed, served) = await collector.spans_of(collector.spans[0].trace_id.hex(), 3)
    assert server.parent_span_id == b""
    assert failed.parent_span_id == served.parent_span_id == server.span_id
    assert len({server.span_id, failed.span_id, served.span_id}) == 3
    [line] = access_lines  # ids drawn at the end, before the line was written
    assert (line["trace_id"], line["span_id"]) == (server.trace_id.hex(), server.span_id.hex())
    bad, good = attrs(failed.attributes), attrs(served.attributes)
    assert (bad["morngpt.deployment"], bad["morngpt.attempt"]) == ("bad", 1)
    assert (bad["http.response.status_code"], bad["error.type"]) == (503, "503")
    assert failed.status.code == Status.STATUS_CODE_ERROR
    assert "gen_ai.response.model" not in bad
    assert (good["morngpt.deployment"], good["morngpt.attempt"]) == ("good", 2)
    assert "error.type" not in good
    assert served.status.code == Status.STATUS_CODE_UNSET
    assert failed.end_time_unix_nano <= served.start_time_unix_nano
    assert attrs(server.attributes)["morngpt.attempts"] == 2
    assert server.status.code == Status.STATUS_CODE_UNSET  # the client got its answer


async def test_an_upstream_failure_is_an_error_span(
    make_proxy: MakeProxy, collector: Collector
) -> None:
    config = traced(one_model(dep(f"http://127.0.0.1:{free_port()}/v1", "gone")), collector.url)
    config = msgspec.structs.replace(config, routing=Routing(max_attempts=1))
    proxy = await make_proxy(config)
    async with sdk(proxy) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
    assert caught.value.status_code == 502
    await collector.until(lambda: len(collector.spans) >= 2)
    server, [attempt] = await collector.spans_of(collector.spans[0].trace_id.hex(), 2)
    assert attrs(server.attributes)["error.type"] == "UpstreamUnavailable"
    assert server.status.code == Status.STATUS_CODE_ERROR
    assert attrs(attempt.attributes)["error.type"] == "UpstreamUnavailable"
    assert "http.response.status_code" not in attrs(attempt.attributes)


# 2. Sampling ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratio", "flags", "kept"),
    [
        (0.0, None, False),  # a new trace, ratio 0
        (1.0, None, True),  # a new trace, ratio 1
        (0.0, "01", True),  # the client sampled it
        (1.0, "00", False),  # the client did not
    ],
)
async def test_sampling_is_parent_based_then_by_ratio(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    collector: Collector,
    ratio: float,
    flags: str | None,
    kept: bool,
    access_lines: list[dict[str, Any]],
) -> None:
    proxy = await make_proxy(
        traced(one_model(dep(upstream, "d1")), collector.url, sample_ratio=ratio)
    )
    headers = {} if flags is None else {"traceparent": f"00-{PARENT_TRACE}-{PARENT_SPAN}-{flags}"}
    marker = "ffffffffffffffffffffffffffffffff"
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=headers)
        # A request surely kept, after it: once its spans are in, the first one's
        # would be too (one queue, exported in order).
        sure = {"traceparent": f"00-{marker}-{PARENT_SPAN}-01"}
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=sure)
    await collector.spans_of(marker, 2)
    # Exported, or not: the marker's are the only other spans.
    others = [s for s in collector.spans if s.trace_id.hex() != marker]
    assert len(others) == (2 if kept else 0)
    sent = upstream.received[0].headers.get("traceparent")
    if kept:  # the proxy's attempt is the upstream's parent
        [attempt] = [s for s in others if s.kind == Span.SPAN_KIND_CLIENT]
        trace_id = others[0].trace_id.hex()
        assert sent == f"00-{trace_id}-{attempt.span_id.hex()}-01"
    else:  # not recording: the client's context goes through as it came
        assert sent == headers.get("traceparent")
    # A log line names a trace only when its spans are in Jaeger.
    assert ("trace_id" in access_lines[0]) is kept


def test_ratio_sampling_follows_the_trace_id() -> None:
    config = cfg.Tracing(endpoint="http://127.0.0.1:9/v1/traces", sample_ratio=0.25)
    tracer = Tracer(config)
    random.seed(21)  # trace ids come from the random module: the same ones every run
    kept = sum(tracer.start({}).sampled for _ in range(4000))
    assert 800 < kept < 1200  # ~1000: a binomial(4000, 0.25) is outside this 1e-12 of the time


def test_errors_are_kept_up_to_a_rate() -> None:
    """Beyond ``max_error_traces`` a second, a failed request sampled out stays out."""
    config = cfg.Tracing(endpoint="http://127.0.0.1:9/v1/traces", max_error_traces=3)
    tracer = Tracer(config)
    kept = [tracer._may_keep_error(now) for now in (10.0, 10.1, 10.5, 10.9, 10.99)]
    assert kept == [True, True, True, False, False]
    assert tracer._may_keep_error(11.0)  # a new second
    assert tracer._may_keep_error(11.5)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        (f"00-{PARENT_TRACE}-{PARENT_SPAN}-01", (PARENT_TRACE, PARENT_SPAN, True)),
        (f"00-{PARENT_TRACE}-{PARENT_SPAN}-00", (PARENT_TRACE, PARENT_SPAN, False)),
        (f"00-{PARENT_TRACE}-{PARENT_SPAN}-03", (PARENT_TRACE, PARENT_SPAN, True)),
        (f"01-{PARENT_TRACE}-{PARENT_SPAN}-01-future", (PARENT_TRACE, PARENT_SPAN, True)),
        (f"00-{PARENT_TRACE}-{PARENT_SPAN}-01-extra", None),  # version 00 has 4 fields
        (f"ff-{PARENT_TRACE}-{PARENT_SPAN}-01", None),
        (f"00-{'0' * 32}-{PARENT_SPAN}-01", None),
        (f"00-{PARENT_TRACE}-{'0' * 16}-01", None),
        (f"00-{PARENT_TRACE.upper()}-{PARENT_SPAN}-01", None),
        (f"00-{PARENT_TRACE}-{PARENT_SPAN}", None),
        ("garbage", None),
    ],
)
def test_traceparent_parsing(value: str, parsed: tuple[str, str, bool] | None) -> None:
    assert tracing.parse(value) == parsed


async def test_an_invalid_traceparent_starts_a_new_trace(
    make_proxy: MakeProxy, upstream: FakeUpstream, collector: Collector
) -> None:
    proxy = await make_proxy(traced(one_model(dep(upstream, "d1")), collector.url))
    bad = {"traceparent": "00-nothex-00f067aa0ba902b7-01", "tracestate": "a=b"}
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES, extra_headers=bad)
    [sent] = upstream.received
    assert tracing.parse(sent.headers["traceparent"]) is not None
    assert sent.headers.getall("traceparent") == [sent.headers["traceparent"]]
    assert "tracestate" not in sent.headers  # it belonged to the invalid parent
    server, _ = await collector.spans_of(sent.headers["traceparent"].split("-")[1], 2)
    assert server.parent_span_id == b""


# 3. Collectors that fail never cost a request -----------------------------------------


async def test_a_refusing_collector_breaks_nothing(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}/v1/traces"
    proxy = await make_proxy(traced(one_model(dep(upstream, "d1")), endpoint))
    before = dropped("export_failed")
    async with sdk(proxy) as client:
        for _ in range(5):
            async with asyncio.timeout(5):
                await client.chat.completions.create(model="m", messages=MESSAGES)
    async with asyncio.timeout(10):
        while dropped("export_failed") < before + 10:  # noqa: ASYNC110 - a metric, no event
            await asyncio.sleep(0.02)  # 5 requests, 2 spans each


async def test_a_hung_collector_breaks_nothing(
    make_proxy: MakeProxy, upstream: FakeUpstream, collector: Collector
) -> None:
    collector.hang = True
    # If any request waited on the export, it would wait export_timeout (60 s): far
    # beyond the 5 s each request below is given.
    config = traced(
        one_model(dep(upstream, "d1")), collector.url, export_timeout=60.0, queue_size=4
    )
    proxy = await make_proxy(config)
    before = dropped("queue_full")
    async with sdk(proxy) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
        await collector.until(lambda: collector.pending == 1)  # the exporter is stuck
        for _ in range(10):
            async with asyncio.timeout(5):
                await client.chat.completions.create(model="m", messages=MESSAGES)
    # 4 requests wait in the queue; the other 6 were dropped, 2 spans each.
    assert dropped("queue_full") == before + 12
    collector.hang = False
    collector.released.set()  # the collector answers at last: the queue drains
    await collector.until(lambda: len(collector.spans) == 2 * 5)


def test_an_endpoint_must_be_an_http_url() -> None:
    with pytest.raises(ConfigError, match=r"tracing\.endpoint"):
        traced(one_model(dep("http://127.0.0.1:9/v1", "d1")), "jaeger:4318")


async def test_a_team_keys_request_names_its_team(
    make_proxy: MakeProxy, upstream: FakeUpstream, collector: Collector, migrated_pg: str
) -> None:
    database = cfg.Database(url=migrated_pg)
    db = await Db.open(database)
    try:
        team = await TeamStore(db).create("search", team_id="t-search")
    finally:
        await db.close()
    key, declared = declare(team_id=team.id)
    config = msgspec.structs.replace(keyed(upstream.url, declared), database=database)
    proxy = await make_proxy(traced(config, collector.url, sample_ratio=1.0), auth=True)
    async with sdk(proxy, key) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
    await collector.until(lambda: len(collector.spans) >= 2)
    [server] = [s for s in collector.spans if s.kind == Span.SPAN_KIND_SERVER]
    assert attrs(server.attributes)["morngpt.team_id"] == "t-search"
    assert attrs(server.attributes)["morngpt.key_id"] == declared.id


@pytest.mark.parametrize("stream", [False, True])
async def test_the_response_model_is_the_one_the_answer_names(
    make_proxy: MakeProxy, upstream: FakeUpstream, collector: Collector, stream: bool
) -> None:
    """OpenAI answers `gpt-4o` with a dated snapshot: the span says which one served."""
    key, declared = declare()
    proxy = await make_proxy(traced(keyed(upstream.url, declared), collector.url), auth=True)
    snapshot = {"x-fake-model": "gpt-4o-2024-08-06"}
    async with sdk(proxy, key) as client:
        if stream:
            answer = await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=snapshot
            )
            _ = [chunk async for chunk in answer]
        else:
            await client.chat.completions.create(
                model="gpt-4o", messages=MESSAGES, extra_headers=snapshot
            )
    await collector.until(lambda: len(collector.spans) >= 2)
    [attempt] = [s for s in collector.spans if s.kind == Span.SPAN_KIND_CLIENT]
    assert attrs(attempt.attributes)["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert attrs(attempt.attributes)["gen_ai.request.model"] == "gpt-4o"
