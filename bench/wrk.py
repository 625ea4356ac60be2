"""Load generation with wrk (Debian's ``wrk`` package): POST bodies from a Lua script,
results read back as one JSON line printed by the script's ``done`` hook.

wrk is C and event-driven: one thread keeps hundreds of connections busy for a few
microseconds of CPU per request, so the proxy, not the load generator, is what runs
out of CPU. It reads each response to its end, streams included (chunked encoding), so
a streamed request counts once it has been relayed completely.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import orjson

from .procs import debian_tool, pinned

_MARK = "WRKJSON "
_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,'
      .. '"p50":%.0f,"p90":%.0f,"p99":%.0f,"max":%.0f,"mean":%.1f}\\n',
    summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


@dataclass(frozen=True)
class Result:
    """One wrk run. Latencies in microseconds."""

    requests: int
    seconds: float
    errors: int
    non2xx: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return self.errors + self.non2xx


def ensure_installed() -> str:
    """Path of wrk, installing Debian's package first when it is missing."""
    return debian_tool("wrk", "wrk")


def script(folder: Path, name: str, body: bytes, headers: dict[str, str]) -> Path:
    """Write a wrk Lua script that POSTs ``body`` with ``headers``."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(body)}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items()]
    path = folder / f"{name}.lua"
    path.write_text("\n".join(lines) + "\n" + _DONE)
    return path


def _lua_string(value: str | bytes) -> str:
    # A JSON string literal is a valid Lua string literal for printable ASCII.
    text = value.decode() if isinstance(value, bytes) else value
    return json.dumps(text, ensure_ascii=True)


def run(
    url: str,
    lua: Path,
    connections: int,
    seconds: float,
    cpus: frozenset[int] | None,
    threads: int = 1,
) -> Result:
    """Run wrk against ``url`` and return what its ``done`` hook reported."""
    argv = [
        "wrk",
        f"-t{min(threads, connections)}",
        f"-c{connections}",
        f"-d{seconds:g}s",
        "--timeout",
        "10s",
        "-s",
        str(lua),
        url,
    ]
    out = subprocess.run(
        pinned(argv, cpus), capture_output=True, text=True, timeout=seconds + 60, check=False
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith(_MARK)), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(
            f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}"
        )
    raw = orjson.loads(line[len(_MARK) :])
    return Result(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        errors=raw["errors"],
        non2xx=raw["non2xx"],
        p50=raw["p50"],
        p90=raw["p90"],
        p99=raw["p99"],
        max=raw["max"],
        mean=raw["mean"],
    )
