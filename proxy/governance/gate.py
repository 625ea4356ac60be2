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
retried once. The budget's answer is budgets.py's (``Budgets.judge``): a refusal is a
429 ``insufficient_quota``; admitted requests get ``x-budget-remaining`` (what the
budget has left after reserving this request's worst case, in the price unit) and
``x-budget-reset`` (time to the next period; none for a total budget). Settling adds
``Exchange.cost`` to the spend and gives the rest of the reservation back.

Token reservation: the request body's bytes / 4, rounded up (the usage ledger's
estimate of prompt tokens; JSON syntax makes it err high) plus the answer's cap —
max_tokens, max_completion_tokens or max_output_tokens, else
``limits.default_max_tokens``, nothing for embeddings — times ``n`` (at most
``wire.MAX_COUNT``). Settling charges
``usage.total_tokens``; with no usage reported, the ledger's estimate for a request
that reached an upstream and did not fail there, else nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from ..config.schema import Limits
from ..errors import Forbidden, RateLimited, TokensRateLimited, Unauthorized
from ..exchange import OPEN, Caller, Exchange, Grant
from ..http.wire import MAX_COUNT, RequestView
from ..ops.metrics import RATELIMIT_KINDS, RATELIMITED
from ..usage.row import BYTES_PER_TOKEN, consumed
from .budgets import Budgets
from .keys.lookup import KeyCache, KeyLookup
from .keys.record import Key
from .keys.teams import Team
from .periods import go_duration
from .ratelimit.bucket import Verdict
from .ratelimit.limiter import Limiter
from .ratelimit.ticket import Ticket

_REFUSED = {kind: RATELIMITED.labels(kind) for kind in RATELIMIT_KINDS}


class KeyGate:
    """Authentication, model permissions and per-key limits; see the module docstring."""

    def __init__(
        self,
        lookup: KeyLookup,
        limiter: Limiter,
        limits: Limits,
        budgets: Budgets,
        teams: KeyCache[Team] | None = None,
    ) -> None:
        self.lookup = lookup
        self.teams = teams
        self.limiter = limiter
        self.budgets = budgets
        self.default_max_tokens = limits.default_max_tokens

    async def authenticate(self, headers: Mapping[str, str]) -> Key:
        return await self.lookup.authenticate(headers)

    async def admit(self, caller: Caller, view: RequestView, exchange: Exchange) -> Grant:
        key = cast(Key, caller)  # this gate's authenticate only ever returns keys
        team = await self.team_of(key)
        if not key.allows(view.model) or (team is not None and not team.allows(view.model)):
            raise Forbidden(
                f"This API key may not use the model `{view.model[:200]}`.", param="model"
            )
        if team is not None and not team.is_limited:
            team = None  # nothing to count for it
        if not key.is_limited and team is None:
            return OPEN
        prompt, answer = reserved(
            exchange.body_bytes, view, exchange.endpoint, self.default_max_tokens
        )
        cost = prompt + answer
        if key.budget is None and (team is None or team.budget is None):
            ticket = await self.limiter.admit(key, cost, team=team)
            headers = ratelimit_headers(key, ticket.verdict)
            if not ticket.verdict.allowed:
                raise refusal(_refuser(key, team, ticket.verdict), ticket.verdict, cost, headers)
            return KeyGrant(headers, key, self.limiter, ticket, cost, team)
        return await self._admit_budget(key, team, view.model, prompt, answer, exchange)

    async def _admit_budget(
        self,
        key: Key,
        team: Team | None,
        model: str,
        prompt: int,
        answer: int,
        exchange: Exchange,
    ) -> KeyGrant:
        """``admit`` for a key (or team) with a budget: the worst case reserved with the
        limits, for the key's budget and its team's in the same call."""
        when = exchange.started_at
        cost = prompt + answer
        ask = None if key.budget is None else self.budgets.ask(key, model, prompt, answer, when)
        team_ask = None
        if team is not None and team.budget is not None:
            team_ask = self.budgets.ask(team, model, prompt, answer, when)
        ticket = await self.limiter.admit(key, cost, ask, team, team_ask)
        for _ in range(2):  # each of the two states may need its rebuild
            if ticket.verdict.kind != "rebuild":
                break
            if ticket.verdict.scope == 0 and ask is not None:
                ask = await self.budgets.rebuild(key, ask, when)
            elif team is not None and team_ask is not None:
                team_ask = await self.budgets.rebuild(team, team_ask, when)
            ticket = await self.limiter.admit(key, cost, ask, team, team_ask)
        verdict = ticket.verdict
        headers = ratelimit_headers(key, verdict)
        # The budget's answer: its headers, or its refusal (budgets.py).
        self.budgets.judge(key, ask, team, team_ask, ticket, when, headers)
        if not verdict.allowed:
            raise refusal(_refuser(key, team, verdict), verdict, cost, headers)
        if ask is not None:
            self.budgets.watch(key, ask, verdict)
        if team is not None and team_ask is not None and ticket.team is not None:
            self.budgets.watch(team, team_ask, ticket.team.verdict)
        return KeyGrant(headers, key, self.limiter, ticket, cost, team)

    async def team_of(self, key: Key) -> Team | None:
        """The key's team (cached like keys), None when it has none. A team that does
        not exist (a JWT naming an unknown one) is a 401."""
        if key.team_id is None or self.teams is None:
            return None
        team = await self.teams.find(key.team_id)
        if team is None:
            raise Unauthorized(f"The team `{key.team_id[:64]}` of these credentials is unknown.")
        return team


class KeyGrant:
    """An admitted request of a limited key: settles its limiter ticket once."""

    __slots__ = ("cost", "headers", "key", "limiter", "team", "ticket")

    def __init__(
        self,
        headers: dict[str, str],
        key: Key,
        limiter: Limiter,
        ticket: Ticket,
        cost: int,
        team: Team | None = None,
    ) -> None:
        self.headers: Mapping[str, str] = headers
        self.key = key
        self.limiter: Limiter | None = limiter
        self.ticket = ticket
        self.cost = cost
        self.team = team

    def settle(self, exchange: Exchange) -> None:
        limiter, self.limiter = self.limiter, None
        if limiter is not None:
            debt = charged(exchange) - self.cost
            limiter.settle(self.key, self.ticket, debt, exchange.cost, self.team)


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


def _refuser(key: Key, team: Team | None, verdict: Verdict) -> Key | Team:
    """Whose limit refused: the key's, or (``Verdict.scope`` 1) its team's."""
    return team if verdict.scope == 1 and team is not None else key


def refusal(key: Key | Team, verdict: Verdict, cost: int, headers: dict[str, str]) -> RateLimited:
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
    if isinstance(key, Team):
        message = message.replace("this API key", "its team").removesuffix(".")
        message = f"{message} (team {key.id}, shared by its keys)."
    _REFUSED[verdict.kind].inc()
    refused = TokensRateLimited if verdict.kind == "tokens" else RateLimited
    return refused(message, headers=headers)
