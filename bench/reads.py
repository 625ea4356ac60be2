"""The relay's work on one upstream read of a stream, alone: ``python -m bench.reads``.

``_Relay.cut`` (the cut at event boundaries, the byte scans, the strip of the
``"usage":null`` the proxy asked for, the parse of the events it must read) on the
canned answers nginx serves in ``bench.run``'s table (e) (``fake_upstream.canned_chat``),
each arriving in one read as they do from nginx: 8 and 60 tokens with the usage chunk
and [DONE], and a 60-token read without them (one from the middle of a stream). Each
with the client asking for usage and with the usage injected and stripped. Best of
``--repeat`` runs of ``--number`` calls, in µs a read.

Before and after a change: run it on both trees, alternated, e.g. ``PYTHONPATH=../old
python -m bench.reads`` then ``python -m bench.reads`` (pin it: ``taskset -c 1``).
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Sequence

from bench.fake_upstream import canned_chat
from proxy.exchange import Exchange
from proxy.http.relay import _Relay


def reads() -> dict[str, bytes]:
    long = canned_chat(60, stream=True)
    middle = long[: long.index(b'"choices":[]')]  # up to the usage chunk ...
    middle = middle[: middle.rindex(b"\n\n") + 2]  # ... without it
    return {"8 tokens": canned_chat(8, stream=True), "60 tokens": long, "60, middle": middle}


def cost(read: bytes, strip: bool, number: int, repeat: int) -> float:
    """µs of one ``_Relay.cut`` of ``read`` by a new relay, best of ``repeat``."""
    exchange = Exchange("bench", "/v1/chat/completions")

    def cut() -> None:
        _Relay(exchange, strip).cut(read)

    return min(timeit.repeat(cut, number=number, repeat=repeat)) / number * 1e6


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--number", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    print(f"{'read':12} {'bytes':>6} {'usage asked':>12} {'stripped':>9}  (µs a read)")
    for name, read in reads().items():
        asked, stripped = (cost(read, strip, args.number, args.repeat) for strip in (False, True))
        print(f"{name:12} {len(read):6d} {asked:12.2f} {stripped:9.2f}")


if __name__ == "__main__":
    main()
