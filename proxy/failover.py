"""Sending one client request upstream: attempts, failover to other deployments and to
fallback models, jittered backoff, Retry-After.

Where the next attempt goes, in order: a deployment this request has not tried yet
(the model's own, then each fallback model's), then one it already tried (a retry of
the same deployment, if nothing else is left), then one only held back by its rpm
cap (a bounded wait). A deployment that asked for a Retry-After longer than
``retry_after_max`` is not sent this request again.

Invariants:
- All of this happens before any byte goes to the client. Once ``dispatch`` returns
  a ``Lease`` the request is never sent again: a stream that breaks later ends with
  an error event (relay.py), it is not retried.
- Every in-flight slot taken (``routing.claim``) is given back exactly once: by the
  loop for a failed attempt, by ``Lease.__aexit__`` for the response the client gets.
- The client gets the last failure (the upstream's retryable response passed
  through, or the proxy's 502/504), or a 503 with Retry-After when no deployment
  could take the request at all.
- A request cancelled because its client went away counts for no deployment.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
from collections.abc import Mapping
from time import perf_counter, time
from types import TracebackType

from multidict import CIMultiDictProxy

from . import h1, tracing
from .config import Routing
from .errors import UpstreamError, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from .exchange import Exchange
from .health import Health
from .routing import Route, Router, claim
from .upstream import Upstream, forward_headers, open_request
from .wire import rewrite

# Statuses that say "not now, not you", so another attempt may succeed.
RETRYABLE = frozenset((408, 429, 500, 502, 503, 504))
# A retryable error body is read (so the connection can be reused) for at most this.
_DISCARD_TIMEOUT = 1.0
# ``Exchange.error`` values with which the relay reports an upstream that broke.
_BROKE = frozenset(
    c.__name__ for c in (UpstreamError, UpstreamUnavailable, UpstreamTimeout, UpstreamProtocolError)
)


class Outbound:
    """One client request as it goes upstream, whichever deployment takes it."""

    __slots__ = ("_rewritten", "asked", "body", "client_headers", "path", "request_id", "strip")

    def __init__(
        self,
        path: str,
        body: bytes,
        client_headers: CIMultiDictProxy[str],
        request_id: str,
        asked: str,
        strip: bool,
    ) -> None:
        self.path = path
        self.body = body
        self.client_headers = client_headers
        self.request_id = request_id
        self.asked = asked  # the model name the client sent
        self.strip = strip  # the proxy asks for stream usage and strips it again
        self._rewritten: tuple[str | None, bytes] | None = None

    def body_for(self, upstream: Upstream) -> bytes:
        """The body as ``upstream`` needs it: its model name, usage asked for when the
        proxy needs it; every other byte as the client sent it."""
        model = upstream.model if upstream.model != self.asked else None
        if model is None and not self.strip:
            return self.body
        if self._rewritten is None or self._rewritten[0] != model:
            self._rewritten = (model, rewrite(self.body, model=model, include_usage=self.strip))
        return self._rewritten[1]


class Lease:
    """The response the client gets, on loan from its deployment until the relay is
    done: ``async with lease as response``. Leaving the block closes the response,
    gives the in-flight slot back and, when ``judge``, tells health how it went."""

    __slots__ = ("exchange", "health", "judge", "response", "slot", "upstream")

    def __init__(
        self,
        upstream: Upstream,
        response: h1.Response,
        health: Health,
        exchange: Exchange,
        *,
        slot: bool,
        judge: bool,
    ) -> None:
        self.upstream = upstream
        self.response = response
        self.health = health
        self.exchange = exchange
        self.slot = slot  # whether this lease still holds the in-flight slot
        self.judge = judge  # whether the outcome still has to be counted

    async def __aenter__(self) -> h1.Response:
        return self.response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.response.__aexit__(exc_type, exc, tb)
        finally:
            if self.slot:
                self.upstream.inflight -= 1
            if self.judge:
                self._count(exc)

    def _count(self, exc: BaseException | None) -> None:
        if isinstance(exc, UpstreamError) or self.exchange.error in _BROKE:
            self.health.failed(self.upstream)  # broke mid-response
        elif exc is None and not self.exchange.error:
            self.health.succeeded(self.upstream)
        # Otherwise the client went away, or the proxy failed: not the deployment's doing.


class _Tries:
    """Where the attempts of one request go (see the module docstring)."""

    __slots__ = ("barred", "chain", "rate_wait", "tried")

    def __init__(self, route: Route, policy: Routing) -> None:
        self.chain = route.chain
        self.rate_wait = policy.rate_wait
        self.tried: list[Upstream] = []
        self.barred: list[Upstream] = []

    async def next(self) -> Upstream | None:
        """A deployment with a claimed slot for the next attempt, or None."""
        untried = [*self.tried, *self.barred] if self.barred else self.tried
        for route in self.chain:
            upstream = route.choose(untried)
            if upstream is not None and await claim(upstream, 0):
                return self._note(upstream)
        for route in self.chain:
            upstream = route.choose(self.barred)
            if upstream is not None and await claim(upstream, 0):
                return self._note(upstream)
        for route in self.chain:
            upstream = route.choose_throttled(self.barred)
            if upstream is not None and await claim(upstream, self.rate_wait):
                return self._note(upstream)
        return None

    def _note(self, upstream: Upstream) -> Upstream:
        if upstream not in self.tried:
            self.tried.append(upstream)
        return upstream


async def dispatch(
    session: h1.Client,
    router: Router,
    route: Route,
    outbound: Outbound,
    exchange: Exchange,
) -> Lease:
    """Send ``outbound`` to a deployment of ``route`` or of its fallbacks, trying others
    on retryable failures, and lend the final response to the caller (see the module
    invariants). Raises the last ``UpstreamError``, or ``ServiceUnavailable``."""
    policy, health = router.policy, router.health
    tries = _Tries(route, policy)
    upstream = await tries.next()
    if upstream is None:
        raise route.unavailable()
    while True:
        exchange.attempts += 1
        exchange.deployment = upstream.name
        asked: float | None = None
        try:
            response = await _send(session, upstream, outbound, exchange)
        except BaseException as exc:
            upstream.inflight -= 1
            if not isinstance(exc, UpstreamError):
                raise  # cancelled (client gone) or a bug: nobody's failure
            health.failed(upstream)
            following = await _following(tries, exchange, policy) if exc.retryable else None
            if following is None:
                raise
        else:
            if response.status not in RETRYABLE:
                judge = response.status < 400  # any other 4xx is the caller's doing
                return Lease(upstream, response, health, exchange, slot=True, judge=judge)
            upstream.inflight -= 1
            health.failed(upstream)
            following, asked = await _instead(response, upstream, tries, exchange, policy)
            if following is None:  # the client gets this answer, Retry-After and all
                return Lease(upstream, response, health, exchange, slot=False, judge=False)
        wait = backoff(exchange.attempts, policy)
        if following is upstream and asked is not None:
            wait = max(wait, asked)
        upstream = following
        await _pause(wait, upstream, exchange)


async def _send(
    session: h1.Client, upstream: Upstream, outbound: Outbound, exchange: Exchange
) -> h1.Response:
    """One attempt: the request out, the response headers in."""
    body = outbound.body_for(upstream)
    headers = forward_headers(outbound.client_headers, upstream, outbound.request_id)
    tracing.attempt_started(exchange, upstream, headers)
    sent = perf_counter()
    try:
        target = upstream.target(outbound.path)
        response = await open_request(session, upstream, "POST", target, headers, body)
    except BaseException as exc:
        tracing.attempt_ended(exchange, exc)
        raise
    finally:
        exchange.upstream_time += perf_counter() - sent
    tracing.attempt_ended(exchange, response.status)
    if response.status not in RETRYABLE:
        upstream.observe_latency(perf_counter() - sent)
    return response


async def _instead(
    response: h1.Response,
    upstream: Upstream,
    tries: _Tries,
    exchange: Exchange,
    policy: Routing,
) -> tuple[Upstream | None, float | None]:
    """After a retryable status: the deployment for another attempt (None: the client
    gets ``response``, untouched) and the Retry-After the upstream asked for. When
    there is another attempt, ``response`` is discarded."""
    asked = retry_after(response.headers)
    if asked is not None and asked > policy.retry_after_max:
        tries.barred.append(upstream)  # too long to wait for it: never again this request
    try:
        following = await _following(tries, exchange, policy)
    except BaseException:
        response.close()
        raise
    if following is not None:
        try:
            await _discard(response)
        except BaseException:
            following.inflight -= 1
            raise
    return following, asked


async def _following(tries: _Tries, exchange: Exchange, policy: Routing) -> Upstream | None:
    """The deployment for another attempt, if attempts remain and one can take it."""
    if exchange.attempts >= policy.max_attempts:
        return None
    return await tries.next()


async def _pause(seconds: float, claimed: Upstream, exchange: Exchange) -> None:
    """Wait before the next attempt, giving ``claimed``'s slot back if cancelled."""
    start = perf_counter()
    try:
        await asyncio.sleep(seconds)
    except BaseException:
        claimed.inflight -= 1
        raise
    finally:
        # Counted as upstream time: the wait is the upstream's doing, not overhead.
        exchange.upstream_time += perf_counter() - start


async def _discard(response: h1.Response) -> None:
    """Read and drop an error body (keeps the connection reusable), then close."""
    try:
        async with asyncio.timeout(_DISCARD_TIMEOUT):
            await response.read()
    except (OSError, TimeoutError):
        pass
    finally:
        response.close()


def backoff(attempt: int, policy: Routing) -> float:
    """Full-jitter exponential backoff after ``attempt`` attempts."""
    ceiling = min(policy.backoff_max, policy.backoff_base * 2 ** (attempt - 1))
    return random.uniform(0, ceiling)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the upstream asked to wait: ``retry-after-ms``, else ``Retry-After``
    (seconds or an HTTP date); None when absent or unreadable."""
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time())
