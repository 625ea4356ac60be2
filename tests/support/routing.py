"""Helpers of the routing tests (tests/routing/test_routing.py, tests/routing/test_resilience.py):
configs of several deployments, the SDK pointed at a proxy, the deployments' state."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model, Routing
from proxy.routing.health import DeploymentState

from .env import UPSTREAM_KEY, free_port
from .inproc import Proxy

MESSAGES = [{"role": "user", "content": "hi"}]
HEAVY = 1e6  # a weight that makes a deployment the first choice (all but surely)
FAST = {"backoff_base": 0.01, "backoff_max": 0.05}


def dep(where: FakeUpstream | str, name: str, **fields: object) -> Deployment:
    url = where if isinstance(where, str) else where.url
    return Deployment(base_url=url, name=name, api_key=UPSTREAM_KEY, **fields)  # type: ignore[arg-type]


def model(name: str, *deployments: Deployment, fallbacks: tuple[str, ...] = ()) -> Model:
    return Model(name=name, deployments=list(deployments), fallbacks=list(fallbacks))


def config(*models: Model, **routing: object) -> cfg.Config:
    policy = Routing(**{**FAST, **routing})  # type: ignore[arg-type]
    return resolve(cfg.Config(models=list(models), server=cfg.Server(workers=1), routing=policy))


def sdk(proxy: Proxy, **options: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base, api_key="client", max_retries=0, **options)  # type: ignore[arg-type]


def upstreams(proxy: Proxy, model_name: str = "m") -> dict[str, DeploymentState]:
    return {u.name: u for u in proxy.state.router.routes[model_name].upstreams}


def refused() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"


def posts(fake: FakeUpstream) -> int:
    return sum(r.method == "POST" for r in fake.received)


async def until_holds(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds (fails the test after ``timeout``)."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110 - proxy state has no event to wait on
            await asyncio.sleep(0.01)


async def ask(client: openai.AsyncOpenAI, stream: bool = False, **extra: object) -> str:
    """One chat completion; returns the text (streams are read to the end)."""
    if not stream:
        reply = await client.chat.completions.create(model="m", messages=MESSAGES, **extra)  # type: ignore[call-overload]
        return str(reply.choices[0].message.content)
    chunks = await client.chat.completions.create(
        model="m", messages=MESSAGES, stream=True, **extra
    )  # type: ignore[call-overload]
    return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
