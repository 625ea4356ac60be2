"""Passive health: deployments that keep failing leave the rotation for a cooldown and
come back only when a probe of their health URL succeeds.

Invariants:
- Only the deployment's own faults count: connection errors, timeouts, retryable
  statuses (408/429/5xx) and streams that break. A client that went away, or a 4xx the
  caller caused, is neither a failure nor a success.
- ``failures`` counts consecutive failures; any success resets it. Reaching
  ``failure_threshold`` sets ``healthy = False`` and starts exactly one recovery task
  for that deployment; only that task sets ``healthy`` back.
- A probe is a GET of ``health_url`` with the deployment's key: it never spends tokens.
- Probe tasks start lazily and are all cancelled by ``close`` (an app cleanup_ctx).
"""

from __future__ import annotations

import asyncio
import logging
from time import monotonic

from . import h1
from .config import Routing
from .upstream import Upstream

log = logging.getLogger("proxy.health")

# A probe is a cheap GET; give up on it sooner than on a completion.
PROBE_TIMEOUT = 10.0


class Health:
    """Failure accounting for every deployment of one worker, and its probe tasks."""

    __slots__ = ("cooldown", "session", "tasks", "threshold")

    def __init__(self, routing: Routing) -> None:
        self.threshold = routing.failure_threshold
        self.cooldown = routing.cooldown
        self.session: h1.Client | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    def start(self, session: h1.Client) -> None:
        """Probes use the worker's pooled session from now on."""
        self.session = session

    async def close(self) -> None:
        """Cancel every probe task and wait for them to finish."""
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.tasks.clear()

    def succeeded(self, upstream: Upstream) -> None:
        upstream.failures = 0

    def failed(self, upstream: Upstream) -> None:
        """Count one failure; at the threshold, take the deployment out of rotation."""
        upstream.failures += 1
        if upstream.healthy and upstream.failures >= self.threshold:
            self._eject(upstream)

    def _eject(self, upstream: Upstream) -> None:
        upstream.healthy = False
        upstream.cooldown_until = monotonic() + self.cooldown
        log.warning(
            "deployment %s out of rotation for %gs after %d consecutive failures",
            upstream.name,
            self.cooldown,
            upstream.failures,
        )
        task = asyncio.create_task(self._recover(upstream), name=f"probe {upstream.name}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _recover(self, upstream: Upstream) -> None:
        while True:
            await asyncio.sleep(max(0.0, upstream.cooldown_until - monotonic()))
            if await self.probe(upstream):
                break
            upstream.cooldown_until = monotonic() + self.cooldown
        upstream.failures = 0
        upstream.healthy = True
        log.info("deployment %s back in rotation", upstream.name)

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
