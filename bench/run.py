"""The benchmark: ``python -m bench.run [--quick] [--mode bare|governed|both]``.

Starts the fast fake upstream, then, one at a time, each subject in front of it — the
upstream called directly, the plain aiohttp passthrough (``bench/passthrough.py``),
the proxy bare and (when the tree has it) governed — and measures every subject the
same way:

(a) latency at concurrency 1 (wrk), as added to the direct call;
(b) throughput at concurrency 16/64/256, non-streamed and streamed (wrk), with the
    subject's CPU seconds per request (/proc, all its processes) and its RSS;
(c) streaming fidelity on paced streams: added time to first event, added gap between
    events, and the most concurrent paced streams served with no stall;
(d) for the proxy, throughput with two workers against one (both servers up, measured
    in turn, round after round);
(e) the proxy and the thin relay measured in turn, round after round, in front of
    nginx serving canned answers (``bench/nginx.py``), an upstream that is never the
    bottleneck: issue #17's ratios.

Figures are printed as a Markdown report (``--out FILE`` writes it too): absolutes
plus ratios to the direct run of the same invocation, and the machine they came from.
All traffic stays on 127.0.0.1. Linux only (taskset, /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from . import governed as modes
from . import nginx, report, streams, wrk
from .procs import (
    ROOT,
    Layout,
    Service,
    cpu_seconds,
    free_port,
    peak_rss_mb,
    pinned,
    preempted,
    python,
    rss_mb,
)

MESSAGES = (
    b'[{"role":"system","content":"You are a helpful assistant."},'
    b'{"role":"user","content":"Write one short sentence about load testing proxies."}]'
)
BODY = b'{"model":"bench-model","messages":' + MESSAGES + b',"max_tokens":64}'
STREAM_BODY = BODY[:-1] + b',"stream":true}'
# The stream probes ask for usage themselves: without it the proxy asks the upstream for
# the usage chunk and drops it, and the (paced) upstream's pause before that chunk
# would show as one doubled gap that a direct call does not have.
PROBE_BODY = STREAM_BODY[:-1] + b',"stream_options":{"include_usage":true}}'
# A chat stream of N tokens: role chunk + N + finish chunk + usage chunk + [DONE].
PROBE_EVENTS_EXTRA = 4
# Issue #17's streams: 60 tokens, so 63 events (64 with the usage chunk) per response;
# one kind where the client asks for usage, one where the proxy injects and strips it.
LONG_TOKENS = 60
KINDS = {
    "chat": BODY,
    "chat stream": STREAM_BODY,
    "long stream": STREAM_BODY,
    "long stream +usage": PROBE_BODY,
}
# Tokens of a chat answer and of each streamed kind's (x-fake-chunks).
CHAT_TOKENS = 8
KIND_TOKENS = {
    "chat stream": CHAT_TOKENS,
    "long stream": LONG_TOKENS,
    "long stream +usage": LONG_TOKENS,
}
# The long kinds are measured at 64 connections only (the figure).
LONG_KINDS = ("long stream", "long stream +usage")
LONG_CONNS = 64
# Memory per open stream: RSS with this many slow paced streams open (few events, far
# apart, so that neither the upstream nor the probe is the bottleneck).
MEMORY_LEVELS = (100, 1000)
MEMORY_GAP_MS = 400.0
MEMORY_EVENTS = 6


@dataclass(frozen=True)
class Settings:
    seconds: float  # per wrk run
    repeat: int  # wrk runs per figure; the median is reported
    ttft_streams: int  # sequential short streams for time to first event
    capacity: tuple[int, ...]  # concurrent paced streams tried, in order
    concurrency: tuple[int, ...] = (16, 64, 256)
    paced_streams: int = 8
    paced_chunks: int = 64
    paced_gap_ms: float = 20.0


# Connection counts of the worker scaling (d), and the fewest rounds it takes turns in.
SCALING_CONNS = (64, 256)
SCALING_ROUNDS = 3
# Connections and fewest rounds of the proxy and the relay measured in turns (e).
TURN_CONNS = 64
TURN_ROUNDS = 3
QUICK = Settings(seconds=2, repeat=1, ttft_streams=50, capacity=(100, 250, 500, 1000))
FULL = Settings(seconds=5, repeat=3, ttft_streams=200, capacity=(100, 250, 500, 1000, 1500, 2000))


# Builds a proxy config for (upstream base URL, port, workers).
MakeConfig = Callable[[str, int, int], dict[str, object]]


@dataclass
class Subject:
    """Something requests can be sent to, and the processes whose cost is counted."""

    name: str
    base: str  # base URL ending in /v1
    pids: Callable[[], list[int]]
    workers: int = 1


@dataclass
class Measured:
    """Everything measured for one subject (wrk latencies in µs, stream figures in ms)."""

    name: str
    latency: wrk.Result
    cpu_c1_us: float
    throughput: dict[tuple[str, int], report.Point]
    rss_mb: float
    ttft: streams.Fidelity
    paced: streams.Fidelity
    capacity: list[tuple[int, streams.Fidelity]]
    peak_rss_mb: float
    # RSS (MB, all the subject's processes) with n slow streams open, by n.
    open_rss_mb: dict[int, float]


class Bench:
    """One invocation: the upstream, the wrk scripts, and how subjects are measured."""

    def __init__(self, settings: Settings, layout: Layout, workdir: Path) -> None:
        self.settings = settings
        self.layout = layout
        self.workdir = workdir
        self.scripts = {
            kind: wrk.script(
                workdir,
                kind.replace(" ", "-").replace("+", ""),
                body,
                {
                    **_HEADERS,
                    **({"x-fake-chunks": str(KIND_TOKENS[kind])} if kind in KIND_TOKENS else {}),
                },
            )
            for kind, body in KINDS.items()
        }
        self.canned = nginx.start(workdir, layout.upstream, CHAT_TOKENS, KIND_TOKENS.values())
        try:
            self.upstream = self._start_upstream()
        except BaseException:
            self.canned[0].stop()  # close() is only for a Bench that was made
            raise

    def _start_upstream(self) -> tuple[Service, str]:
        port = free_port()
        argv = [python(), "-m", "bench.fake_upstream", "--port", str(port)]
        argv += ["--chunks", str(CHAT_TOKENS)]
        service = Service(
            "upstream", pinned(argv, self.layout.upstream), self.workdir, self._log("upstream")
        )
        service.wait_for("listening on")
        return service, f"http://127.0.0.1:{port}/v1"

    def _log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def direct(self) -> Subject:
        service, url = self.upstream
        return Subject("direct", url, service.pids)

    def passthrough(
        self, upstream: str | None = None
    ) -> contextlib.AbstractContextManager[Subject]:
        """The thin relay, in front of ``upstream`` (default: the fake upstream)."""
        port = free_port()
        argv = [python(), "-m", "bench.passthrough", "--upstream", upstream or self.upstream[1]]
        argv += ["--port", str(port)]
        return self._serving("passthrough", argv, port, self.layout.proxy, 1, "Running on")

    def proxy(
        self,
        name: str,
        config: MakeConfig,
        workers: int,
        cpus: frozenset[int] | None,
        upstream: str | None = None,
        root: Path = ROOT,
    ) -> contextlib.AbstractContextManager[Subject]:
        """The proxy of the tree at ``root``, in front of ``upstream`` (default: the
        fake upstream)."""
        port = free_port()
        path = self.workdir / f"{name}.json"
        checked = modes.write(config(upstream or self.upstream[1], port, workers), path)
        argv = [python(), "-m", "proxy", "serve", "--config", str(path)]
        if not checked.auth.enabled:
            argv.append("--no-auth")
        return self._serving(name, argv, port, cpus, workers, "listening on", root)

    @contextlib.contextmanager
    def _serving(
        self,
        name: str,
        argv: list[str],
        port: int,
        cpus: frozenset[int] | None,
        workers: int,
        ready: str,
        root: Path = ROOT,
    ) -> Iterator[Subject]:
        """Run a server for the duration of the block; ready once its log showed
        ``ready`` once per worker."""
        service = Service(name, pinned(argv, cpus), self.workdir, self._log(name), root)
        try:
            service.wait_for(ready, count=workers)
            yield Subject(name, f"http://127.0.0.1:{port}/v1", service.pids, workers)
        finally:
            service.stop()

    # ------------------------------------------------------------------ measuring

    def load(self, subject: Subject, kind: str, connections: int) -> tuple[wrk.Result, float]:
        """Median wrk result over the repeats, and the subject's median CPU µs/request."""
        runs = [self.once(subject, kind, connections) for _ in range(self.settings.repeat)]
        return median_of(runs)

    def once(self, subject: Subject, kind: str, connections: int) -> tuple[wrk.Result, float]:
        """One wrk run, and the subject's CPU µs per request in it."""
        url = f"{subject.base}/chat/completions"
        before = cpu_seconds(subject.pids())
        result = wrk.run(
            url, self.scripts[kind], connections, self.settings.seconds, self.layout.load
        )
        spent = cpu_seconds(subject.pids()) - before
        return result, spent / result.requests * 1e6 if result.requests else float("nan")

    def measure(self, subject: Subject) -> Measured:
        print(f"  {subject.name}: warm-up, latency", flush=True)
        url = f"{subject.base}/chat/completions"
        wrk.run(url, self.scripts["chat"], 16, 1, self.layout.load)  # warm pools and caches
        # Memory per open stream first: the heap does not give back what heavier load
        # (the 1,000-stream capacity try) took, and the slope from there would read ~0.
        print(f"  {subject.name}: memory per open stream", flush=True)
        held = {n: self.open_rss(subject, n) for n in MEMORY_LEVELS}
        latency, cpu_c1 = self.load(subject, "chat", 1)
        print(f"  {subject.name}: throughput", flush=True)
        throughput = {}
        for kind in KINDS:
            levels = (LONG_CONNS,) if kind in LONG_KINDS else self.settings.concurrency
            for conns in levels:
                result, cost = self.load(subject, kind, conns)
                throughput[kind, conns] = report.Point(result.rps, cost, result.failed)
        rss = max(rss_mb(subject.pids()), default=float("nan"))
        print(f"  {subject.name}: streams", flush=True)
        ttft, paced, capacity = self.stream_fidelity(subject)
        peak = max(peak_rss_mb(subject.pids()), default=float("nan"))
        return Measured(
            subject.name, latency, cpu_c1, throughput, rss, ttft, paced, capacity, peak, held
        )

    def open_rss(self, subject: Subject, count: int) -> float:
        """The subject's RSS (MB, its processes summed) while ``count`` slow paced
        streams are open at once: read once every stream has started and none ended."""
        target = streams.Target.of(subject.base, _KEY)
        request = target.request(PROBE_BODY, MEMORY_EVENTS, MEMORY_GAP_MS)
        ramp = 1.0
        # Streams last (events + 3) gaps; the last starts at ``ramp``: read in between.
        assert ramp + 0.8 < (MEMORY_EVENTS + 3) * MEMORY_GAP_MS / 1000

        async def probe() -> float:
            running = asyncio.ensure_future(streams.concurrent(target, request, count, ramp))
            await asyncio.sleep(ramp + 0.5)
            size = sum(rss_mb(subject.pids()))
            traces = await running
            done = sum(1 for t in traces if t.done)
            if done < count:
                print(f"  {subject.name}: {count - done} of {count} slow streams broke")
            return size

        return uvloop.run(probe())

    def stream_fidelity(
        self, subject: Subject
    ) -> tuple[streams.Fidelity, streams.Fidelity, list[tuple[int, streams.Fidelity]]]:
        """Time to first event, gaps on a few paced streams, then capacity: ever more
        concurrent paced streams until a level is not clean."""
        s = self.settings
        target = streams.Target.of(subject.base, _KEY)
        short = target.request(PROBE_BODY, 8, 0)
        traces = uvloop.run(streams.sequential(target, short, s.ttft_streams))
        ttft = streams.Fidelity.of(traces, 8 + PROBE_EVENTS_EXTRA, 0)
        paced = target.request(PROBE_BODY, s.paced_chunks, s.paced_gap_ms)
        expected = s.paced_chunks + PROBE_EVENTS_EXTRA
        traces = uvloop.run(streams.concurrent(target, paced, s.paced_streams, ramp=0.1))
        gaps = streams.Fidelity.of(traces, expected, s.paced_gap_ms)
        capacity = []
        for level in s.capacity:
            traces = uvloop.run(streams.concurrent(target, paced, level, ramp=1.0))
            fidelity = streams.Fidelity.of(traces, expected, s.paced_gap_ms)
            capacity.append((level, fidelity))
            if not fidelity.clean:
                break
        return ttft, gaps, capacity

    def mode(self, name: str, config: MakeConfig) -> tuple[Measured, report.Scaling, report.Turns]:
        """Measure the proxy in one mode: one pinned worker, the worker scaling, then
        the proxy and the thin relay in turns."""
        print(f"measuring {name}", flush=True)
        with self.proxy(name, config, 1, self.layout.proxy) as subject:
            measured = self.measure(subject)
        return measured, self.scaling(name, config), self.turns(name, config)

    def turns(self, name: str, config: MakeConfig) -> report.Turns:
        """The proxy (one worker) and the thin relay, both up and pinned to the proxy's
        CPU, in front of the canned upstream (nginx), measured in turn at 64
        connections, kind by kind, round after round (at least ``TURN_ROUNDS``): issue
        #17's ratios, each the median of the rounds' own ratios, so that the machine's
        load drifting between subjects does not read as a difference between them."""
        print(f"  {name}: in turns with the relay", flush=True)
        own = self.own_ledger(config, f"{name}-turns")
        with (
            self.passthrough(self.canned[1]) as relay,
            self.proxy(f"{name}-turns", own, 1, self.layout.proxy, self.canned[1]) as mine,
        ):
            return self.in_turns(name, relay, mine, report.RELAY_KINDS)

    def in_turns(
        self, name: str, base: Subject, other: Subject, kinds: Sequence[str]
    ) -> report.Turns:
        """``base`` and ``other`` (both up, on the same CPUs) measured one after the
        other at ``TURN_CONNS`` connections, kind by kind, round after round (at least
        ``TURN_ROUNDS``; which goes first alternates): per kind, the medians of their CPU
        µs per request and of each round's own ratio, other ÷ base."""
        for subject in (base, other):
            url = f"{subject.base}/chat/completions"
            wrk.run(url, self.scripts["chat"], 16, 1, self.layout.load)
        runs: dict[str, list[tuple[float, float]]] = {}
        for turn in range(max(TURN_ROUNDS, self.settings.repeat)):
            swapped = turn % 2 == 1
            for kind in kinds:
                first, second = (other, base) if swapped else (base, other)
                costs = (
                    self.once(first, kind, TURN_CONNS)[1],
                    self.once(second, kind, TURN_CONNS)[1],
                )
                runs.setdefault(kind, []).append((costs[1], costs[0]) if swapped else costs)
        med = statistics.median
        return report.Turns(
            name,
            {
                kind: (
                    med(b for b, _ in pairs),
                    med(c for _, c in pairs),
                    med(c / b for b, c in pairs),
                )
                for kind, pairs in runs.items()
            },
        )

    def scaling(self, name: str, config: MakeConfig) -> report.Scaling:
        """Throughput with one worker and with two, both free to use every CPU. Both
        servers run through the whole measurement and take turns, round after round
        (at least ``SCALING_ROUNDS``): a change in the machine's load moves both alike,
        where one measured after the other would take it as the workers' doing. Each
        figure is the median of its rounds."""
        cpus = self.layout.every
        rounds = max(SCALING_ROUNDS, self.settings.repeat)
        with (
            self.proxy(f"{name}-1w", self.own_ledger(config, "1w"), 1, cpus) as one,
            self.proxy(f"{name}-2w", self.own_ledger(config, "2w"), 2, cpus) as two,
        ):
            subjects = {1: one, 2: two}
            for subject in subjects.values():
                url = f"{subject.base}/chat/completions"
                wrk.run(url, self.scripts["chat"], 16, 1, self.layout.load)
            runs: dict[tuple[int, int], list[tuple[wrk.Result, float]]] = {}
            switches: dict[tuple[int, int], list[float]] = {}
            for _ in range(rounds):
                for conns in SCALING_CONNS:
                    for workers, subject in subjects.items():
                        before = preempted(subject.pids())
                        result, cost = self.once(subject, "chat", conns)
                        after = preempted(subject.pids()) - before
                        runs.setdefault((workers, conns), []).append((result, cost))
                        switches.setdefault((workers, conns), []).append(
                            after / result.requests if result.requests else float("nan")
                        )
        points: dict[int, dict[int, report.Point]] = {}
        per_request: dict[int, dict[int, float]] = {}
        for (workers, conns), measured in runs.items():
            result, cost = median_of(measured)
            points.setdefault(workers, {})[conns] = report.Point(result.rps, cost, result.failed)
            median = statistics.median(switches[workers, conns])
            per_request.setdefault(workers, {})[conns] = median
        return report.Scaling(name, points, per_request)

    def own_ledger(self, config: MakeConfig, tag: str) -> MakeConfig:
        """``config`` with a ledger database (SQLite) and spool directory of its own, for
        a server that runs beside another of the same mode."""

        def made(upstream: str, port: int, workers: int) -> dict[str, object]:
            made = config(upstream, port, workers)
            own = self.workdir / tag
            if "database" not in made:
                made["database"] = {"sqlite_path": str(own / "ledger.db")}
            made["usage"] = {"spool_dir": str(own / "spool")}
            return made

        return made

    def close(self) -> None:
        self.upstream[0].stop()
        self.canned[0].stop()


_KEY = modes.BENCH_KEY
_HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {_KEY}"}


def median_of(runs: Sequence[tuple[wrk.Result, float]]) -> tuple[wrk.Result, float]:
    """The median wrk result and the median CPU µs per request of ``runs``."""
    return median_result([r for r, _ in runs]), statistics.median(c for _, c in runs)


def median_result(results: Sequence[wrk.Result]) -> wrk.Result:
    if len(results) == 1:
        return results[0]
    med = statistics.median
    return wrk.Result(
        requests=int(med(r.requests for r in results)),
        seconds=med(r.seconds for r in results),
        errors=sum(r.errors for r in results),
        non2xx=sum(r.non2xx for r in results),
        p50=med(r.p50 for r in results),
        p90=med(r.p90 for r in results),
        p99=med(r.p99 for r in results),
        max=max(r.max for r in results),
        mean=med(r.mean for r in results),
    )


# ------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="short runs (~3 min a mode)")
    parser.add_argument("--mode", choices=("bare", "governed", "both"), default="both")
    parser.add_argument("--out", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    settings = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so every server this run started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    wrk.ensure_installed()
    layout = Layout.for_machine()
    if layout.load is not None:
        os.sched_setaffinity(0, layout.load)  # the stream probes are load too
    command = "python -m bench.run " + " ".join(sys.argv[1:] if argv is None else argv)
    lacking = modes.missing() if args.mode != "bare" else []
    results: list[Measured] = []
    scaling: list[report.Scaling] = []
    with tempfile.TemporaryDirectory(prefix="morngpt-bench-") as tmp:
        bench = Bench(settings, layout, Path(tmp))
        try:
            up = bench.upstream[1]
            print("measuring direct", flush=True)
            results.append(bench.measure(bench.direct()))
            print("measuring passthrough", flush=True)
            with bench.passthrough() as subject:
                results.append(bench.measure(subject))
            runs = []
            if args.mode in ("bare", "both"):
                runs.append(bench.mode("bare", modes.bare))
            if args.mode in ("governed", "both") and not lacking:
                with modes.backends(bench.workdir, up) as (redis, dsn):

                    def config(upstream: str, port: int, workers: int) -> dict[str, object]:
                        return modes.governed(upstream, port, workers, redis, dsn)

                    runs.append(bench.mode("governed", config))
            results += [measured for measured, _, _ in runs]
            scaling += [scaled for _, scaled, _ in runs]
            turns = [paired for _, _, paired in runs]
        finally:
            bench.close()
    text = report.render(command, settings, layout, results, scaling, lacking, turns)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
