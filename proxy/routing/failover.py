"""Sending one client request upstream: attempts, failover to other deployments and to
fallback models, jittered backoff, Retry-After, and retries that never multiply.

Where the next attempt goes, in order: a deployment this request has not tried yet
(the model's own, then each fallback model's; a model in panic draws from all its
deployments, routing.py; a model with none in rotation comes after its fallbacks),
then one it already tried (a retry of the same deployment), then one throttled by a
429 (another request's), then one only held back by its rpm cap (a bounded wait). A
deployment that answered this request 429, timed out on it, or asked for a
Retry-After longer than ``retry_after_max`` is not sent it again: with nothing else
to go to, the client gets that answer at once (Retry-After and all), and its own
retries decide.

Retries never multiply with the client's own: one client request costs at most
``max_attempts`` upstream calls, minus the retries the client already made
(``x-stainless-retry-count``, which the OpenAI SDKs send), and at least one; when the
proxy did retry, the answer tells the SDK not to retry again (``x-should-retry:
false``). Retries also stay within the model's retry budget (``Route.may_retry``).

Invariants:
- All of this happens before any byte goes to the client. Once ``dispatch`` returns
  a ``Lease`` the request is never sent again: a stream that breaks later ends with
  an error event (relay.py), it is not retried.
- Every attempt holds a ``Slot`` (``routing.claim``) that travels with it: released
  when the attempt fails, or by ``Lease.__aexit__`` for the response the client gets;
  ``Slot.release`` is idempotent, so every path may simply release what it holds.
- Every failed attempt is counted in ``morngpt_upstream_errors_total``: here when it
  is retried, by the metrics sink for the one the client gets.
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
from time import monotonic, perf_counter, time
from types import TracebackType
from typing import Final

from multidict import CIMultiDictProxy, istr

from ..config.upstreams import Routing
from ..errors import UpstreamError, UpstreamTimeout
from ..exchange import Exchange
from ..http import h1
from ..http.h1_conn import Response
from ..http.ingress import Forwarding
from ..http.request_body import rewrite
from ..http.upstream import Upstream, open_request
from ..ops import metrics
from .health import DeploymentState, Health, Slot
from .routes import Route, Router, claim

# Statuses that say "not now, not you", so another attempt may succeed.
RETRYABLE: Final = frozenset((408, 429, 500, 502, 503, 504))
# Statuses that say the deployment itself is ill (500s count only as a rate).
_ILL = frozenset((502, 503, 504))
# On an answer after the proxy retried: the SDK must not retry all of that again.
NO_RETRY: Final[Mapping[str, str]] = {"X-Should-Retry": "false"}
_NONE: Final[Mapping[str, str]] = {}
# A retryable error body is read (so the connection can be reused) for at most this.
_DISCARD_TIMEOUT = 1.0
# The OpenAI SDK's count of its own retries of a request (an istr: not lowered per lookup)
_RETRY_COUNT: Final = istr("x-stainless-retry-count")


class Outbound:
    """One client request as it goes upstream, whichever deployment takes it."""

    __slots__ = (
        "_rewritten",
        "asked",
        "body",
        "extra",
        "forwarding",
        "headers",
        "path",
        "peer",
        "strip",
    )

    def __init__(
        self,
        path: str,
        body: bytes,
        headers: CIMultiDictProxy[str],
        peer: str | None,
        forwarding: Forwarding,
        extra: list[tuple[str, str]],
        asked: str,
        strip: bool,
    ) -> None:
        self.path = path
        self.body = body
        # The client's headers as they came, its address, and which forwarding
        # headers are believed: ``Upstream.block`` makes them the lines sent upstream.
        self.headers = headers
        self.peer = peer
        self.forwarding = forwarding
        self.extra = extra  # headers every attempt adds: X-Request-Id, trace context
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
    releases the attempt's slot and, when ``judge``, tells health how it went.
    ``headers`` go on the client's response."""

    __slots__ = ("exchange", "headers", "health", "judge", "response", "slot", "upstream")

    def __init__(
        self,
        slot: Slot,
        response: Response,
        health: Health,
        exchange: Exchange,
        *,
        judge: bool,
    ) -> None:
        self.slot = slot
        self.upstream: Upstream = slot.state.upstream
        self.response = response
        self.health = health
        self.exchange = exchange
        self.judge = judge  # whether the outcome still has to be counted
        # An error the proxy already retried: the SDK must not repeat all of it.
        self.headers = NO_RETRY if exchange.attempts > 1 and response.status >= 400 else _NONE

    async def __aenter__(self) -> Response:
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
            self.slot.release()
            if self.judge:
                self._count(exc)

    def _count(self, exc: BaseException | None) -> None:
        state = self.slot.state
        if isinstance(exc, UpstreamError) or _broke(self.exchange.error):
            self.health.failed(state)  # broke mid-response
        elif exc is None and not self.exchange.error:
            self.health.succeeded(self.slot)
        # Otherwise the client went away, or the proxy failed: not the deployment's doing.


def _broke(error: type[BaseException] | None) -> bool:
    """Whether the relay reported with ``error`` an upstream that broke mid-answer."""
    return error is not None and issubclass(error, UpstreamError)


class _Tries:
    """Where the attempts of one request go (see the module docstring)."""

    __slots__ = ("barred", "chain", "left", "policy", "retrying", "route", "tried")

    def __init__(self, route: Route, policy: Routing, left: int) -> None:
        self.route = route
        self.chain = route.chain
        self.policy = policy
        self.left = left  # upstream calls this request may still make
        self.retrying = False  # whether it holds one of the model's retries in flight
        self.tried: list[DeploymentState] = []
        self.barred: list[DeploymentState] = []

    async def retry(self) -> Slot | None:
        """The slot for another attempt, if attempts and budget remain and a deployment
        can take it; None otherwise. The first retry takes a unit of the model's retry
        budget, held until ``done``."""
        if self.left <= 0:
            return None
        if not self.retrying:
            if not self.route.may_retry(self.policy):
                return None
            self.retrying = True
            self.route.retrying += 1
        return await self.next()

    def done(self) -> None:
        """The request is sent (or given up): its retry budget goes back."""
        if self.retrying:
            self.retrying = False
            self.route.retrying -= 1

    async def next(self) -> Slot | None:
        """A slot on the deployment for the next attempt (see the module docstring), or
        None when no deployment can take it."""
        now = monotonic()
        chain, barred = self.chain, self.barred
        tried = [*self.tried, *barred] if barred else self.tried
        tiers = (
            (tried, False, False),  # untried, of a model with any in rotation
            (tried, False, True),  # untried, of a model with none in rotation
            (barred, False, True),  # a retry of one tried
            (barred, True, True),  # throttled by another request's 429
        )
        for exclude, throttled, panic in tiers:
            for route in chain:
                state = route.choose(now, exclude, throttled=throttled, panic=panic)
                if state is None:
                    continue
                if state.limiter is None:  # nothing to wait for: no coroutine either
                    return self._note(state.claim())
                if (slot := await claim(state, 0)) is not None:
                    return self._note(slot)
        for route in chain:  # held back only by its rpm cap: a bounded wait
            for throttled in (False, True):
                state = route.choose(now, barred, throttled=throttled, rate=False)
                if state is not None:
                    slot = await claim(state, self.policy.rate_wait)
                    if slot is not None:
                        return self._note(slot)
        return None

    def _note(self, slot: Slot) -> Slot:
        self.left -= 1
        if slot.state not in self.tried:
            self.tried.append(slot.state)
        return slot


def attempts_allowed(outbound: Outbound, policy: Routing) -> int:
    """Upstream calls this client request may make: ``max_attempts`` minus the retries
    the client already made of it, and at least one."""
    value = outbound.headers.get(_RETRY_COUNT, "0")
    retries = int(value) if value.isascii() and value.isdigit() and len(value) < 4 else 0
    return max(1, policy.max_attempts - retries)


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
    tries = _Tries(route, policy, attempts_allowed(outbound, policy))
    slot = await tries.next()
    if slot is None:
        raise route.unavailable(outbound.asked)
    try:
        while True:
            exchange.attempts += 1
            state = slot.state
            exchange.deployment = state.name
            asked: float | None = None
            try:
                response = await _send(session, state, outbound, exchange)
            except UpstreamError as exc:
                following = await _after_error(exc, slot, health, tries)
            else:
                status = response.status
                if status not in RETRYABLE:  # any other 4xx is the caller's doing: not judged
                    return Lease(slot, response, health, exchange, judge=status < 400)
                asked = retry_after(response.headers)
                retry = await _after_status(response, slot, asked, health, tries)
                if retry is None:  # the client gets this answer, Retry-After and all
                    return Lease(slot, response, health, exchange, judge=False)
                following = retry
            wait = backoff(exchange.attempts, policy)
            if following.state is state and asked is not None:
                wait = max(wait, asked)
            slot = following
            await _pause(wait, exchange)
    except BaseException as exc:
        slot.release()  # a no-op when the failed attempt gave it back already
        if isinstance(exc, UpstreamError) and exchange.attempts > 1:
            exc.headers = {**exc.headers, **NO_RETRY}
        raise
    finally:
        tries.done()


async def _after_error(exc: UpstreamError, slot: Slot, health: Health, tries: _Tries) -> Slot:
    """After an attempt that failed before its headers: the slot of the next attempt;
    raises ``exc`` when there is none."""
    slot.release()
    state = slot.state
    health.failed(state)
    if isinstance(exc, UpstreamTimeout):  # waiting for it again would double the wait
        tries.barred.append(state)
    following = await tries.retry() if exc.retryable else None
    if following is None:
        raise exc
    metrics.count_upstream_error(state.name, type(exc))
    return following


async def _after_status(
    response: Response, slot: Slot, asked: float | None, health: Health, tries: _Tries
) -> Slot | None:
    """After a retryable status: the slot of the next attempt (``response`` is then
    discarded), or None (the client gets ``response``)."""
    state = slot.state
    status = response.status
    _judge(health, state, status, asked)
    if status == 429 or (asked is not None and asked > tries.policy.retry_after_max):
        tries.barred.append(state)  # never sent this request again
    try:
        following = await tries.retry()
    except BaseException:
        response.close()
        raise
    if following is None:
        return None
    slot.release()
    metrics.count_upstream_error(state.name, None, status)
    try:
        await _discard(response)
    except BaseException:
        following.release()
        raise
    return following


def _judge(health: Health, state: DeploymentState, status: int, asked: float | None) -> None:
    """Tell health what a retryable status says about the deployment."""
    if status == 429:
        health.throttled(state, asked)
    elif status == 500:
        health.server_error(state)
    elif status in _ILL:
        health.failed(state)
    # 408: the upstream gave up on this request; says nothing about its health.


async def _send(
    session: h1.Client, state: DeploymentState, outbound: Outbound, exchange: Exchange
) -> Response:
    """One attempt: the request out, the response headers in."""
    upstream = state.upstream
    body = outbound.body_for(upstream)
    block = upstream.block(outbound.headers, outbound.peer, outbound.forwarding)
    headers = outbound.extra.copy()  # the attempt's traceparent joins them
    trace = exchange.trace  # with tracing on: a CLIENT span per attempt
    if trace is not None:
        trace.attempt(upstream, headers)  # the attempt's traceparent joins the headers
    sent = perf_counter()
    try:
        target = upstream.target(outbound.path)
        response = await open_request(session, upstream, "POST", target, block, headers, body)
    except BaseException as exc:
        if trace is not None:
            trace.attempt_ended(exc)
        raise
    finally:
        exchange.upstream_time += perf_counter() - sent
    if trace is not None:
        trace.attempt_ended(response.status)
    if response.status not in RETRYABLE:
        state.observe_latency(perf_counter() - sent)
    return response


async def _pause(seconds: float, exchange: Exchange) -> None:
    """Wait before the next attempt (its slot is held meanwhile)."""
    start = perf_counter()
    try:
        await asyncio.sleep(seconds)
    finally:
        # Counted as upstream time: the wait is the upstream's doing, not overhead.
        exchange.upstream_time += perf_counter() - start


async def _discard(response: Response) -> None:
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
