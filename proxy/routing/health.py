"""What changes about a deployment while the proxy runs, and the one object that judges
its health.

Health means ill-health, never one request's bad luck:
- *Failures* are the deployment's own: it cannot be reached, times out, answers
  502/503/504, or breaks a response it started. ``failure_threshold`` consecutive
  failures take it out of rotation; any success resets the count.
- A 500 may be one prompt's fault, so 500s count only as a *rate*: at least
  ``error_rate`` of its answers over the last ``error_window`` seconds, once it gave
  ``error_min_answers`` answers.
- A 429 is backpressure, not ill-health: the deployment is *throttled* for its
  Retry-After (routing prefers others meanwhile) and never taken out for it.
- The caller's 4xx and a client that went away count for nothing.

Invariants:
- ``DeploymentState.inflight`` changes only through ``claim`` and ``Slot.release``
  (exactly once per slot, however often it is called); the in-flight gauge follows it
  within ``PUBLISH_INTERVAL``.
- Out-of-rotation and throttled times live on the ``Board`` (shared by the workers of
  one host) and are written only here, by ``Health``; so is the healthy gauge.
- Taking a deployment out starts one probe task, in the worker that took it out: after
  the cooldown it GETs ``health_url`` with the deployment's key (never spends tokens)
  and brings it back on a 2xx. A request sent to it while it was out (panic mode)
  and served by it brings it back at once, in whichever worker. If the probing worker
  dies, the cooldown simply ends.
- Probe tasks start lazily and are all cancelled by ``close`` (state.open_state).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from time import monotonic
from typing import Final

from aiolimiter import AsyncLimiter

from ..config.upstreams import Routing
from ..http import h1
from ..http.upstream import Upstream
from ..ops import metrics
from .board import EJECTED, THROTTLED, Board

log = logging.getLogger("proxy.health")

# A probe is a cheap GET; give up on it sooner than on a completion.
PROBE_TIMEOUT = 10.0
# How long a 429 without Retry-After keeps routing away from its deployment.
THROTTLE_DEFAULT = 1.0
# Seconds between updates of the in-flight gauges.
PUBLISH_INTERVAL = 0.5
_LATENCY_WEIGHT: Final = 0.2  # share of the newest sample in the latency EWMA


class Window:
    """Answers and 500s over about the last ``seconds``: the current window and the one
    before it (so a fresh window never starts from nothing)."""

    __slots__ = ("answers", "errors", "previous", "seconds", "start")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = 0.0
        self.answers = self.errors = 0
        self.previous = (0, 0)

    def note(self, error: bool, now: float) -> None:
        elapsed = now - self.start
        if elapsed >= self.seconds:
            self.previous = (self.answers, self.errors) if elapsed < 2 * self.seconds else (0, 0)
            self.start, self.answers, self.errors = now, 0, 0
        self.answers += 1
        self.errors += error

    def counts(self) -> tuple[int, int]:
        """(answers, 500s) over the current and the previous window."""
        return self.answers + self.previous[0], self.errors + self.previous[1]

    def clear(self) -> None:
        self.answers = self.errors = 0
        self.previous = (0, 0)


class DeploymentState:
    """One deployment of one model as routing sees it: the fixed ``upstream`` and what
    changes (see the module invariants for who writes what)."""

    __slots__ = (
        "_at", "_healthy_gauge", "_inflight_gauge", "_values", "board", "cap", "failures",
        "index", "inflight", "latency", "limiter", "name", "upstream", "weight", "window",
    )  # fmt: skip

    def __init__(
        self,
        upstream: Upstream,
        model: str,
        board: Board,
        index: int,
        policy: Routing,
        rate_share: float = 1.0,
    ) -> None:
        """``index`` is its slot on ``board``; ``rate_share`` the part of ``rpm`` this
        process may use."""
        self.upstream = upstream
        self.name = upstream.name
        self.weight = upstream.weight
        self.cap = upstream.cap
        self.board = board
        self.index = index
        # Read on every routing decision: the table's memory and this slot's offset.
        self._values = board.values
        self._at = board.offset(index)
        rpm = upstream.deployment.rpm
        self.limiter = None if rpm is None else AsyncLimiter(max(1.0, rpm * rate_share), 60)
        self.inflight = 0
        self.failures = 0  # consecutive
        self.latency = 0.0  # EWMA of the time to response headers, seconds
        self.window = Window(policy.error_window)
        self._healthy_gauge = metrics.DEPLOYMENT_HEALTHY.labels(model, upstream.name)
        self._healthy_gauge.set(1)
        self._inflight_gauge = metrics.DEPLOYMENT_INFLIGHT.labels(model, upstream.name)
        self._inflight_gauge.set(0)

    @property
    def ejected_until(self) -> float:
        """``time.monotonic()`` at which its time out of rotation ends (0: in rotation)."""
        return self.board.get(self.index, EJECTED)

    @property
    def throttled_until(self) -> float:
        return self.board.get(self.index, THROTTLED)

    def is_ejected(self, now: float) -> bool:
        return self._values[self._at + EJECTED] > now

    def is_throttled(self, now: float) -> bool:
        return self._values[self._at + THROTTLED] > now

    @property
    def healthy(self) -> bool:
        return not self.is_ejected(monotonic())

    def has_rate(self) -> bool:
        """Whether its outbound rate cap (if any) lets a request go now."""
        return self.limiter is None or self.limiter.has_capacity()

    @property
    def load(self) -> float:
        """In-flight requests per unit of weight: what routing balances."""
        return self.inflight / self.weight

    def claim(self) -> Slot:
        """Take an in-flight slot (give it back with ``Slot.release``)."""
        self.inflight += 1
        return Slot(self, self.is_ejected(monotonic()))

    def observe_latency(self, seconds: float) -> None:
        """Fold one time-to-headers sample into the EWMA."""
        if self.latency:
            self.latency += _LATENCY_WEIGHT * (seconds - self.latency)
        else:
            self.latency = seconds

    def publish(self) -> None:
        """Set the in-flight gauge to the count (``Health`` calls it every
        ``PUBLISH_INTERVAL``: a gauge update per claim and release would cost a lock,
        and in multiprocess mode a file write, on every request)."""
        self._inflight_gauge.set(self.inflight)


class Slot:
    """One attempt's in-flight slot on a deployment; ``release`` gives it back once."""

    __slots__ = ("held", "out", "state")

    def __init__(self, state: DeploymentState, out: bool = False) -> None:
        self.state = state
        self.held = True
        self.out = out  # sent while the deployment was out of rotation (panic mode)

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        if self.held:
            self.held = False
            self.state.inflight -= 1


class Health:
    """Judges every deployment of one worker from its answers, and runs its probes."""

    __slots__ = (
        "board", "cooldown", "error_min", "error_rate", "session", "states", "tasks", "threshold",
    )  # fmt: skip

    def __init__(self, routing: Routing, board: Board) -> None:
        self.board = board
        self.states: list[DeploymentState] = []  # every deployment of every model
        self.threshold = routing.failure_threshold
        self.cooldown = routing.cooldown
        self.error_rate = routing.error_rate
        self.error_min = routing.error_min_answers
        self.session: h1.Client | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, session: h1.Client) -> None:
        """Probes use the worker's pooled session from now on, and the in-flight gauges
        are kept up to date."""
        self.session = session
        self._spawn(self._publish(), "deployment gauges")

    async def _publish(self) -> None:
        while True:
            for state in self.states:
                state.publish()
            await asyncio.sleep(PUBLISH_INTERVAL)

    def _spawn(self, work: Coroutine[None, None, None], name: str) -> None:
        task = asyncio.create_task(work, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def close(self) -> None:
        """Cancel every probe task and wait for them to finish."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    def succeeded(self, slot: Slot) -> None:
        """A response under 400 relayed to its end, on ``slot``."""
        state = slot.state
        now = monotonic()
        state.failures = 0
        state.window.note(False, now)
        # Sent to it while it was out (panic mode), and served: it is back. (A request
        # sent before it went out proves nothing about it now.)
        if slot.out and state.is_ejected(now):
            self._restore(state, "it served a request in panic mode")

    def failed(self, state: DeploymentState) -> None:
        """Unreachable, timed out, 502/503/504, or a response that broke."""
        state.failures += 1
        if state.failures >= self.threshold:
            self._eject(state, f"{state.failures} consecutive failures")

    def server_error(self, state: DeploymentState) -> None:
        """A 500: ill-health only as a rate."""
        state.window.note(True, monotonic())
        answers, errors = state.window.counts()
        if answers >= self.error_min and errors >= self.error_rate * answers:
            self._eject(state, f"{errors} of its last {answers} answers were 500s")

    def throttled(self, state: DeploymentState, seconds: float | None) -> None:
        """A 429: route elsewhere for ``seconds`` (its Retry-After) when possible."""
        until = monotonic() + (THROTTLE_DEFAULT if seconds is None else seconds)
        if until > state.throttled_until:
            self.board.set(state.index, THROTTLED, until)

    def _eject(self, state: DeploymentState, why: str) -> None:
        now = monotonic()
        with self.board.exclusive(state.index):
            if state.is_ejected(now):
                return  # already out (taken out by this or another worker)
            self.board.set(state.index, EJECTED, now + self.cooldown)
        state._healthy_gauge.set(0)
        log.warning("deployment %s out of rotation for %gs: %s", state.name, self.cooldown, why)
        self._spawn(self._recover(state), f"probe {state.name}")

    def _restore(self, state: DeploymentState, why: str) -> None:
        self.board.set(state.index, EJECTED, 0.0)
        state.failures = 0
        state.window.clear()
        state._healthy_gauge.set(1)
        log.info("deployment %s back in rotation: %s", state.name, why)

    async def _recover(self, state: DeploymentState) -> None:
        while True:
            until = state.ejected_until
            if not until:  # brought back meanwhile, by a success
                state._healthy_gauge.set(1)
                return
            await asyncio.sleep(max(0.0, until - monotonic()))
            if not state.ejected_until:
                continue
            probing = min(PROBE_TIMEOUT, state.upstream.timeouts.first_byte)
            # Others keep skipping it while the probe runs.
            self.board.set(state.index, EJECTED, monotonic() + probing + 1)
            if await self.probe(state.upstream):
                self._restore(state, "its health probe succeeded")
                return
            if state.ejected_until:
                self.board.set(state.index, EJECTED, monotonic() + self.cooldown)

    async def probe(self, upstream: Upstream) -> bool:
        """GET the deployment's health URL: True on a 2xx answer."""
        assert self.session is not None, "Health.start was not called"
        try:
            async with asyncio.timeout(min(PROBE_TIMEOUT, upstream.timeouts.first_byte)):
                async with await self.session.request(
                    upstream.health_origin,
                    "GET",
                    upstream.health_target,
                    list(upstream.auth),
                    None,
                    connect_timeout=upstream.timeouts.connect,
                ) as response:
                    await response.read()
                    return 200 <= response.status < 300
        except (OSError, TimeoutError):
            return False
