"""Answers the proxy writes itself (``proxy/http/lean.py``, on connections front.py parses
or aiohttp does) against aiohttp's own: the same request, answered once each way, must
give the same head (header for header, in order; only ``Date`` and the measured
overhead differ) and the same framing, in every HTTP version and connection mode, with
CORS on, and pipelined."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import re
import time

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.errors import ProxyError
from proxy.http import front, lean
from tests.support.env import UPSTREAM_KEY
from tests.support.inproc import MakeProxy, Proxy, with_server
from tests.support.rawhttp import CHAT, STREAM, Reply, connect, read_reply

ORIGIN = "https://app.example.com"
_VARYING = ("date:", "x-proxy-overhead-ms:")


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    config = quick_start(upstream.url, UPSTREAM_KEY)
    return await make_proxy(with_server(config, cors=cfg.Cors(allow_origins=[ORIGIN])))


def request(body: bytes, version: str, *headers: str) -> bytes:
    lines = [f"POST /v1/chat/completions {version}", "Host: proxy", "X-Request-Id: lean-1"]
    lines += [f"Content-Length: {len(body)}", "Content-Type: application/json", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def head_lines(reply: Reply) -> list[str]:
    """The head's lines as sent, minus those that differ from one answer to the next."""
    lines = reply.raw_head.decode("latin-1").split("\r\n")
    return [line for line in lines if line and not line.lower().startswith(_VARYING)]


async def exchange(proxy: Proxy, data: bytes, replies: int = 1) -> tuple[list[Reply], bool]:
    """Send ``data`` on a new connection and read the replies; then whether the
    connection is closed: another request is sent, and either answered or not."""
    port = int(proxy.url.rsplit(":", 1)[1])
    reader, writer = await connect(port)
    try:
        writer.write(data)
        await writer.drain()
        got = []
        for _ in range(replies):
            reply = await read_reply(reader)
            if not {"content-length", "transfer-encoding"} & reply.headers.keys():
                async with asyncio.timeout(10):  # HTTP/1.0 without a length: to the end
                    reply.body = await reader.read()
            got.append(reply)
        try:
            writer.write(request(CHAT, "HTTP/1.1"))
            await writer.drain()
            await read_reply(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return got, True
        return got, False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


CASES = {
    "1.1 keep-alive": request(CHAT, "HTTP/1.1", f"Origin: {ORIGIN}"),
    "1.1 close": request(CHAT, "HTTP/1.1", "Connection: close"),
    "1.0": request(CHAT, "HTTP/1.0"),
    "1.0 keep-alive": request(CHAT, "HTTP/1.0", "Connection: keep-alive", f"Origin: {ORIGIN}"),
    "1.1 stream": request(STREAM, "HTTP/1.1", f"Origin: {ORIGIN}"),
    "1.1 stream, close": request(STREAM, "HTTP/1.1", "Connection: close"),
    "1.0 stream": request(STREAM, "HTTP/1.0"),
    "1.1 other origin": request(CHAT, "HTTP/1.1", "Origin: https://evil.example"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_same_head_and_framing_as_aiohttp(
    proxy: Proxy, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    data = CASES[case]
    (mine,), mine_closed = await exchange(proxy, data)
    with monkeypatch.context() as patch:
        patch.setattr(lean, "head", lambda *args: None)  # every answer the ordinary way
        patch.setattr(front.Front, "_take", lambda *args: None)  # and aiohttp parses
        (theirs,), theirs_closed = await exchange(proxy, data)
    assert mine.status == theirs.status == 200
    assert head_lines(mine) == head_lines(theirs)
    assert mine_closed == theirs_closed
    assert (b"data: [DONE]" in mine.body) == (b"data: [DONE]" in theirs.body)
    assert len(mine.body) == len(theirs.body)


async def test_pipelined_answers_keep_their_order(proxy: Proxy) -> None:
    one = request(CHAT, "HTTP/1.1")
    two = request(STREAM, "HTTP/1.1")
    three = request(CHAT.replace(b'"a b c"', b'"x"'), "HTTP/1.1", "Connection: close")
    replies, closed = await exchange(proxy, one + two + three, replies=3)
    assert [r.status for r in replies] == [200, 200, 200]
    assert replies[0].headers["content-type"].startswith("application/json")
    assert replies[1].headers["transfer-encoding"] == "chunked"
    assert replies[1].body.endswith(b"data: [DONE]\n\n")
    assert replies[2].headers["connection"] == "close"
    assert closed


async def _nothing() -> bytes:
    return b""


def _call() -> lean.Incoming:
    """A request front.py parsed (no aiohttp to fall back to), for ``lean.head`` alone."""
    headers = CIMultiDictProxy(CIMultiDict[str]())
    return lean.Incoming(
        "POST", "chat/completions", "", headers, None, None, _nothing, _nothing, True, None
    )


@pytest.mark.parametrize(
    "value", ["a\x00b", "a\x01b", "a\x08", "a\rb", "a\nb", "a\r\nb", "\n\r", "a\x1fb", "\x7f"]
)
def test_a_head_with_a_control_character_is_refused(value: str) -> None:
    # As aiohttp's serializer would (a 500 where aiohttp serves): no such byte goes out,
    # whichever header (upstream's, the caller's) carried it.
    with pytest.raises(ProxyError):
        lean.head(_call(), 200, {"X-From-Upstream": value}, "Content-Length: 0", False)


@pytest.mark.parametrize("value", ["a\tb", "café", "\x85\xa0", ""])
def test_a_head_with_tabs_and_other_text_is_written(value: str) -> None:
    made = lean.head(_call(), 200, {"X-From-Upstream": value}, "Content-Length: 0", False)
    assert made is not None
    data, keep_alive = made
    assert f"\r\nX-From-Upstream: {value}\r\n".encode() in data
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert data.index(b"\r\n\r\n") == len(data) - 4
    assert keep_alive


def test_the_date_line_is_the_current_second_in_http_form() -> None:
    """The Date line is made once a second (``lean._DATE``), in the form aiohttp
    writes (the byte comparisons above leave the Date out: it moves)."""
    before = time.time()
    line = lean._DATE.now()
    after = time.time()
    assert re.fullmatch(
        r"Date: [A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT", line
    )
    when = email.utils.parsedate_to_datetime(line.removeprefix("Date: ")).timestamp()
    assert int(before) <= when <= after
    assert lean._DATE.now() is line or int(time.time()) != int(after)  # kept for its second
