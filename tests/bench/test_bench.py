"""The benchmark's own parts that can be checked quickly: the stream probe against the
fake upstream and through the proxy, /proc accounting, and the configs of both modes
(the benchmark itself runs for minutes: `python -m bench.run --quick`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from bench import governed as modes
from bench import nginx, reads, streams
from bench.fake_upstream import FakeUpstream
from bench.procs import cpu_seconds, peak_rss_mb, pinned, preempted, rss_mb
from bench.run import PROBE_BODY, PROBE_EVENTS_EXTRA
from proxy.config.load import quick_start
from tests.support.env import ROOT
from tests.support.inproc import MakeProxy


@pytest.mark.parametrize("through_proxy", [False, True], ids=["direct", "proxy"])
async def test_probe_sees_every_paced_event_and_no_stall(
    upstream: FakeUpstream, make_proxy: MakeProxy, through_proxy: bool
) -> None:
    base = upstream.url
    if through_proxy:
        base = (await make_proxy(quick_start(upstream.url, None))).base
    target = streams.Target.of(base, "sk-unused")
    request = target.request(PROBE_BODY, chunks=6, gap_ms=20)
    traces = await streams.concurrent(target, request, count=3, ramp=0.05)
    fidelity = streams.Fidelity.of(traces, 6 + PROBE_EVENTS_EXTRA, gap_ms=20)
    assert (fidelity.streams, fidelity.broken) == (3, 0)
    # The gaps are the upstream's 20 ms, give or take scheduling on a busy machine.
    assert 10 < fidelity.gap_p50 < 40


async def test_probe_counts_a_cut_stream_as_broken(upstream: FakeUpstream) -> None:
    upstream.default["x-fake-cut"] = "3"
    target = streams.Target.of(upstream.url, "sk-unused")
    traces = await streams.sequential(target, target.request(PROBE_BODY, 6, 0), 2)
    fidelity = streams.Fidelity.of(traces, 6 + PROBE_EVENTS_EXTRA, gap_ms=0)
    assert fidelity.broken == 2
    assert not fidelity.clean


def test_percentile_is_nearest_rank() -> None:
    assert streams.percentile([5.0, 1.0, 3.0, 2.0, 4.0], 50) == 3.0
    assert streams.percentile([1.0, 2.0], 99) == 2.0
    assert streams.percentile([], 50) != streams.percentile([], 50)  # NaN


def test_proc_accounting_reads_this_process() -> None:
    pids = [os.getpid()]
    assert cpu_seconds(pids) > 0
    assert rss_mb(pids)[0] > 1
    assert peak_rss_mb(pids)[0] >= rss_mb(pids)[0] * 0.9
    assert cpu_seconds([2**22 + 7]) == 0  # a process that is not there counts nothing
    assert preempted([2**22 + 7]) == 0


def test_preempted_counts_busy_processes_sharing_a_cpu() -> None:
    """Two processes spinning on one CPU switch each other out (the kernel's time
    slices are milliseconds long); ``preempted`` reads those switches."""
    spin = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"
    busy = [subprocess.Popen(pinned([sys.executable, "-c", spin], frozenset({0}))) for _ in "ab"]
    try:
        time.sleep(1.0)
        assert preempted([p.pid for p in busy]) > 10
    finally:
        for p in busy:
            p.kill()
            p.wait()


def test_both_modes_write_configs_serve_accepts(tmp_path: Path) -> None:
    upstream = "http://127.0.0.1:9/v1"
    bare = modes.write(modes.bare(upstream, 8080, 1), tmp_path / "bare.json")
    assert not bare.auth.enabled
    assert bare.server.access_log == "off"
    governed = modes.write(
        modes.governed(upstream, 8080, 2, "redis://127.0.0.1:1/0", "postgresql://x@h/db"),
        tmp_path / "governed.json",
    )
    assert governed.auth.enabled
    assert [k.id for k in governed.keys] == ["bench"]
    assert governed.database.is_postgres
    assert modes.missing() == []


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_inproc_measures_the_governed_proxy_in_one_command(tmp_path: Path) -> None:
    """``bench.inproc --subject governed`` starts its Redis and its ledger database,
    drives the proxy with the bench key (a refused or failed request stops it with the
    answer) and drops both afterwards."""
    out = run_bench("bench.inproc", "--subject", "governed", "--requests", "400", "--repeat", "1")
    assert "governed, chat, 16 connections:" in out


def run_bench(module: str, *argv: str) -> str:
    """``python -m module argv...`` from the repository root; its stdout."""
    run = subprocess.run(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


def test_reads_measures_the_relay_on_whole_answers_and_a_middle_read() -> None:
    """``bench.reads``: each read is complete events (cut as the relay cuts them), the
    middle one without the usage chunk or [DONE], the prose one the long one's events
    with words for tokens; every row is measured."""
    whole, middle = reads.reads()["60 tokens"], reads.reads()["60, middle"]
    assert whole.endswith(b"data: [DONE]\n\n")
    assert b'"usage":{' in whole
    assert middle.endswith(b"}\n\n")
    assert b'"usage":{' not in middle
    assert b"[DONE]" not in middle
    rows = run_bench("bench.reads", "--number", "50", "--repeat", "1").splitlines()[1:]
    assert [row.split()[0] for row in rows] == ["1", "8", "60", "60,", "60,"]
    assert reads.reads()["1 event"].count(b"\n\n") == 1
    prose = reads.reads()["60, prose"]  # the same events, other text
    assert prose.count(b"\n\n") == whole.count(b"\n\n")
    assert b'"tok' not in prose
    assert all(float(x) > 0 for row in rows for x in row.split()[-3:])
    assert reads.framed(whole).endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_heads_measures_kept_and_made_blocks() -> None:
    """``bench.heads``: both clients' rows, each measured kept and made."""
    rows = run_bench("bench.heads", "--number", "300", "--repeat", "1").splitlines()[1:]
    assert [row.split()[:2] for row in rows] == [["SDK", "17"], ["bench", "4"]]
    assert all(float(x) > 0 for row in rows for x in row.split()[2:])


def test_inproc_measures_what_tracing_costs_in_one_run() -> None:
    """``bench.inproc --tracing``: three proxies (tracing off, sampled out, sampled)
    measured in turn, the sampled one exporting its spans to a local receiver."""
    out = run_bench("bench.inproc", "--tracing", "--requests", "300", "--repeat", "1")
    for variant in ("off", "sampled out", "sampled"):
        assert f"  {variant}: " in out, out


def test_trace_calls_measures_each_tracing_mode() -> None:
    out = run_bench("bench.trace_calls", "--requests", "3000", "--repeat", "1")
    for mode in ("tracing off: +", "sampled out: +", "sampled, spans built and serialized: +"):
        assert mode in out, out


@pytest.mark.parametrize("paced", [[], ["--paced-ms", "0.2"]], ids=["one-read", "paced"])
def test_inproc_gives_the_cost_per_relayed_event(paced: list[str]) -> None:
    """``bench.inproc --stream --events A --events B`` measures streams of two lengths
    (a stream the proxy strips the usage chunk from, too) and prints the slope."""
    argv = ["--stream", "--no-usage", "--events", "2", "--events", "6", *paced]
    out = run_bench("bench.inproc", *argv, "--requests", "200", "--repeat", "1")
    assert "proxy, chat stream of 4 events" in out
    assert "proxy, chat stream of 8 events" in out
    assert "per relayed event: " in out


@pytest.mark.parametrize("stream", [[], ["--stream"]], ids=["chat", "stream"])
def test_inproc_measures_the_floor_a_byte_pipe(stream: list[str]) -> None:
    """``bench.inproc --subject floor``: the byte pipe carries every request and answer
    (the clients stop at the first answer that is not a 200, or never finish)."""
    out = run_bench("bench.inproc", "--subject", "floor", *stream, "--requests", "300")
    assert "floor, chat" in out, out
    assert "CPU per request" in out, out


@pytest.mark.timeout(120)
def test_the_ledger_benchmark_runs_before_and_after() -> None:
    """``bench.ledger`` (a scratch PostgreSQL database per phase, dropped after): the
    0004 baseline and today's schema both ingest, and the reads are measured."""
    out = run_bench("bench.ledger", "--rows", "2000", "--fringe", "100")
    for field in ("rows_per_s", "heap_index_per_row", "wal_per_row", "report_command_s"):
        assert field in out, out


@pytest.mark.skipif(shutil.which("nginx") is None, reason="needs nginx (Debian's nginx-light)")
async def test_the_canned_nginx_upstream_answers_every_kind_through_the_proxy(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    """Table (e)'s upstream: nginx's fixed answers, picked by ``x-fake-chunks``, read by
    the SDK through the proxy as a chat, as streams with and without usage asked for
    (the proxy strips the usage it asked for), and the fake upstream's usage."""
    service, url = nginx.start(tmp_path, None, 8, (8, 60))
    try:
        proxy = await make_proxy(quick_start(url, None))
        async with openai.AsyncOpenAI(base_url=proxy.base, api_key="x", max_retries=0) as client:
            chat = await client.chat.completions.create(model="bench-model", messages=[])
            assert chat.choices[0].message.content == " ".join(f"tok{i}" for i in range(8))
            assert chat.usage is not None
            assert chat.usage.completion_tokens == 8
            for tokens in (8, 60):
                for usage in (True, False):
                    stream = await client.chat.completions.create(
                        model="bench-model",
                        messages=[],
                        stream=True,
                        stream_options={"include_usage": True} if usage else None,
                        extra_headers={"x-fake-chunks": str(tokens)},
                    )
                    chunks = [c async for c in stream]
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    assert text == "".join(f"tok{i} " for i in range(tokens))
                    usages = [c.usage for c in chunks if c.usage is not None]
                    assert [u.completion_tokens for u in usages] == ([tokens] if usage else [])
                    assert len(chunks) == tokens + 2 + usage
    finally:
        service.stop()


@pytest.mark.skipif(
    shutil.which("nginx") is None or shutil.which("wrk") is None,
    reason="needs nginx (Debian's nginx-light) and wrk",
)
def test_ab_measures_two_trees_proxies_in_turns() -> None:
    """``bench.ab`` with this tree on both sides: each proxy's CPU a request and the
    ratio, per kind asked for; a kind it does not know is refused."""
    argv = [sys.executable, "-m", "bench.ab", "--before", str(ROOT), "--after", str(ROOT)]
    out = subprocess.run(
        [*argv, "--kinds", "chat,long stream", "--rounds", "1", "--seconds", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    rows = {line.split(" | ")[1]: line.split(" | ")[2:] for line in out.splitlines()[-2:]}
    assert set(rows) == {"chat", "long stream"}, out
    for before, after, ratio in rows.values():
        assert float(before) > 0
        assert float(after) > 0
        assert float(ratio.rstrip(" |")) > 0
    refused = subprocess.run([*argv, "--kinds", "chat,lunch"], cwd=ROOT, capture_output=True)
    assert refused.returncode == 2
    assert b"unknown kinds ['lunch']" in refused.stderr


@pytest.mark.parametrize("share", ["0", "0.01"])
def test_the_limiter_bench_measures_leases_and_calls_per_request(share: str) -> None:
    argv = ["-m", "bench.limiter", "--calls", "400", "--repeat", "1", "--lease-share", share]
    out = subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert f"16 callers, lease share {float(share):g}: " in out
    assert float(out.split(": ")[1].split(" µs")[0]) > 0
