"""The key gate (the ``Gate`` of exchange.py): who is asking, may they use this model,
and within which limits.

``authenticate``: the key from the headers (keys.lookup), before the body is read.
``admit``: 403 if the key may not use the model → one
limiter call (keys without limits make none) → a ``KeyGrant`` whose headers are
OpenAI's six x-ratelimit-* headers (for the limits the key has), or a 429 with
``Retry-After`` / ``retry-after-ms`` from the bucket's refill time.

``KeyGrant.settle`` runs in the handler's ``finally`` once the answer or stream is
over, on every path (error, disconnect, cancel), and acts once: it charges the real
token count against the reservation and gives the parallel slot back.

Keys with a budget (budgets.py) reserve the request's worst-case cost in the same
limiter call; a missing budget state is rebuilt from the usage ledger and the call
retried once. A refusal by the budget is a 429 ``insufficient_quota``; admitted
requests get ``x-budget-remaining`` (what the budget has left after reserving this
request's worst case, in the price unit) and ``x-budget-reset`` (time to the next
period; none for a total budget). Settling adds ``Exchange.cost`` to the spend and
gives the rest of the reservation back.

Token reservation: the request body's bytes / 4, rounded up (the usage ledger's
estimate of prompt tokens; JSON syntax makes it err high) plus the answer's cap —
max_tokens, max_completion_tokens or max_output_tokens, else
``limits.default_max_tokens``, nothing for embeddings — times ``n`` (at most
``wire.MAX_COUNT``). Settling charges
``usage.total_tokens``; with no usage reported, the ledger's estimate for a request
that reached an upstream and did not fail there, else nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

from aiohttp import web

from .budgets import Budgets
from .config import Config, Limits
from .db import DB
from .errors import Forbidden, RateLimited, ServiceUnavailable
from .exchange import OPEN, Caller, Exchange, Grant
from .identity import Authenticator
from .keys.lookup import KeyCache, KeyLookup
from .keys.record import Key
from .keys.store import KeyStore
from .metrics import RATELIMIT_KINDS, RATELIMITED
from .pricing import show, units
from .ratelimit.bucket import Verdict
from .ratelimit.limiter import LIMITER, Limiter, Ticket
from .usage.record import BYTES_PER_TOKEN, consumed
from .wire import MAX_COUNT, RequestView

if TYPE_CHECKING:
    from .app import State

_REFUSED = {kind: RATELIMITED.labels(kind) for kind in RATELIMIT_KINDS}


class KeyGate:
    """Authentication, model permissions and per-key limits; see the module docstring."""

    def __init__(
        self, lookup: KeyLookup, limiter: Limiter, limits: Limits, budgets: Budgets
    ) -> None:
        self.lookup = lookup
        self.limiter = limiter
        self.budgets = budgets
        self.default_max_tokens = limits.default_max_tokens

    async def authenticate(self, request: web.Request) -> Key:
        return await self.lookup.authenticate(request.headers)

    async def admit(self, caller: Caller, view: RequestView, exchange: Exchange) -> Grant:
        key = cast(Key, caller)  # this gate's authenticate only ever returns keys
        if not key.allows(view.model):
            raise Forbidden(
                f"This API key may not use the model `{view.model[:200]}`.", param="model"
            )
        if not key.is_limited:
            return OPEN
        prompt, answer = reserved(
            exchange.body_bytes, view, exchange.endpoint, self.default_max_tokens
        )
        cost = prompt + answer
        if key.budget is None:
            ticket = await self.limiter.admit(key, cost)
            headers = ratelimit_headers(key, ticket.verdict)
            if not ticket.verdict.allowed:
                raise refusal(key, ticket.verdict, cost, headers)
            return KeyGrant(headers, key, self.limiter, ticket, cost)
        return await self._admit_budget(key, view.model, prompt, answer, exchange)

    async def _admit_budget(
        self, key: Key, model: str, prompt: int, answer: int, exchange: Exchange
    ) -> KeyGrant:
        """``admit`` for a key with a budget: the worst case reserved with the limits."""
        when = exchange.started_at
        ask = self.budgets.ask(key, model, prompt, answer, when)
        ticket = await self.limiter.admit(key, prompt + answer, ask)
        if ticket.verdict.kind == "rebuild":
            ask = await self.budgets.rebuild(key, ask, when)
            ticket = await self.limiter.admit(key, prompt + answer, ask)
        verdict = ticket.verdict
        headers = ratelimit_headers(key, verdict)
        if verdict.kind == "rebuild":  # lost again at once: Redis is not keeping it
            raise ServiceUnavailable(
                "The budget of this API key cannot be checked right now; retry shortly.",
                headers={**headers, "Retry-After": "1"},
            )
        headers.update(self.budget_headers(key, verdict, when))
        if verdict.kind == "budget":
            raise self.budgets.refusal(key, ask, verdict, headers)
        if not verdict.allowed:
            raise refusal(key, verdict, prompt + answer, headers)
        self.budgets.watch(key, ask, verdict)
        return KeyGrant(headers, key, self.limiter, ticket, prompt + answer)

    def budget_headers(self, key: Key, verdict: Verdict, when: float) -> dict[str, str]:
        """``x-budget-remaining`` (in the price unit) and ``x-budget-reset``."""
        headers = {"x-budget-remaining": show(units(max(verdict.budget_left, 0)))}
        end = self.budgets.period(key, when).end
        if end is not None:
            headers["x-budget-reset"] = go_duration(max(int((end - when) * 1000), 0))
        return headers


class KeyGrant(Grant):
    """An admitted request of a limited key: settles its limiter ticket once."""

    __slots__ = ("cost", "key", "limiter", "ticket")

    def __init__(
        self, headers: dict[str, str], key: Key, limiter: Limiter, ticket: Ticket, cost: int
    ) -> None:
        super().__init__(headers)
        self.key = key
        self.limiter: Limiter | None = limiter
        self.ticket = ticket
        self.cost = cost

    def settle(self, exchange: Exchange) -> None:
        limiter, self.limiter = self.limiter, None
        if limiter is not None:
            limiter.settle(self.key, self.ticket, charged(exchange) - self.cost, exchange.cost)


def reserved(body_bytes: int, view: RequestView, endpoint: str, default: int) -> tuple[int, int]:
    """Tokens to reserve before forwarding (see the module docstring), in two parts:
    (prompt tokens, answer tokens)."""
    answer = view.max_tokens or view.max_completion_tokens or view.max_output_tokens
    if answer is None:
        answer = 0 if endpoint == "embeddings" else default
    prompt = -(-body_bytes // BYTES_PER_TOKEN)
    # Capped like the counts an upstream reports: the client's numbers are not trusted
    # either, and bucket.lua counts exactly only below 2**53 units.
    return prompt, min(max(answer, 0) * max(view.n or 1, 1), MAX_COUNT)


def charged(exchange: Exchange) -> int:
    """Tokens the exchange consumed, as the usage ledger counts them."""
    return consumed(exchange)[0].total_tokens


def ratelimit_headers(key: Key, verdict: Verdict) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits ``key`` has."""
    headers = {}
    if key.rpm:
        headers["x-ratelimit-limit-requests"] = str(key.rpm)
        headers["x-ratelimit-remaining-requests"] = str(verdict.requests_remaining)
        headers["x-ratelimit-reset-requests"] = go_duration(verdict.requests_reset_ms)
    if key.tpm:
        headers["x-ratelimit-limit-tokens"] = str(key.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(verdict.tokens_remaining)
        headers["x-ratelimit-reset-tokens"] = go_duration(verdict.tokens_reset_ms)
    return headers


def refusal(key: Key, verdict: Verdict, cost: int, headers: dict[str, str]) -> RateLimited:
    """The 429 for a refused admission: OpenAI's body, ``Retry-After`` in whole seconds
    (rounded up) and ``retry-after-ms``, which the SDK prefers."""
    retry = verdict.retry_ms
    headers["Retry-After"] = str(-(-retry // 1000))
    headers["retry-after-ms"] = str(retry)
    wait = go_duration(retry)
    if verdict.kind == "tokens":
        message = (
            f"Rate limit reached for tokens per minute: limit {key.tpm}, requested {cost}. "
            f"Please try again in {wait}."
        )
    elif verdict.kind == "requests":
        message = (
            f"Rate limit reached for requests per minute: limit {key.rpm}. "
            f"Please try again in {wait}."
        )
    else:
        message = (
            f"Too many parallel requests for this API key: limit {key.max_parallel}. "
            "Please try again when one has finished."
        )
    _REFUSED[verdict.kind].inc()
    error = RateLimited(message, headers=headers)
    error.type = "tokens" if verdict.kind == "tokens" else "requests"
    return error


def go_duration(ms: int) -> str:
    """A duration the way OpenAI (Go) writes it: ``12ms``, ``1s``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest // 1000}" if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


async def open_gate(app: web.Application, config: Config, state: State) -> AsyncIterator[None]:
    """cleanup_ctx body: put a ``KeyGate`` on ``state`` (it needs ``app[DB]`` and
    ``app[LIMITER]``, so it runs after their contexts)."""
    cache = KeyCache(KeyStore(app[DB]), config.auth, config.database.timeout)
    lookup = KeyLookup(cache, config.auth, config.keys)
    share = config.limits.budget_alert_share
    budgets = Budgets(state.prices, app[DB], config.database.timeout, share)
    state.gate = KeyGate(lookup, app[LIMITER], config.limits, budgets)
    state.authenticator = Authenticator(lookup, config.server.ops_token)
    yield
