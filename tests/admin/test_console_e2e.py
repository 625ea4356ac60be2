"""The console end to end in real headless browsers, Debian's chromium and firefox-esr:
log in, create a key, make a request with it (openai SDK), see it in the overview and
the usage, log in with it (a member's own view), revoke it, see the next request
refused. One scenario (console/e2e/scenario.mjs, puppeteer-core: CDP for Chromium,
WebDriver BiDi for Firefox) runs in each browser against the proxy this test starts;
it asks this test for each request. A screenshot goes to var/e2e/ when it fails; the
page's load time is written to var/e2e/load-<browser>.txt (reported by scripts/test,
never asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from typing import Any

import openai
import pytest

from bench.fake_upstream import FakeUpstream
from tests.support.admin import MASTER, start
from tests.support.env import ROOT
from tests.support.inproc import MakeProxy, Proxy
from tests.support.leaks import SECRETS

CONSOLE = ROOT / "console"
SCENARIO = CONSOLE / "e2e" / "scenario.mjs"
ARTIFACTS = ROOT / "var" / "e2e"
NODE = shutil.which("node")
BROWSERS = {
    "chromium": ("chrome", shutil.which("chromium") or shutil.which("chromium-browser")),
    "firefox": ("firefox", shutil.which("firefox-esr") or shutil.which("firefox")),
}
WAIT = 50.0  # the whole scenario, under pytest-timeout; each step waits at most 20 s


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any) -> Proxy:
    return await start(make_proxy, upstream.url, monkeypatch)


def chat(api: str, key: str) -> str:
    """One request with ``key`` through the official SDK: "ok", or "refused" (401)."""
    with openai.OpenAI(base_url=api, api_key=key, max_retries=0) as client:
        try:
            client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
        except openai.AuthenticationError:
            return "refused"
    return "ok"


@pytest.mark.parametrize("name", list(BROWSERS))
async def test_console_end_to_end(proxy: Proxy, name: str) -> None:
    kind, executable = BROWSERS[name]
    if not executable:
        pytest.skip(f"no {name} on this machine (.ci/run installs it with apt-get)")
    if not NODE or not (CONSOLE / "node_modules" / "puppeteer-core").is_dir():
        pytest.skip("no node or console/node_modules (scripts/console-check runs npm ci)")
    ops = proxy.state.config.server.ops_port
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    console = f"http://127.0.0.1:{ops}/console/"
    script = await asyncio.create_subprocess_exec(
        NODE, str(SCENARIO), kind, executable, console, str(shot),
        cwd=CONSOLE, env={**os.environ, "MASTER_KEY": MASTER},
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    answers, asks = script.stdin, script.stdout
    assert answers is not None
    assert asks is not None

    async def serve() -> None:
        async for line in asks:
            message = json.loads(line)
            if "secret" in message:
                SECRETS.add(message["secret"])  # never printed by any test's output
            elif "load" in message:
                dcl, load = message["load"]
                (ARTIFACTS / f"load-{name}.txt").write_text(
                    f"console page load ({name}): "
                    f"DOMContentLoaded {dcl:.0f} ms, load {load:.0f} ms\n"
                )
            else:  # the proxy serves on this loop: the blocking SDK call goes to a thread
                answer = await asyncio.to_thread(chat, proxy.base, message["chat"])
                answers.write(answer.encode() + b"\n")
                await answers.drain()

    try:
        await asyncio.wait_for(serve(), WAIT)
        code = await asyncio.wait_for(script.wait(), WAIT)
    finally:
        if script.returncode is None:
            script.kill()
            await script.wait()
    assert code == 0, f"the {name} scenario failed (its error is above; screenshot: {shot})"
