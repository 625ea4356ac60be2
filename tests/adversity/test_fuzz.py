"""Fuzzed requests (hypothesis) against a running proxy over loopback: random JSON and
non-JSON bodies, huge and deeply nested JSON, odd unicode and invalid UTF-8, odd and
duplicated headers, path tricks. Each one gets an OpenAI-shaped 4xx or a correct
proxied answer: never a 5xx of the proxy's own, never a hang, never a request that
reaches the upstream outside ``/v1/``.

The proxy and the fake upstream run on an event loop in a thread of their own for the
whole module; hypothesis drives plain functions that send raw bytes with a deadline.
Example counts are bounded and the search derandomized, so the default run is short
and the same every time; ``-m slow`` runs the wide random search
(tests/test_wide_search.py).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import WILDCARD
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Deployment, Model
from proxy.serve import start
from tests.support.env import UPSTREAM_KEY
from tests.support.figures import count
from tests.support.inproc import Recorder
from tests.support.keys import declare
from tests.support.leaks import SECRETS
from tests.support.properties import examples
from tests.support.rawhttp import CHAT, Reply, roundtrip

T = TypeVar("T")
encode = msgspec.json.Encoder().encode  # big integers too (orjson stops at 64 bits)
MAX_BODY = 64 * 1024  # the fuzzed proxy's server.max_body_bytes: "huge" stays quick
FUZZ = settings(
    max_examples=examples(60),
    deadline=None,  # loopback round trips on a busy machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Errors(logging.Handler):
    """Every ERROR the proxy (or aiohttp's server) logs while the fuzzer runs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(self.format(record))


class Target:
    """The proxy under fuzzing, on a loop in a background thread."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.key, declared = declare()
        self.config = self._config(declared)
        self.recorder = Recorder()
        self.errors = Errors()

    def _config(self, declared: cfg.DeclaredKey) -> cfg.Config:
        config = quick_start("http://127.0.0.1:1/v1", UPSTREAM_KEY)  # url set in run
        server = cfg.Server(port=0, max_body_bytes=MAX_BODY, body_timeout=2.0, grace_period=1)
        return msgspec.structs.replace(
            config,
            server=server,
            keys=[declared],
            database=cfg.Database(sqlite_path=str(self.folder / "fuzz.db")),
            usage=cfg.Ledger(spool_dir=str(self.folder / "spool")),
        )

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.upstream = FakeUpstream()
        await self.upstream.start()
        deployment = Deployment(base_url=self.upstream.url, api_key=UPSTREAM_KEY)
        model = Model(name=WILDCARD, deployments=[deployment])
        self.runner = await start(resolve(msgspec.structs.replace(self.config, models=[model])))
        self.port = int(self.runner.addresses[0][1])
        from proxy.state import STATE

        self.runner.app[STATE].sinks.add(self.recorder)

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.upstream.close()

    def __enter__(self) -> Target:
        self.thread.start()
        self.run(self._start())
        for name in ("proxy", "aiohttp"):
            logging.getLogger(name).addHandler(self.errors)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for name in ("proxy", "aiohttp"):
            logging.getLogger(name).removeHandler(self.errors)
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def send(self, data: bytes) -> Reply:
        """One raw request on a fresh connection; a reply must come within 10 s."""
        return self.run(roundtrip(self.port, data, timeout=10))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with Target(tmp_path_factory.mktemp("fuzz")) as running:
        yield running
    # Nothing the fuzzer sent made the proxy fail on its own account.
    assert running.errors.messages == []
    # The upstream only ever saw /v1/ paths, each with the deployment's key only.
    for received in running.upstream.received:
        assert received.path.startswith("/v1/"), received.path
        assert "/." not in received.path, received.path
        assert "//" not in received.path, received.path
        assert received.headers.getall("Authorization") == [f"Bearer {UPSTREAM_KEY}"]
        assert running.key not in str(received.headers) + repr(received.body)


def request(
    body: bytes,
    *headers: tuple[str, str],
    path: str = "/v1/chat/completions",
    key: str | None = None,
) -> bytes:
    """A well-formed HTTP request (the fuzzing is in what it says, not its framing)."""
    lines = [f"POST {path} HTTP/1.1".encode(), b"Host: proxy"]
    if key is not None:
        lines.append(b"Authorization: Bearer " + key.encode())
    lines += [
        f"{name}: ".encode() + value.encode("utf-8", "surrogateescape") for name, value in headers
    ]
    lines.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# Headers a request may carry once; aiohttp refuses a request with two (plain 400).
SINGLETONS = {"Content-Type", "Host"}


def is_malformed_http(reply: Reply) -> bool:
    """The answer to a request that is not valid HTTP (ingress.py): an OpenAI-shaped
    400 that quotes nothing of the request, and the connection closed."""
    check(reply)
    return reply.status == 400 and orjson.loads(reply.body)["error"]["code"] == "invalid_http"


def check(reply: Reply) -> None:
    """The contract for any request: an OpenAI-shaped 4xx, or a proxied answer."""
    assert reply.status < 500, (reply.status, reply.body[:300])
    if reply.status >= 400:
        error = orjson.loads(reply.body)["error"]
        assert isinstance(error["message"], str), error
        assert error["type"], error
        assert "Traceback" not in error["message"]
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        assert reply.body.endswith(b"data: [DONE]\n\n") or b"response.completed" in reply.body
    else:
        orjson.loads(reply.body)
    for secret in SECRETS:
        assert secret not in reply.body.decode("utf-8", "replace")
        assert secret not in reply.raw_head.decode("latin-1")


# Strategies ---------------------------------------------------------------------------

odd_text = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40
)  # emoji, RTL, combining marks, NUL, controls
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | odd_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=20,
)
view_fields = st.fixed_dictionaries(
    {},
    optional={
        "stream": st.booleans() | json_values,
        "stream_options": st.none() | st.fixed_dictionaries({"include_usage": json_values}),
        "max_tokens": st.integers(min_value=-(2**70), max_value=2**70) | json_values,
        "n": st.integers(min_value=-5, max_value=2**40) | json_values,
        "messages": json_values,
    },
)


@st.composite
def chat_bodies(draw: st.DrawFn) -> bytes:
    """JSON objects close to a real request: a model name of any text (or no string
    at all), the fields the proxy reads with any type, and anything else."""
    fields = draw(view_fields)
    model = draw(st.one_of(odd_text, json_values))
    if draw(st.booleans()):
        fields["model"] = model
    fields.update(draw(st.dictionaries(odd_text, json_values, max_size=3)))
    return encode(fields)


def is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def nested(depth: int, open_: bytes, close: bytes) -> bytes:
    return open_ * depth + close * depth


@st.composite
def deep_bodies(draw: st.DrawFn) -> bytes:
    depth = draw(st.integers(min_value=1, max_value=20_000))
    kind = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = nested(depth, *kind) if kind[0] == b"[" else b'{"a":' * depth + b"1" + b"}" * depth
    where = draw(st.sampled_from(["top", "field", "stream-field"]))
    if where == "top":
        return inner
    stream = b'"stream":true,' if where == "stream-field" else b""
    return b'{"model":"m1",' + stream + b'"messages":' + inner + b"}"


@st.composite
def broken_utf8(draw: st.DrawFn) -> bytes:
    bad = draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80", b"\x80"]))
    where = draw(st.sampled_from(["model", "key", "value", "stream-key"]))
    if where == "model":
        return b'{"model":"m' + bad + b'"}'
    if where == "key":
        return b'{"model":"m1","' + bad + b'":1}'
    if where == "stream-key":
        return b'{"model":"m1","stream":true,"' + bad + b'":1}'
    return b'{"model":"m1","messages":[{"role":"user","content":"' + bad + b'"}]}'


huge_bodies = st.integers(min_value=MAX_BODY - 64, max_value=MAX_BODY + 64).map(
    lambda size: b'{"model":"m1","pad":"' + b"x" * max(0, size - 22) + b'"}'
)
header_names = st.from_regex(r"\A[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,30}\Z").filter(
    lambda name: not name.lower().startswith(("x-fake", "content-length", "transfer-encoding"))
)
# Field values as HTTP allows them: visible ASCII, spaces and tabs inside, obs-text.
header_values = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E) | st.sampled_from(" \t"), max_size=60
).map(str.strip) | st.binary(max_size=30).map(
    lambda raw: bytes(b for b in raw if b >= 0x80 or 0x21 <= b <= 0x7E).decode(
        "utf-8", "surrogateescape"
    )
)
duplicated = st.sampled_from(
    [
        "Authorization",
        "api-key",
        "X-Request-Id",
        "Content-Type",
        "Connection",
        "Host",
        "traceparent",
        "Accept-Encoding",
        "Cookie",
    ]
)
path_segments = st.lists(
    st.sampled_from(
        [
            *("chat", "completions", "embeddings", "responses", "v1", "a.b", "UPPER", "~"),
            *("..", ".", "", "%2e%2e", "%2F", "%00", "é", ".hidden", "%c3%a9", "\\.."),
            "x" * 300,
        ]
    ),
    min_size=1,
    max_size=6,
)


# The fuzz tests -----------------------------------------------------------------------


@FUZZ
@given(body=chat_bodies() | json_values.map(encode) | st.binary(max_size=300))
def test_random_bodies(target: Target, body: bytes) -> None:
    check(target.send(request(body, key=target.key)))
    count(inputs=1)


@FUZZ
@given(body=deep_bodies() | broken_utf8() | huge_bodies)
# Found by this suite (each used to be a 500 from the proxy's own code):
@example(body=b'{"model":"m\xff"}')  # invalid UTF-8 in a string the proxy decodes
@example(body=b'{"model":"m1","stream":true,"\xff":1}')  # ... in a key, for rewrite
@example(body=b'{"model":"m1","x":' + nested(5000, b"[", b"]") + b"}")  # too deep
def test_deep_huge_and_broken_bodies(target: Target, body: bytes) -> None:
    reply = target.send(request(body, key=target.key))
    check(reply)
    if len(body) > MAX_BODY:
        assert reply.status == 413
    elif not is_utf8(body):
        assert reply.status == 400, reply.body  # JSON is UTF-8: refused, never forwarded
    count(inputs=1)


@FUZZ
@given(
    extra=st.lists(st.tuples(header_names, header_values), max_size=8),
    twice=st.lists(st.tuples(duplicated, header_values), max_size=3),
)
def test_odd_and_duplicated_headers(
    target: Target, extra: list[tuple[str, str]], twice: list[tuple[str, str]]
) -> None:
    headers = [*extra, *twice, *twice]  # each of ``twice`` is sent two times
    reply = target.send(request(CHAT, *headers, key=target.key))
    if {name for name, _ in twice} & SINGLETONS:
        assert is_malformed_http(reply)  # HTTP allows only one (request smuggling)
        return
    check(reply)
    if any(name.lower() in ("authorization", "api-key") for name, _ in twice):
        assert reply.status in (200, 401)  # whichever key counts, never a 5xx
    count(inputs=1)


@FUZZ
@given(key=odd_text | header_values | st.binary(max_size=60).map(lambda b: b.hex()))
@example(key="sk-\udcff\udcfe")  # bytes that are not UTF-8 (used to be a 500)
def test_odd_keys_are_401s(target: Target, key: str) -> None:
    key = key.strip(" \t")
    header = ("Authorization", f"Bearer {key}")
    try:
        data = request(CHAT, header)
    except UnicodeEncodeError:  # not sendable as HTTP at all
        return
    reply = target.send(data)
    if not is_malformed_http(reply):  # (control characters make it invalid HTTP)
        assert reply.status == 401, reply.body
        check(reply)
    count(inputs=1)


@FUZZ
@given(segments=path_segments)
# Found by this suite: these climbed out of /v1/ to any path of the upstream's host.
@example(segments=["chat", "..", "..", "admin"])
@example(segments=["x", "%2e%2e", "%2e%2e", "admin"])
@example(segments=["completions", "..%2f..%2fadmin"])
def test_path_tricks(target: Target, segments: list[str]) -> None:
    path = "/v1/" + "/".join(segments)
    reply = target.send(request(CHAT, path=path, key=target.key))
    if not is_malformed_http(reply):  # (a target aiohttp cannot parse)
        check(reply)
    count(inputs=1)
