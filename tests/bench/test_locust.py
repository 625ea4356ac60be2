"""CI's short headless Locust run: the load testers' workload (bench/locustfile.py)
against the proxy and the fake upstream. It fails on any request failure, never on
timings.

Locust runs as a subprocess: it monkey-patches the standard library with gevent on
import, which must not leak into the other tests.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from bench.fake_upstream import FakeUpstream
from tests.support.env import PYTHON, ROOT, proxy_env
from tests.support.inproc import MakeProxy
from tests.support.keys import declare, keyed

LOCUSTFILE = ROOT / "bench" / "locustfile.py"


async def test_locust_workload_runs_without_a_failure(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    key, declared = declare(rpm=1_000_000, tpm=1_000_000_000)
    proxy = await make_proxy(keyed(upstream.url, declared), auth=True)
    argv = [
        *("-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--json"),
        *("-u", "8", "-r", "8", "-t", "4s", "--host", proxy.url),
        *("--exit-code-on-error", "1", "--stream-share", "0.5", "--prompt-words", "8,256"),
        *("--models", "m1,m2", "--extra-header", "x-fake-chunks: 12"),
    ]
    env = {**proxy_env(), "LOCUST_API_KEYS": key}  # never on the command line
    run = await asyncio.create_subprocess_exec(
        PYTHON,
        *argv,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(45):
        out, err = await run.communicate()
    log = err.decode(errors="replace")[-3000:]
    assert run.returncode == 0, log
    rows = {(row["method"], row["name"]): row for row in json.loads(out)}
    for kind in ("chat", "chat stream"):
        row = rows["POST", kind]
        assert row["num_requests"] > 0, log
        assert row["num_failures"] == 0, log
        assert rows["OVERHEAD", f"{kind} (µs)"]["num_requests"] == row["num_requests"]
    assert rows["TTFT", "chat stream (ms)"]["num_requests"] > 0
    models = {r.json["model"] for r in upstream.received if isinstance(r.json, dict)}
    assert models == {"m1", "m2"}
