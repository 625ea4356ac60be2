"""The built console is served from the package at /console on the ops listener."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.admin.console import DIST
from tests.support.admin import start
from tests.support.inproc import MakeProxy, Proxy

ASSETS = sorted(p.name for p in (DIST / "assets").iterdir())


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any) -> Proxy:
    return await start(make_proxy, upstream.url, monkeypatch)


def test_the_package_ships_a_built_console() -> None:
    assert (DIST / "index.html").is_file()
    assert any(name.endswith(".js") for name in ASSETS)


async def test_files_and_client_side_routes(proxy: Proxy) -> None:
    base = f"http://127.0.0.1:{proxy.state.config.server.ops_port}"
    index = (DIST / "index.html").read_bytes()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/console", allow_redirects=False) as r:
            assert r.status == 302
            assert r.headers["Location"] == "/console/"
        for route in ("/console/", "/console/keys", "/console/usage?x=1"):
            async with http.get(base + route) as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/html")
                assert r.headers["Cache-Control"] == "no-cache"
                assert "default-src 'self'" in r.headers["Content-Security-Policy"]
                assert await r.read() == index
        script = next(name for name in ASSETS if name.endswith(".js"))
        async with http.get(f"{base}/console/assets/{script}") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/javascript")
            assert "immutable" in r.headers["Cache-Control"]
            assert await r.read() == (DIST / "assets" / script).read_bytes()
        # Only built files are served: anything else is the app's index, never a file
        # from elsewhere on the disk.
        for sneaky in (
            "/console/../app.py",
            "/console/%2e%2e/app.py",
            "/console/assets/../../app.py",
        ):
            async with http.get(f"{base}/console/{sneaky}") as r:
                assert r.status in (200, 404)
                assert b"def build_app" not in await r.read()
