"""The benchmark's Markdown report: the machine, the figures as absolutes and as ratios
to the direct run of the same invocation, and the issue #7 goals checked."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from .procs import Layout

if TYPE_CHECKING:
    from .run import Measured, Settings


@dataclass(frozen=True)
class Point:
    """One throughput figure: requests per second, the subject's CPU µs per request,
    and requests that failed (connection errors or non-2xx)."""

    rps: float
    cpu_us: float
    failed: int


@dataclass(frozen=True)
class Scaling:
    """Throughput of one proxy mode with 1 and 2 workers, by connection count."""

    name: str
    points: dict[int, dict[int, Point]]
    # Involuntary context switches per request (procs.preempted), by workers and conns.
    preempted: dict[int, dict[int, float]]

    def ratio(self, conns: int) -> float:
        return self.points[2][conns].rps / self.points[1][conns].rps


@dataclass(frozen=True)
class Turns:
    """One proxy mode and the thin relay measured in turn, kind by kind, round after
    round (issue #17's ratios): per kind, the medians of the relay's and the proxy's
    CPU µs per request and of each round's own ratio."""

    name: str
    costs: dict[str, tuple[float, float, float]]


def machine() -> list[str]:
    cpu = "unknown CPU"
    for line in open("/proc/cpuinfo").read().splitlines():  # noqa: SIM115
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split()[:2]
    return [
        f"{os.cpu_count()} x {cpu}, Linux {platform.release()}",
        f"Python {platform.python_version()}, aiohttp {metadata.version('aiohttp')}, "
        f"uvloop {metadata.version('uvloop')}, {' '.join(wrk_version)}",
        f"load average before the run: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _f(value: float, digits: int = 0) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:,.{digits}f}"


def _x(value: float, base: float) -> str:
    return "-" if not base or math.isnan(value) or math.isnan(base) else f"{value / base:.2f}x"


def render(
    command: str,
    settings: Settings,
    layout: Layout,
    results: Sequence[Measured],
    scaling: Sequence[Scaling],
    lacking: Sequence[str],
    turns: Sequence[Turns] = (),
) -> str:
    direct = results[0]
    out = [f"## `{command}` — {time.strftime('%Y-%m-%d %H:%M')}", ""]
    out += [f"- {line}" for line in machine()]
    out.append(f"- pinning: {layout.note}")
    out.append(
        f"- each wrk figure: median of {settings.repeat} run(s) of {settings.seconds:g} s; "
        "CPU = utime+stime of the subject's processes (/proc) ÷ requests"
    )
    if lacking:
        out.append(
            "- **governed mode: not available in this tree** — missing: " + "; ".join(lacking)
        )
    out += ["", *_latency(results, direct), "", *_throughput(results, direct)]
    out += ["", *_streams(results, direct, settings)]
    if scaling:
        out += ["", *_scaling(scaling)]
    out += ["", *_goals(results, direct, scaling)]
    if turns:
        out += ["", *_turns(turns)]
    out += ["", *_relay_goals(results, scaling, turns)]
    return "\n".join(out) + "\n"


def _latency(results: Sequence[Measured], direct: Measured) -> list[str]:
    base = direct.latency
    rows = [
        "### (a) Latency at concurrency 1, non-streamed chat (wrk, µs)",
        "",
        "| subject | p50 | p99 | added p50 | added p99 | p50 x direct | CPU µs/req |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lat = r.latency
        added = (lat.p50 - base.p50, lat.p99 - base.p99) if r is not direct else (0.0, 0.0)
        rows.append(
            f"| {r.name} | {_f(lat.p50)} | {_f(lat.p99)} | {_f(added[0])} | {_f(added[1])} "
            f"| {_x(lat.p50, base.p50)} | {_f(r.cpu_c1_us)} |"
        )
    return rows


def _throughput(results: Sequence[Measured], direct: Measured) -> list[str]:
    rows = [
        "### (b) Throughput (wrk) and CPU per request",
        "",
        "CPU µs/req is the subject's own: for *direct* it is the fake upstream's.",
        "",
        "| subject | kind | conns | req/s | x direct | CPU µs/req | req/s per core | failed |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        for (kind, conns), p in r.throughput.items():
            base = direct.throughput[kind, conns]
            per_core = 1e6 / p.cpu_us if p.cpu_us else float("nan")
            rows.append(
                f"| {r.name} | {kind} | {conns} | {_f(p.rps)} | {_x(p.rps, base.rps)} "
                f"| {_f(p.cpu_us)} | {_f(per_core)} | {p.failed} |"
            )
    rows += ["", "| subject | RSS after load (MB, largest process) | peak RSS (MB) |"]
    rows.append("| --- | ---: | ---: |")
    rows += [f"| {r.name} | {_f(r.rss_mb, 1)} | {_f(r.peak_rss_mb, 1)} |" for r in results]
    return rows


def _streams(results: Sequence[Measured], direct: Measured, settings: Settings) -> list[str]:
    d_ttft, d_paced = direct.ttft, direct.paced
    rows = [
        "### (c) Streaming fidelity (ms)",
        "",
        f"TTFT: {settings.ttft_streams} short streams one after another (time to the first "
        "SSE event; the probes ask for usage themselves, so every subject relays the same "
        f"events). Gaps: {settings.paced_streams} concurrent streams of "
        f"{settings.paced_chunks} events {settings.paced_gap_ms:g} ms apart. Capacity: "
        f"the most concurrent such streams (tried: {', '.join(map(str, settings.capacity))}) "
        f"with every stream complete and no gap over {2 * settings.paced_gap_ms:g} ms.",
        "",
        "| subject | TTFT p50 | added | TTFT p99 | gap p50 | gap p99 | added gap p99 "
        "| gap max | capacity |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        t, p = r.ttft, r.paced
        clean = [level for level, f in r.capacity if f.clean]
        rows.append(
            f"| {r.name} | {_f(t.ttft_p50, 2)} | {_f(t.ttft_p50 - d_ttft.ttft_p50, 2)} "
            f"| {_f(t.ttft_p99, 2)} | {_f(p.gap_p50, 2)} | {_f(p.gap_p99, 2)} "
            f"| {_f(p.gap_p99 - d_paced.gap_p99, 2)} | {_f(p.gap_max, 1)} "
            f"| {max(clean) if clean else 0} |"
        )
    rows += ["", "Capacity runs (streams: stalled / broken, worst gap ms):", ""]
    for r in results:
        runs = ", ".join(
            f"{level}: {f.stalled}/{f.broken}, {_f(f.gap_max, 0)}" for level, f in r.capacity
        )
        rows.append(f"- {r.name}: {runs}")
    levels = sorted({n for r in results for n in r.open_rss_mb})
    if len(levels) >= 2:
        low, high = levels[0], levels[-1]
        rows += [
            "",
            f"Memory per open stream: RSS of the subject's processes with {low} and with "
            f"{high} slow paced streams open at once (each stream open for several "
            "seconds, read once all have started), and the slope between the two; "
            "measured right after the warm-up, before the heavier load grows the heap.",
            "",
            f"| subject | RSS, {low} open (MB) | RSS, {high} open (MB) | KB per open stream |",
            "| --- | ---: | ---: | ---: |",
        ]
        for r in results:
            rows.append(
                f"| {r.name} | {_f(r.open_rss_mb[low], 1)} | {_f(r.open_rss_mb[high], 1)} "
                f"| {_f(per_stream_kb(r, low, high), 1)} |"
            )
    return rows


def per_stream_kb(r: Measured, low: int, high: int) -> float:
    return (r.open_rss_mb[high] - r.open_rss_mb[low]) * 1000 / (high - low)


def _scaling(scaling: Sequence[Scaling]) -> list[str]:
    rows = [
        "### (d) Workers: throughput with 2 workers vs 1 (both unpinned, non-streamed chat)",
        "",
        "| mode | conns | 1 worker req/s | 2 workers req/s | ratio | CPU µs/req 1w | 2w "
        "| preempted/req 1w | 2w |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in scaling:
        for conns, one in s.points[1].items():
            two = s.points[2][conns]
            rows.append(
                f"| {s.name} | {conns} | {_f(one.rps)} | {_f(two.rps)} | {s.ratio(conns):.2f}x "
                f"| {_f(one.cpu_us)} | {_f(two.cpu_us)} "
                f"| {_f(s.preempted[1][conns], 2)} | {_f(s.preempted[2][conns], 2)} |"
            )
    rows.append(
        "\nBoth servers up throughout, measured in turn, round after round (medians). "
        "*preempted/req*: involuntary context switches per request (the kernel's "
        "`nonvoluntary_ctxt_switches`): a busy worker switched out for another process, "
        "which costs it its caches; with two workers beside wrk and the upstream on two "
        "CPUs, more processes are busy than there are CPUs."
    )
    return rows


def _goals(results: Sequence[Measured], direct: Measured, scaling: Sequence[Scaling]) -> list[str]:
    rows = [
        "### Issue #7 goals",
        "",
        "| mode | goal | measured | met |",
        "| --- | --- | ---: | :---: |",
    ]
    limits = {"bare": (180, 300, None), "governed": (250, 500, 1500)}
    for r in results:
        if r.name not in limits:
            continue
        cpu_max, p50_max, p99_max = limits[r.name]
        cpu = r.throughput["chat", 64].cpu_us
        checks = [
            (f"CPU per request (c=64) ≤ {cpu_max} µs", cpu, cpu <= cpu_max),
            (
                f"added p50 at c=1 ≤ {p50_max} µs",
                r.latency.p50 - direct.latency.p50,
                r.latency.p50 - direct.latency.p50 <= p50_max,
            ),
        ]
        if p99_max is not None:
            added = r.latency.p99 - direct.latency.p99
            checks.append((f"added p99 at c=1 ≤ {p99_max} µs", added, added <= p99_max))
        ttft = (r.ttft.ttft_p50 - direct.ttft.ttft_p50) * 1000
        gap = (r.paced.gap_p99 - direct.paced.gap_p99) * 1000
        clean = [level for level, f in r.capacity if f.clean]
        checks += [
            ("added TTFT p50 ≤ 500 µs", ttft, ttft <= 500),
            ("added inter-chunk gap (p99) ≤ 1000 µs", gap, gap <= 1000),
            (
                "concurrent paced streams without a stall ≥ 1000",
                max(clean, default=0),
                1000 in clean,
            ),
            ("peak RSS per worker ≤ 80 MB", r.peak_rss_mb, r.peak_rss_mb <= 80),
        ]
        for s in scaling:
            if s.name == r.name:
                checks.append(("2 workers ≥ 1.8x one (c=256)", s.ratio(256), s.ratio(256) >= 1.8))
        for goal, value, met in checks:
            shown = _f(value, 2 if abs(value) < 10 else 0)
            rows.append(f"| {r.name} | {goal} | {shown} | {'yes' if met else '**no**'} |")
    return rows


# Issue #17: the proxy against the thin aiohttp relay (bench/passthrough.py), by kind of
# request at 64 connections: the most CPU per request allowed, as a multiple of the relay's.
RELAY_LIMITS = {"bare": 0.45, "governed": 0.6}
RELAY_KINDS = ("chat", "chat stream", "long stream", "long stream +usage")


def _turns(turns: Sequence[Turns]) -> list[str]:
    rows = [
        "### (e) Against the thin relay, in turns (64 connections)",
        "",
        "The proxy (one pinned worker) and the thin relay, both up on the proxy's CPU, "
        "in front of nginx serving canned answers (bench/nginx.py: an upstream that is "
        "not the bottleneck, so most of a stream arrives in one read), "
        "measured one after the other kind by kind, round after round: a change in the "
        "machine's load between rounds moves both alike. Medians over the rounds; the "
        "ratio is the median of each round's own ratio.",
        "",
        "| mode | kind | relay CPU µs/req | proxy CPU µs/req | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for t in turns:
        for kind, (relay, mine, ratio) in t.costs.items():
            rows.append(f"| {t.name} | {kind} | {_f(relay)} | {_f(mine)} | {ratio:.2f}x |")
    return rows


def _relay_goals(
    results: Sequence[Measured], scaling: Sequence[Scaling], turns: Sequence[Turns] = ()
) -> list[str]:
    relay = next((r for r in results if r.name == "passthrough"), None)
    if relay is None:
        return []
    rows = [
        "### Issue #17 goals: against the thin relay (passthrough), same run",
        "",
        "CPU per request ÷ the thin relay's at 64 connections, from table (e) (from "
        'table (b) where (e) was not run; "long stream": 60 tokens, '
        '63 events per response; "+usage": the client asks for the usage chunk, 64 '
        "events; without it the proxy injects and strips it). TTFT and gap p99 from table "
        "(c), memory per open stream from the RSS slope above, workers from table (d).",
        "",
        "| mode | goal | measured | met |",
        "| --- | --- | ---: | :---: |",
    ]
    for r in results:
        limit = RELAY_LIMITS.get(r.name)
        if limit is None:
            continue
        checks = []
        paired = next((t.costs for t in turns if t.name == r.name), {})
        for kind in RELAY_KINDS:
            if kind in paired:
                ratio = paired[kind][2]
            else:
                mine, base = r.throughput.get((kind, 64)), relay.throughput.get((kind, 64))
                if mine is None or base is None:
                    continue
                ratio = mine.cpu_us / base.cpu_us
            checks.append((f"CPU/request, {kind}, ≤ {limit}x relay", ratio, ratio <= limit))
        checks += [
            (
                "TTFT p99 ≤ relay's (ms)",
                r.ttft.ttft_p99,
                r.ttft.ttft_p99 <= relay.ttft.ttft_p99,
            ),
            ("gap p99 ≤ relay's (ms)", r.paced.gap_p99, r.paced.gap_p99 <= relay.paced.gap_p99),
        ]
        levels = sorted(r.open_rss_mb)
        if len(levels) >= 2:
            kb = per_stream_kb(r, levels[0], levels[-1])
            checks.append(("memory per open stream ≤ 20 KB", kb, kb <= 20))
        for s in scaling:
            if s.name == r.name:
                for conns, one in s.points[1].items():
                    ratio = s.points[2][conns].cpu_us / one.cpu_us
                    checks.append(
                        (f"CPU/request 2 workers ≤ 1.05x one (c={conns})", ratio, ratio <= 1.05)
                    )
        for goal, value, met in checks:
            rows.append(f"| {r.name} | {goal} | {_f(value, 2)} | {'yes' if met else '**no**'} |")
    rows.append(
        "\nThin relay in this run: "
        + ", ".join(
            f"{kind} {_f(relay.throughput[kind, 64].cpu_us)} µs"
            for kind in RELAY_KINDS
            if (kind, 64) in relay.throughput
        )
        + f"; TTFT p99 {_f(relay.ttft.ttft_p99, 2)} ms, gap p99 {_f(relay.paced.gap_p99, 2)} ms."
    )
    return rows
