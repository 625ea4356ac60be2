"""The reference point: a plain aiohttp passthrough (no auth, no limits, no accounting).

This is the thin relay issues #7 and #17 compare the proxy against: one handler with
one shared ClientSession, streams written chunk by chunk as they arrive. It runs on
uvloop like the proxy, so the comparison is of the code on top of aiohttp, not of
event loops. Never use it for real traffic: it forwards
every header it gets, checks nothing and has no timeouts.

    python -m bench.passthrough --upstream http://127.0.0.1:9000/v1 --port 8090
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

# Dropped because aiohttp sets them itself, or because they describe this hop only.
SKIP = frozenset(("host", "content-length", "connection", "transfer-encoding", "keep-alive"))
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    url = f"{request.app[UPSTREAM]}/{request.match_info['path']}"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in SKIP}
    async with request.app[SESSION].post(url, data=body, headers=headers) as up:
        if up.content_type != "text/event-stream":
            body = await up.read()
            return web.Response(body=body, status=up.status, content_type=up.content_type)
        out = web.StreamResponse(status=up.status, headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        async for chunk in up.content.iter_any():
            await out.write(chunk)
        await out.write_eof()
        return out


async def session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as client:
        app[SESSION] = client
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="upstream base URL ending in /v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/{path:.*}", forward)
    loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, backlog=4096, loop=loop)


if __name__ == "__main__":
    main()
