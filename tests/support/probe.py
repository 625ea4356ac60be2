"""A proxy worker with a window into it, for the soak and the leak check: run as
``python -m tests.support.probe CONFIG`` in a process of its own (as aiohttp's
``tests/isolated`` do), so what it counts is the proxy alone.

It serves exactly as one ``serve`` worker does (uvloop, ``proxy.serve.start``),
prints ``{"port": N}`` once listening, then answers each ``stats`` line on stdin
with one JSON line on stdout; ``quit`` drains it and exits.

The counts (after a full garbage collection): upstream responses still holding
their connection (``h1.Response`` objects nobody closed), asyncio tasks, open file descriptors,
client connections, requests in flight, idle pooled upstream connections, and
resident memory now and at its peak."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
from typing import Any

import uvloop
from aiohttp import web

from proxy.config.load import load
from proxy.serve import start
from proxy.state import STATE


def _memory() -> dict[str, int]:
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = int(value.split()[0]) * 1024
    return found


def stats(runner: web.AppRunner) -> dict[str, Any]:
    gc.collect()
    state = runner.app[STATE]
    assert runner.server is not None
    assert state.session is not None
    memory = _memory()
    return {
        "client_responses": len(state.session.busy),
        "tasks": len(asyncio.all_tasks()) - 1,  # not counting this one
        "fds": len(os.listdir("/proc/self/fd")),
        "connections": len(runner.server.connections),
        "inflight": state.traffic.inflight,
        "upstream_inflight": sum(u.inflight for r in state.router.all() for u in r.upstreams),
        "pooled": state.session.idle(),
        "rss": memory["VmRSS"],
        "peak_rss": memory["VmHWM"],
    }


async def main(path: str) -> None:
    runner = await start(load(path))
    print(json.dumps({"port": runner.addresses[0][1]}), flush=True)
    loop = asyncio.get_running_loop()
    commands = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(commands), sys.stdin)
    try:
        while line := await commands.readline():
            if line.strip() == b"stats":
                print(json.dumps(stats(runner)), flush=True)
            elif line.strip() == b"quit":
                break
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1]))
