"""CPU per request measured inside one process: steady on a busy machine.

``python -m bench.inproc [--stream [--events N ...]] [--subject proxy|governed|passthrough]
[--profile]``

One uvloop runs a canned upstream (a bare asyncio ``Protocol`` that answers every
request with the same bytes), the subject (the bare proxy app, the governed one, or
the plain passthrough of ``bench/passthrough.py``) and keep-alive clients of the same
bare kind. The process's own CPU time over N requests, minus what the clients and the
canned upstream cost alone (measured first, straight against each other), is the
subject's CPU per request. CPU time, not wall time, and one process, not three: other
load on the machine moves these figures far less than the wrk runs of
``bench.run``, so this is the tool to compare two versions of the hot path. It is
not an end-to-end figure (no real sockets between processes' schedulers, no fake
upstream logic): ``bench.run`` is.

*governed* is ``bench/governed.py``'s config and backends: the bench key with huge
rpm/tpm limits in a throwaway ``redis-server``, the usage ledger in a scratch
PostgreSQL database, metrics, and the access log (written to a file, as a worker's
stderr would be). Redis and PostgreSQL run in their own processes, off the measured
CPU: their own CPU is not counted, the proxy's side of talking to them is. The 16
clients send in step, so under this load the limiter's calls of one loop turn share
a write (ratelimit/shared.py): a best case for that batching, which ``bench.run``'s
wrk traffic checks. ``--off PART`` switches one part of governed mode off (repeat it
for several), to see what each costs: ``access-log``, ``limits`` (the key keeps no
limit: no Redis call), ``keys`` (no authentication at all, so no limits either),
``postgres`` (the ledger on SQLite, as bare).

*floor* is ``bench/floor.py``'s byte pipe: a read and a write each way per request and
nothing else, what any proxy on this loop pays at the least (docs/performance.md).

``--stream --events 8 --events 128`` measures streams of 10 and 130 events (content
events, the usage chunk, [DONE]), each answer written by the canned upstream at once,
so one read (or a few) per response whatever its length: the slope between the two
is the CPU per relayed event, the rest the cost per response and read.

``--tracing`` measures what OpenTelemetry tracing costs the bare proxy: three proxies
in one run (tracing off; on but every request sampled out; on and every request
sampled, its spans exported), measured in turn, round after round, so that a change
in the machine's load moves all three alike. The spans go to a collector that
answers every export with 200 unread, in this process (its CPU is counted: an
overestimate of the proxy's share, never an under-).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import os
import pstats
import resource
import statistics
import tempfile
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import msgspec
import uvloop
from aiohttp import web

from proxy.config import schema as cfg
from proxy.config.load import quick_start
from proxy.serve import setup_logging, start

from . import floor, governed, passthrough
from .run import BODY

_PLAIN_STREAM_BODY = BODY[:-1] + b',"stream":true}'
_STREAM_BODY = _PLAIN_STREAM_BODY[:-1] + b',"stream_options":{"include_usage":true}}'
_REPLY = (
    b'{"id":"chatcmpl-1","object":"chat.completion","created":1700000000,"model":"m",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"tok0 tok1 tok2 tok3",'
    b'"refusal":null},"logprobs":null,"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":12,"completion_tokens":4,"total_tokens":16}}'
)


def stream_answer(tokens: int) -> list[bytes]:
    """A chunked SSE answer of ``tokens`` content events, the usage chunk and [DONE]
    (tokens + 2 events), one chunked frame per event as streaming upstreams send them:
    the head with the first frame, then one part per frame (the last with the end)."""
    events = [
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"m","choices":[{"index":0,"delta":{"content":"tok%d "},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}\n\n' % i
        for i in range(tokens)
    ] + [
        b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,'
        b'"model":"m","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":%d,'
        b'"total_tokens":%d}}\n\n' % (tokens, tokens + 12),
        b"data: [DONE]\n\n",
    ]
    parts = [b"%x\r\n%s\r\n" % (len(e), e) for e in events]
    parts[0] = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + parts[0]
    )
    parts[-1] += b"0\r\n\r\n"
    return parts


CHAT_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
    % (len(_REPLY), _REPLY)
)


class Canned(asyncio.Protocol):
    """An upstream that answers each complete request (Content-Length bodies) at once,
    or, with a ``gap`` (seconds), one part of the answer after another, ``gap`` apart
    (so that the subject reads each on its own)."""

    def __init__(self, parts: list[bytes], gap: float = 0.0) -> None:
        self.parts = parts if gap else [b"".join(parts)]
        self.gap = gap
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end].lower()
            at = head.find(b"content-length:")
            size = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buf) < end + 4 + size:
                return
            self.buf = self.buf[end + 4 + size :]
            self._send(0)

    def _send(self, i: int) -> None:
        self.transport.write(self.parts[i])
        if i + 1 < len(self.parts):
            asyncio.get_running_loop().call_later(self.gap, self._send, i + 1)


class Client(asyncio.Protocol):
    """Sends the same request again each time the previous answer is complete, while
    ``budget`` lasts; ``done`` once every client is idle."""

    def __init__(self, request: bytes, budget: _Budget) -> None:
        self.request = request
        self.budget = budget
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._next()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.buf.endswith((b"0\r\n\r\n", b"}}")):  # a complete answer ends so
            return
        if not self.buf.startswith(b"HTTP/1.1 200"):
            self.budget.fail(self.buf[:300].decode(errors="replace"))
            return
        self.buf = b""
        self._next()

    def _next(self) -> None:
        if self.budget.take():
            self.transport.write(self.request)


class _Budget:
    def __init__(self, requests: int, clients: int) -> None:
        self.left = requests
        self.busy = clients
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def take(self) -> bool:
        if self.left > 0:
            self.left -= 1
            return True
        self.busy -= 1
        if self.busy == 0 and not self.done.done():
            self.done.set_result(None)
        return False

    def fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(reason))


async def drive(port: int, body: bytes, requests: int, conns: int) -> None:
    """``requests`` requests over ``conns`` keep-alive connections, with the bench key."""
    loop = asyncio.get_running_loop()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n"
        b"Content-Length: %d\r\n\r\n" % (governed.BENCH_KEY.encode(), len(body))
    )
    budget = _Budget(requests, conns)
    transports = []
    try:
        for _ in range(conns):
            transport, _ = await loop.create_connection(
                lambda: Client(head + body, budget), "127.0.0.1", port
            )
            transports.append(transport)
        await budget.done
    finally:
        for transport in transports:
            transport.close()


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread: the ledger's too
    return usage.ru_utime + usage.ru_stime


# Parts of governed mode that ``--off`` can switch off.
PARTS = ("access-log", "limits", "keys", "postgres")


def switched_off(config: dict[str, Any], parts: list[str], workdir: Path) -> dict[str, Any]:
    """``bench/governed.py``'s config with ``parts`` switched off."""
    if "access-log" in parts:
        config["server"]["access_log"] = "off"
    if "limits" in parts:
        for key in config["keys"]:
            del key["rpm"], key["tpm"]
    if "keys" in parts:
        config["auth"] = {"enabled": False}
        del config["keys"]
    if "postgres" in parts:
        config["database"] = {"sqlite_path": str(workdir / "ledger.db")}
        config["usage"] = {"spool_dir": str(workdir / "spool")}
    return config


async def subject(
    name: str,
    upstream: str,
    workdir: Path,
    backends: tuple[str, str] | None,
    off: list[str] | None = None,
    tracing: cfg.Tracing | None = None,
) -> web.AppRunner | floor.Pipe:
    """The subject's runner, listening on a free port (``backends``: governed's Redis
    URL and PostgreSQL DSN; ``off``: the parts of governed mode switched off;
    ``tracing``: the bare proxy's tracing settings)."""
    if name == "floor":
        address = urlsplit(upstream)
        return await floor.Pipe.start(address.hostname or "127.0.0.1", address.port or 80)
    if name == "passthrough":
        app = web.Application()
        app[passthrough.UPSTREAM] = upstream
        app.cleanup_ctx.append(passthrough.session)
        app.router.add_post("/v1/{path:.*}", passthrough.forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner
    if name == "governed":
        assert backends is not None
        redis, dsn = backends
        parts = switched_off(governed.governed(upstream, 0, 1, redis, dsn), off or [], workdir)
        config = governed.write(parts, workdir / "governed.json")
        setup_logging(config)  # as serve does: the access log is on at its level
        return await start(config)
    config = quick_start(upstream, "sk-upstream")
    replace = msgspec.structs.replace
    return await start(
        replace(
            config,
            server=replace(config.server, host="127.0.0.1", port=0, access_log="off"),
            auth=replace(config.auth, enabled=False),
            database=replace(config.database, sqlite_path=str(workdir / "ledger.db")),
            usage=replace(config.usage, spool_dir=str(workdir / "spool")),
            tracing=tracing or cfg.Tracing(),
        )
    )


async def canned(
    args: argparse.Namespace, answer: list[bytes]
) -> tuple[asyncio.Server, str, bytes, float]:
    """The canned upstream answering ``answer`` (its server and URL), the request body,
    and what the clients and the canned upstream cost alone, in µs per request
    (measured here)."""
    loop = asyncio.get_running_loop()
    gap = args.paced_ms / 1000
    server = await loop.create_server(lambda: Canned(answer, gap), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    body = (_PLAIN_STREAM_BODY if args.no_usage else _STREAM_BODY) if args.stream else BODY
    n, conns = args.requests, args.conns
    await drive(port, body, n // 10, conns)
    before = cpu()
    await drive(port, body, n, conns)
    harness = (cpu() - before) / n * 1e6
    return server, f"http://127.0.0.1:{port}/v1", body, harness


async def measure(
    args: argparse.Namespace, workdir: Path, backends: tuple[str, str] | None = None
) -> None:
    if not args.stream:
        await measure_one(args, workdir, backends, [CHAT_ANSWER])
        return
    costs = {}
    for tokens in args.events or [8]:
        costs[tokens + 2] = await measure_one(args, workdir, backends, stream_answer(tokens))
    if len(costs) > 1:
        (few, low), *_, (many, high) = sorted(costs.items())
        reads = "one read per event" if args.paced_ms else "each answer in one read"
        print(
            f"per relayed event: {(high - low) / (many - few):.2f} µs "
            f"(slope between {few} and {many} events per response, {reads}); "
            f"per response besides: {low - few * (high - low) / (many - few):.0f} µs"
        )


async def measure_one(
    args: argparse.Namespace,
    workdir: Path,
    backends: tuple[str, str] | None,
    answer: list[bytes],
) -> float:
    """The subject's best CPU µs per request against a canned ``answer``."""
    server, upstream, body, harness = await canned(args, answer)
    n, conns = args.requests, args.conns
    runner = await subject(args.subject, upstream, workdir, backends, args.off)
    port = runner.addresses[0][1]
    profile = cProfile.Profile() if args.profile else None
    try:
        await drive(port, body, n // 10, conns)  # warm up pools and caches
        costs = []
        for _ in range(args.repeat):
            if profile:
                profile.enable()
            before = cpu()
            await drive(port, body, n, conns)
            costs.append((cpu() - before) / n * 1e6 - harness)
            if profile:
                profile.disable()
    finally:
        await runner.cleanup()
        server.close()
    events = sum(part.count(b"data:") for part in answer)
    kind = f"chat stream of {events} events" if args.stream else "chat"
    if args.paced_ms:
        kind += f", one read each ({args.paced_ms:g} ms apart)"
    runs = ", ".join(f"{c:.0f}" for c in costs)
    name = args.subject + (f" without {', '.join(args.off)}" if args.off else "")
    print(
        f"{name}, {kind}, {conns} connections: {min(costs):.0f} µs CPU per request "
        f"(best of {runs}; clients + canned upstream alone: {harness:.0f} µs, subtracted)"
    )
    if profile:
        pstats.Stats(profile).sort_stats("tottime").print_stats(40)
    return min(costs)


# An OTLP/HTTP receiver that answers each complete export with 200, unread.
_ACCEPTED = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


async def measure_tracing(args: argparse.Namespace, workdir: Path) -> None:
    """CPU per request of the bare proxy with tracing off, sampled out and sampled."""
    answer = stream_answer(8) if args.stream else [CHAT_ANSWER]
    server, upstream, body, harness = await canned(args, answer)
    n, conns = args.requests, args.conns
    sink = await asyncio.get_running_loop().create_server(
        lambda: Canned([_ACCEPTED]), "127.0.0.1", 0
    )
    endpoint = f"http://127.0.0.1:{sink.sockets[0].getsockname()[1]}/v1/traces"
    variants = {
        "off": None,
        "sampled out": cfg.Tracing(endpoint=endpoint, sample_ratio=0.0),
        "sampled": cfg.Tracing(endpoint=endpoint, sample_ratio=1.0),
    }
    runners: dict[str, web.AppRunner | floor.Pipe] = {}
    costs: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for name, tracing in variants.items():
            sub = workdir / name.replace(" ", "-")
            sub.mkdir()
            runners[name] = await subject("proxy", upstream, sub, None, tracing=tracing)
            await drive(runners[name].addresses[0][1], body, n // 10, conns)  # warm up
        for _ in range(args.repeat):
            for name, runner in runners.items():
                before = cpu()
                await drive(runner.addresses[0][1], body, n, conns)
                await asyncio.sleep(0)
                costs[name].append((cpu() - before) / n * 1e6 - harness)
    finally:
        for runner in runners.values():
            await runner.cleanup()  # the exporter sends what is queued first
        server.close()
        sink.close()
    kind = "chat stream" if args.stream else "chat"
    base = min(costs["off"])
    print(
        f"proxy, {kind}, {conns} connections, tracing (best of {args.repeat} rounds; "
        f"clients + canned upstream alone: {harness:.1f} µs, subtracted):"
    )
    for name, runs in costs.items():
        # Each round's own difference too: what drifts between rounds (the machine's
        # other load) cancels in it.
        paired = statistics.median(c - o for c, o in zip(runs, costs["off"], strict=True))
        extra = (
            ""
            if name == "off"
            else f", {min(runs) - base:+.1f} µs against off (median per round {paired:+.1f})"
        )
        print(
            f"  {name}: {min(runs):.1f} µs CPU per request{extra} "
            f"(runs: {', '.join(f'{c:.1f}' for c in runs)})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__)
    parser.add_argument(
        "--subject", choices=("proxy", "governed", "passthrough", "floor"), default="proxy"
    )
    parser.add_argument("--stream", action="store_true", help="streamed chat (10 events)")
    parser.add_argument(
        "--events",
        type=int,
        action="append",
        help="--stream: content events per response (repeat it: the slope between the "
        "smallest and largest is the CPU per relayed event)",
    )
    parser.add_argument(
        "--paced-ms",
        type=float,
        default=0.0,
        help="--stream: the canned upstream sends one event every this many ms, so each "
        "is read on its own (the slope is then the cost per read and event)",
    )
    parser.add_argument(
        "--no-usage",
        action="store_true",
        help="--stream: the client does not ask for usage (the proxy asks and strips it)",
    )
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported")
    parser.add_argument("--profile", action="store_true", help="cProfile the measured runs")
    parser.add_argument(
        "--off", action="append", choices=PARTS, help="governed: switch this part off"
    )
    parser.add_argument(
        "--tracing", action="store_true", help="the bare proxy: tracing off, sampled out, sampled"
    )
    args = parser.parse_args()
    if args.off and args.subject != "governed":
        parser.error("--off is for --subject governed")
    if args.tracing and args.subject != "proxy":
        parser.error("--tracing is for --subject proxy")
    with tempfile.TemporaryDirectory(prefix="morngpt-inproc-") as tmp:
        workdir = Path(tmp)
        if args.tracing:
            uvloop.run(measure_tracing(args, workdir))
            return
        if args.subject != "governed":
            uvloop.run(measure(args, workdir))
            return
        # redis-server inherits this process's CPUs: let it run anywhere, as in
        # bench.run, not on the CPU measured here (``taskset -c 1``).
        pinned = os.sched_getaffinity(0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        # The access log (and any other log line) goes to a file, as a served
        # worker's stderr would; the upstream URL only matters to the migration.
        with (
            governed.backends(workdir, "http://127.0.0.1:9/v1") as backends,
            (workdir / "proxy.log").open("w") as log,
            contextlib.redirect_stderr(log),
        ):
            os.sched_setaffinity(0, pinned)
            uvloop.run(measure(args, workdir, backends))


if __name__ == "__main__":
    main()
