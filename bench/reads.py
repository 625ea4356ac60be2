"""The relay's work on one upstream read of a stream, alone: ``python -m bench.reads``.

``_Relay.cut`` (the cut at event boundaries, the byte scans, the strip of the
``"usage":null`` the proxy asked for, the parse of the events it must read) on the
canned answers nginx serves in ``bench.run``'s table (e) (``fake_upstream.canned_chat``),
each arriving in one read as they do from nginx: one event (what an upstream that
sends tokens as they come sends in a read), 8 and 60 tokens with the usage chunk
and [DONE], a 60-token read without them (one from the middle of a stream), and the
60 tokens as a hosted model's stream reads (ids, model name, words for tokens). Each
with the client asking for usage and with the usage injected and stripped. Best of
``--repeat`` runs of ``--number`` calls, in µs a read.

The last column is the work before the cut: the same read as the chunked response a
streaming upstream sends (one chunk frame per event, the head first), fed to a real
upstream connection (``h1_conn.Connection.data_received``: llhttp, the frames' bytes
gathered, the response's end) and taken whole, as the relay's pump takes it.

Before and after a change: run it on both trees, alternated, e.g. ``PYTHONPATH=../old
python -m bench.reads`` then ``python -m bench.reads`` (pin it: ``taskset -c 1``).
"""

from __future__ import annotations

import argparse
import asyncio
import timeit
from collections.abc import Sequence
from typing import Any

from bench.fake_upstream import canned_chat
from proxy.exchange import Exchange
from proxy.http.h1_conn import Connection, Origin
from proxy.http.relay import _Relay

# Words for the tokens of "60, prose": a scan's speed depends on the bytes it scans
# (CPython's ``count`` skips ahead where the next byte is none of the needle's).
_WORDS = (
    b"the of and to in is you that it was for on are as with his they at be this have "
    b"from or one had by word but not what all were we when your can said there use an "
    b"each which she do how their if will up other about out many then them these so"
).split()


def reads() -> dict[str, bytes]:
    long = canned_chat(60, stream=True)
    middle = long[: long.index(b'"choices":[]')]  # up to the usage chunk ...
    middle = middle[: middle.rindex(b"\n\n") + 2]  # ... without it
    # As a hosted model's stream reads: its ids and model name, words for tokens.
    prose = long.replace(b'"chatcmpl-canned"', b'"chatcmpl-AbCdEfGhIjKlMnOpQrStUvWxYz012"')
    prose = prose.replace(
        b'"bench-model"', b'"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_0aa8d3e20b"'
    )
    for i in range(60):
        words = b" ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(1 + i % 3))
        prose = prose.replace(b'"tok%d "' % i, b'"%s "' % words)
    return {
        "1 event": long.split(b"\n\n")[2] + b"\n\n",  # one token's chunk
        "8 tokens": canned_chat(8, stream=True),
        "60 tokens": long,
        "60, middle": middle,
        "60, prose": prose,
    }


def cost(read: bytes, strip: bool, number: int, repeat: int) -> float:
    """µs of one ``_Relay.cut`` of ``read`` by a new relay, best of ``repeat``."""
    exchange = Exchange("bench", "/v1/chat/completions")

    def cut() -> None:
        _Relay(exchange, strip).cut(read)

    return min(timeit.repeat(cut, number=number, repeat=repeat)) / number * 1e6


def framed(read: bytes) -> bytes:
    """``read`` as a chunked HTTP/1.1 response, one chunk frame per event."""
    events = [event + b"\n\n" for event in read.split(b"\n\n")[:-1]]
    frames = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in events)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    return head + b"\r\n" + frames + b"0\r\n\r\n"


class _Pool:
    """What a ``Connection`` asks of its client, doing nothing."""

    def __init__(self) -> None:
        self.busy: set[Connection] = set()
        self.closed = False

    def _idle(self, conn: Connection, origin: Origin) -> None: ...

    def _release(self, origin: Origin) -> None: ...


class _Transport:
    """Swallows the request a ``Connection`` sends."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: Any) -> None: ...


async def framed_cost(read: bytes, number: int, repeat: int) -> float:
    """µs of one response of ``framed(read)`` through a kept-alive upstream connection:
    its request sent, the bytes in (one ``data_received``), its body taken whole."""
    response = framed(read)
    conn = Connection(_Pool(), Origin("http://127.0.0.1:9"))
    conn.transport = _Transport()  # type: ignore[assignment]

    def one() -> None:
        answer = conn.send(b"", None, None)
        conn.data_received(response)
        body = answer.body_if_complete()
        assert body == read
        answer.close()

    return min(timeit.repeat(one, number=number, repeat=repeat)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    print(
        f"{'read':12} {'bytes':>6} {'usage asked':>12} {'stripped':>9} {'framed':>7}  (µs a read)"
    )
    for name, read in reads().items():
        asked, stripped = (cost(read, strip, args.number, args.repeat) for strip in (False, True))
        frames = asyncio.run(framed_cost(read, args.number, args.repeat))
        print(f"{name:12} {len(read):6d} {asked:12.2f} {stripped:9.2f} {frames:7.2f}")


if __name__ == "__main__":
    main()
