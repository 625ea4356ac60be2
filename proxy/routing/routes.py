"""Model name → the deployments that serve it, and which one takes the next request.

A model named ``*`` catches every name not configured explicitly (the quick-start
``--upstream`` mode); the client's model name then goes upstream unchanged.

Selection is weighted power of two choices: draw two distinct deployments with
probability proportional to weight, keep the one with fewer in-flight requests per
unit of weight (a tie keeps the first draw). Idle, this splits traffic by weight;
under load, a slow deployment accumulates in-flight requests and so receives fewer
new ones. Only deployments in rotation, under their concurrency cap and within their
outbound rate are drawn.

Panic mode (as in Envoy): when fewer than ``panic_threshold`` of a model's
deployments are in rotation, and always when none is, routing ignores rotation and
draws from all of them: a model is never refused because its deployments look ill.

Invariant: ``claim`` returns a ``Slot`` (in-flight slot taken, rate token charged)
or None with nothing taken; the slot travels with the attempt and is released once.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
from collections.abc import Collection, Sequence
from time import monotonic
from typing import Any

from yarl import URL

from ..config.base import WILDCARD
from ..config.schema import Config
from ..config.upstreams import Model, Routing
from ..errors import ModelNotFound, ServiceUnavailable
from ..http.upstream import Upstream
from ..ops import metrics
from .board import Board
from .health import DeploymentState, Health, Slot


class Route:
    """A model's deployments, and the models to fall back to (set by ``Router``)."""

    __slots__ = ("chain", "model", "panic_threshold", "retrying", "upstreams")

    def __init__(self, model: Model, upstreams: list[DeploymentState], policy: Routing) -> None:
        self.model = model
        self.upstreams = upstreams
        threshold = model.panic_threshold
        self.panic_threshold = policy.panic_threshold if threshold is None else threshold
        # Requests of this model (in this worker) sending a retry right now.
        self.retrying = 0
        # This route, then its fallbacks in order: where one request may go.
        self.chain: tuple[Route, ...] = (self,)

    def pick(self) -> Upstream:
        """The deployment to send the next request to (for callers that do not retry)."""
        state = self.choose(monotonic())
        return (state or self.upstreams[0]).upstream

    def in_panic(self, now: float) -> bool:
        """Too few deployments in rotation: route across all of them."""
        return self._panics(len(self._in_rotation(now)))

    def _in_rotation(self, now: float) -> list[DeploymentState]:
        return [u for u in self.upstreams if not u.is_ejected(now)]

    def _panics(self, in_rotation: int) -> bool:
        return in_rotation == 0 or in_rotation < self.panic_threshold * len(self.upstreams)

    def choose(
        self,
        now: float,
        exclude: Collection[DeploymentState] = (),
        *,
        throttled: bool = False,
        rate: bool = True,
        panic: bool = True,
    ) -> DeploymentState | None:
        """A deployment not in ``exclude``, in rotation (or out of it, when the model
        is in panic), under its cap, throttled by a 429 or not as asked, and with (or,
        ``rate=False``, only without) an rpm token now; None when there is none.
        ``panic=False``: None when the model has no deployment in rotation at all (its
        traffic then goes to its fallbacks before panic mode takes it)."""
        pool = self._in_rotation(now)
        if self._panics(len(pool)):
            if not (pool or panic):
                return None
            pool = self.upstreams
        return pick_weighted(
            [
                u
                for u in pool
                if u.inflight < u.cap
                and u.is_throttled(now) == throttled
                and u.has_rate() == rate
                and u not in exclude
            ]
        )

    def may_retry(self, policy: Routing) -> bool:
        """Within the retry budget: retries in flight under ``retry_budget`` of the
        model's requests in flight, or under ``min_retries``."""
        active = sum(u.inflight for u in self.upstreams)
        return self.retrying < max(policy.min_retries, policy.retry_budget * active)

    def unavailable(self, asked: str) -> ServiceUnavailable:
        """The 503 for a request (for model ``asked``) no deployment of the chain can
        take, with Retry-After until the earliest one is expected back."""
        now = monotonic()
        wait = min(_expected_wait(u, now) for route in self.chain for u in route.upstreams)
        seconds = max(1, math.ceil(wait))
        return ServiceUnavailable(
            f"No deployment of model `{asked[:200]}` can take a request right now "
            f"(all at capacity or out of rotation); retry in {seconds}s.",
            headers={"Retry-After": str(seconds)},
        )


async def claim(state: DeploymentState, rate_wait: float) -> Slot | None:
    """Take an in-flight slot and a rate token on ``state``; wait at most ``rate_wait``
    for the token. None (and nothing held) when it did not come."""
    slot = state.claim()  # first: checked and taken in the same event-loop tick
    limiter = state.limiter
    if limiter is None:
        return slot
    try:
        if limiter.has_capacity():
            await limiter.acquire()  # does not suspend: the capacity is there
        else:
            async with asyncio.timeout(rate_wait):
                await limiter.acquire()
    except TimeoutError:
        slot.release()
        return None
    except BaseException:
        slot.release()
        raise
    return slot


def pick_weighted(candidates: Sequence[DeploymentState]) -> DeploymentState | None:
    """Weighted power of two choices over ``candidates`` (see the module docstring)."""
    if len(candidates) < 2:
        return candidates[0] if candidates else None
    total = sum(u.weight for u in candidates)
    first = _draw(candidates, total, None)
    second = _draw(candidates, total - first.weight, first)
    return second if second.load < first.load else first


def _draw(
    candidates: Sequence[DeploymentState], total: float, skip: DeploymentState | None
) -> DeploymentState:
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


def _expected_wait(state: DeploymentState, now: float) -> float:
    if state.is_ejected(now):
        return state.ejected_until - now
    if state.limiter is not None and not state.has_rate():
        return state.limiter.time_period / state.limiter.max_rate
    return 1.0  # at its concurrency cap: a slot frees up when any request ends


class Router:
    """Every model's route, the routing policy and the deployments' health."""

    __slots__ = ("board", "health", "policy", "routes", "wildcard")

    def __init__(self, config: Config) -> None:
        # Imported here: serve imports app, which imports this module.
        from ..config.load import worker_count

        share = 1 / worker_count(config)  # each worker process gets its part of an rpm cap
        self.policy: Routing = config.routing
        slots = sum(len(m.deployments) for m in config.models)
        # Workers of one `serve` share the health table (their metrics directory).
        shared = os.environ.get(metrics.ENV) if metrics.MULTIPROCESS else None
        self.board = Board(slots, shared)
        self.health = Health(config.routing, self.board)
        built = [
            self._build(m, share, sum(len(n.deployments) for n in config.models[:i]))
            for i, m in enumerate(config.models)
        ]
        self.health.states = [state for route in built for state in route.upstreams]
        self.routes = {r.model.name: r for r in built if r.model.name != WILDCARD}
        wildcard = [r for r in built if r.model.name == WILDCARD]
        self.wildcard = wildcard[0] if wildcard else None
        for route in self.all():
            route.chain = (route, *(self.routes[name] for name in route.model.fallbacks))

    def _build(self, model: Model, share: float, first: int) -> Route:
        sent = None if model.name == WILDCARD else model.name
        states = [
            DeploymentState(Upstream(d, sent), model.name, self.board, at, self.policy, share)
            for at, d in enumerate(model.deployments, first)
        ]
        return Route(model, states, self.policy)

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
                    "panic": route.in_panic(now),
                    "deployments": [_describe(u, now) for u in route.upstreams],
                }
                for route in self.all()
            ]
        }


def _describe(state: DeploymentState, now: float) -> dict[str, Any]:
    upstream = state.upstream
    return {
        "name": state.name,
        "kind": upstream.deployment.kind,
        "base_url": str(URL(upstream.base).with_user(None)),  # drops any user:password@
        "weight": state.weight,
        "inflight": state.inflight,
        "max_concurrent": upstream.deployment.max_concurrent,
        "rpm": upstream.deployment.rpm,
        "healthy": not state.is_ejected(now),
        "cooldown_remaining": round(max(0.0, state.ejected_until - now), 3),
        "throttled_remaining": round(max(0.0, state.throttled_until - now), 3),
        "latency_ms": round(state.latency * 1000, 1),
        "consecutive_failures": state.failures,
    }
