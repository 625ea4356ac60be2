"""Model name → the deployments that serve it, and which one takes the next request.

A model named ``*`` catches every name not configured explicitly (the quick-start
``--upstream`` mode); the client's model name then goes upstream unchanged.

Selection is weighted power of two choices: draw two distinct deployments with
probability proportional to weight, keep the one with fewer in-flight requests per
unit of weight (a tie keeps the first draw). Idle, this splits traffic by weight;
under load, a slow deployment accumulates in-flight requests and so receives fewer
new ones. Only deployments that are healthy, under their concurrency cap and within
their outbound rate are drawn.

Invariant: ``claim`` takes an in-flight slot (and charges the rate cap) or takes
nothing; whoever got the slot gives it back exactly once (``inflight -= 1``).
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Collection, Sequence
from time import monotonic
from typing import Any

from yarl import URL

from .config import WILDCARD, Config, Model, Routing
from .errors import ModelNotFound, ServiceUnavailable
from .health import Health
from .upstream import Upstream


class Route:
    """A model's deployments, and the models to fall back to (set by ``Router``)."""

    __slots__ = ("chain", "model", "upstreams")

    def __init__(self, model: Model, rate_share: float = 1.0) -> None:
        self.model = model
        sent = None if model.name == WILDCARD else model.name
        self.upstreams = [Upstream(d, sent, rate_share) for d in model.deployments]
        # This route, then its fallbacks in order: where one request may go.
        self.chain: tuple[Route, ...] = (self,)

    def pick(self) -> Upstream:
        """The deployment to send the next request to (for callers that do not retry)."""
        return self.choose() or self.upstreams[0]

    def choose(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        """A deployment not in ``exclude`` that can take a request now, or None."""
        return pick_weighted(
            [u for u in self.upstreams if u.is_available() and u.has_rate() and u not in exclude]
        )

    def choose_throttled(self, exclude: Collection[Upstream] = ()) -> Upstream | None:
        """A deployment held back only by its outbound rate cap, or None."""
        return pick_weighted(
            [
                u
                for u in self.upstreams
                if u.is_available() and not u.has_rate() and u not in exclude
            ]
        )

    def unavailable(self) -> ServiceUnavailable:
        """The 503 for a request no deployment of the chain can take, with Retry-After
        until the earliest one is expected back."""
        now = monotonic()
        wait = min(_expected_wait(u, now) for route in self.chain for u in route.upstreams)
        seconds = max(1, math.ceil(wait))
        return ServiceUnavailable(
            f"No deployment of model `{self.model.name[:200]}` is available right now "
            f"(all cooling down or at capacity); retry in {seconds}s.",
            headers={"Retry-After": str(seconds)},
        )


async def claim(upstream: Upstream, rate_wait: float) -> bool:
    """Take an in-flight slot and a rate token on ``upstream``; wait at most
    ``rate_wait`` for the token. False (and nothing held) when it did not come."""
    upstream.inflight += 1
    limiter = upstream.limiter
    if limiter is None:
        return True
    try:
        if limiter.has_capacity():
            await limiter.acquire()  # does not suspend: the capacity is there
        else:
            async with asyncio.timeout(rate_wait):
                await limiter.acquire()
    except TimeoutError:
        upstream.inflight -= 1
        return False
    except BaseException:
        upstream.inflight -= 1
        raise
    return True


def pick_weighted(candidates: Sequence[Upstream]) -> Upstream | None:
    """Weighted power of two choices over ``candidates`` (see the module docstring)."""
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    total = sum(u.weight for u in candidates)
    first = _draw(candidates, total, None)
    second = _draw(candidates, total - first.weight, first)
    return second if second.load < first.load else first


def _draw(candidates: Sequence[Upstream], total: float, skip: Upstream | None) -> Upstream:
    """One deployment, drawn with probability proportional to weight, never ``skip``."""
    point = random.random() * total
    chosen = candidates[0] if candidates[0] is not skip else candidates[1]
    for upstream in candidates:
        if upstream is skip:
            continue
        chosen = upstream
        point -= upstream.weight
        if point < 0:
            break
    return chosen


def _expected_wait(upstream: Upstream, now: float) -> float:
    if not upstream.healthy:
        return upstream.cooldown_until - now
    if upstream.limiter is not None and not upstream.has_rate():
        return upstream.limiter.time_period / upstream.limiter.max_rate
    return 1.0  # at its concurrency cap: a slot frees up when any request ends


class Router:
    """Every model's route, the routing policy and the deployments' health."""

    __slots__ = ("health", "policy", "routes", "wildcard")

    def __init__(self, config: Config) -> None:
        # Imported here: serve imports app, which imports this module.
        from .serve import worker_count

        share = 1 / worker_count(config)  # each worker process gets its part of an rpm cap
        self.policy: Routing = config.routing
        self.health = Health(config.routing)
        self.routes = {m.name: Route(m, share) for m in config.models if m.name != WILDCARD}
        wildcard = [m for m in config.models if m.name == WILDCARD]
        self.wildcard = Route(wildcard[0], share) if wildcard else None
        for route in self.all():
            route.chain = (route, *(self.routes[name] for name in route.model.fallbacks))

    def route(self, model: str) -> Route:
        route = self.routes.get(model) or self.wildcard
        if route is None:
            raise ModelNotFound(
                f"The model `{model[:200]}` does not exist or you do not have access to it.",
                param="model",
            )
        return route

    def names(self) -> list[str]:
        """Model names clients can ask for (without the wildcard)."""
        return list(self.routes)

    def all(self) -> list[Route]:
        """Every route, the wildcard last."""
        return [*self.routes.values(), *([self.wildcard] if self.wildcard else [])]

    def snapshot(self) -> dict[str, Any]:
        """Per-model, per-deployment routing state for the ops endpoint. Never a key."""
        now = monotonic()
        return {
            "models": [
                {
                    "name": route.model.name,
                    "fallbacks": list(route.model.fallbacks),
                    "deployments": [_describe(u, now) for u in route.upstreams],
                }
                for route in self.all()
            ]
        }


def _describe(upstream: Upstream, now: float) -> dict[str, Any]:
    cooling = 0.0 if upstream.healthy else max(0.0, upstream.cooldown_until - now)
    return {
        "name": upstream.name,
        "kind": upstream.deployment.kind,
        "base_url": str(URL(upstream.base).with_user(None)),  # drops any user:password@
        "weight": upstream.weight,
        "inflight": upstream.inflight,
        "max_concurrent": upstream.deployment.max_concurrent,
        "rpm": upstream.deployment.rpm,
        "healthy": upstream.healthy,
        "cooldown_remaining": round(cooling, 3),
        "latency_ms": round(upstream.latency * 1000, 1),
        "consecutive_failures": upstream.failures,
    }
