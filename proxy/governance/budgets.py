"""Per-key budgets, the gate's side: what a request may cost at worst, which period it
falls in, the Redis state rebuilt from the usage ledger, the budget's answer to an
admission (its headers, its 429 or 503: ``judge``) and the alert line.

A key with a budget is admitted only if its worst case fits: ``limit - spent - held``
in the key's current period (daily, weekly, monthly or total, from local midnight in
the key's time zone; periods.py). The worst case is the prompt estimate (body bytes
/ 4) plus the answer cap (``max_tokens`` … or ``limits.default_max_tokens``, times
``n``) at the highest price that may serve the model (pricing.py). The reservation is
taken in the same Redis call as the rate limits (ratelimit/bucket.lua) and settled
with the real cost when the exchange is over (``KeyGrant.settle``).

Invariants:
- Amounts are integer nano-units (10**-9 of the price unit) everywhere but in what
  people read. A period is charged by the time its request started
  (``Exchange.started_at``), which is also what places its ledger row, so a rebuilt
  state and Redis agree on which period a request belongs to.
- The Redis state of a period is never assumed empty: when it is missing (a new
  period, or Redis lost it) the limiter answers ``rebuild`` and ``rebuild`` here sums
  the ledger for the period (one query per key and period at a time in a worker;
  concurrent requests share it), then the admission is retried with that spend. A
  ledger that cannot be read means a 503: the budget cannot be checked.
- Known window: rows not committed yet when the ledger is read (the writer's queue,
  up to ``usage.flush_interval``; spool files during a database outage) are not in
  the rebuilt spend. Requests in flight when the state was lost are charged when they
  end (their settlement adds to the rebuilt state), so nothing is counted twice.
- A period's state outlives its end by ``GRACE_MS`` so that long requests that began
  in it still settle there.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from decimal import ROUND_CEILING, Decimal

from ..db import Db
from ..errors import QuotaExceeded, ServiceUnavailable
from ..ops.metrics import BUDGET_ALERTS, BUDGET_REJECTIONS
from ..usage.spend import spent, team_spent
from .keys.lookup import STORE_FAILURES
from .keys.record import Key
from .keys.teams import Team
from .periods import Period, go_duration, period_of, zone
from .pricing import Prices, show, units
from .ratelimit.bucket import Verdict
from .ratelimit.ticket import Ask, Ticket

log = logging.getLogger("proxy.budget")

GRACE_MS = 86_400_000
# Worst cases are capped before they go to Redis (Lua counts in doubles, exact below
# 2**53); a budget is at most 10**15 nano-units, so a capped charge is still refused.
MAX_CHARGE = 2**52


def nano(amount: Decimal) -> int:
    """An amount of the price unit in whole nano-units (rounded up)."""
    return int(amount.scaleb(9).to_integral_value(rounding=ROUND_CEILING))


class Budgets:
    """Worst cases, periods, rebuilds and refusals for the keys that have a budget."""

    def __init__(self, prices: Prices, db: Db, timeout: float, alert_share: float) -> None:
        self.prices = prices
        self.db = db
        self.timeout = timeout
        self.alert_share = alert_share
        # (period kind, time zone) → the period most recently asked for.
        self._periods: dict[tuple[str, str], Period] = {}
        self._rebuilding: dict[tuple[str, int], asyncio.Task[int | Exception]] = {}
        self._alerted: dict[str, int] = {}  # key id → period already logged
        self._failing = False

    def period(self, key: Key | Team, when: float) -> Period:
        """The key's budget period that contains ``when`` (computed once per period)."""
        which = (key.budget_period, key.budget_tz)
        period = self._periods.get(which)
        if period is None or not period.contains(when):
            period = period_of(key.budget_period, zone(key.budget_tz), when)
            self._periods[which] = period
        return period

    def ask(self, key: Key | Team, model: str, prompt: int, answer: int, when: float) -> Ask:
        """What to reserve for a request to ``model`` of ``prompt`` estimated tokens and
        at most ``answer`` answer tokens, started at ``when``."""
        assert key.budget is not None
        period = self.period(key, when)
        charge = min(self.prices.worst_case(model, prompt, answer), MAX_CHARGE)
        ttl = 0 if period.end is None else int((period.end - when) * 1000) + GRACE_MS
        return Ask(int(key.budget.scaleb(9)), period.id, charge, ttl)

    async def rebuild(self, key: Key | Team, ask: Ask, when: float) -> Ask:
        """``ask`` with the period's spend from the ledger, to create the lost state.
        Raises ``ServiceUnavailable`` when the ledger cannot be read."""
        period = self.period(key, when)
        where = (_named(key), period.id)
        task = self._rebuilding.get(where)
        if task is None:
            task = asyncio.create_task(self._spent(key, period))
            self._rebuilding[where] = task
            task.add_done_callback(lambda _: self._rebuilding.pop(where, None))
        # Shielded: a client that goes away must not cancel the query others wait on.
        result = await asyncio.shield(task)
        if isinstance(result, Exception):
            raise ServiceUnavailable(
                "The budget of this API key cannot be checked right now; retry shortly.",
                headers={"Retry-After": "1"},
            )
        return ask._replace(base=result, epoch=secrets.token_hex(8))

    async def _spent(self, key: Key | Team, period: Period) -> int | Exception:
        of = team_spent if isinstance(key, Team) else spent
        try:
            async with asyncio.timeout(self.timeout):
                total = await of(self.db, key.id, period.start, period.end)
        except STORE_FAILURES as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "budgets: cannot read the usage ledger (%s); keys with a budget get "
                    "503 until their state is rebuilt",
                    type(exc).__name__,
                )
            return exc
        self._failing = False
        amount = nano(total)
        level = logging.INFO if amount else logging.DEBUG  # 0: a new period has begun
        log.log(level, "budget of %s rebuilt from the ledger: %s spent", _named(key), show(total))
        return amount

    def watch(self, key: Key | Team, ask: Ask, verdict: Verdict) -> None:
        """Log (once per key, period and worker) a key whose spend and reservations
        passed ``limits.budget_alert_share`` of its budget."""
        used = ask.budget - verdict.budget_left
        if used < self.alert_share * ask.budget or self._alerted.get(_named(key)) == ask.period:
            return
        self._alerted[_named(key)] = ask.period
        BUDGET_ALERTS.inc()
        log.warning(
            "budget alert: %s has used %d%% of its %s budget (%s of %s, spent or reserved)",
            _named(key),
            used * 100 // ask.budget,
            key.budget_period,
            show(units(used)),
            show(units(ask.budget)),
        )

    def judge(
        self,
        key: Key,
        ask: Ask | None,
        team: Team | None,
        team_ask: Ask | None,
        ticket: Ticket,
        when: float,
        headers: dict[str, str],
    ) -> None:
        """The budgets' part of an admission's answer (``ask``: the key's, ``team_ask``:
        its team's, None without a budget): adds ``x-budget-remaining`` and
        ``x-budget-reset`` to ``headers`` (of the key's budget, else of its team's), or
        raises the refusal: a 503 when the budget state was lost again at once (Redis is
        not keeping it), the 429 ``insufficient_quota`` when a budget cannot take the
        request's worst case."""
        verdict = ticket.verdict
        if verdict.kind == "rebuild":  # lost again at once: Redis is not keeping it
            raise ServiceUnavailable(
                "The budget of this API key cannot be checked right now; retry shortly.",
                headers={**headers, "Retry-After": "1"},
            )
        if ask is not None:
            headers.update(self.headers(key, verdict, when))
        elif team is not None and ticket.team is not None:
            headers.update(self.headers(team, ticket.team.verdict, when))
        if verdict.kind == "budget":
            by_team = verdict.scope == 1 and team_ask is not None and ticket.team is not None
            if by_team and team is not None and team_ask is not None and ticket.team is not None:
                raise self.refusal(team, team_ask, ticket.team.verdict, headers)
            assert ask is not None
            raise self.refusal(key, ask, verdict, headers)

    def headers(self, key: Key | Team, verdict: Verdict, when: float) -> dict[str, str]:
        """``x-budget-remaining`` (in the price unit) and ``x-budget-reset``."""
        headers = {"x-budget-remaining": show(units(max(verdict.budget_left, 0)))}
        end = self.period(key, when).end
        if end is not None:
            headers["x-budget-reset"] = go_duration(max(int((end - when) * 1000), 0))
        return headers

    def refusal(
        self, key: Key | Team, ask: Ask, verdict: Verdict, headers: dict[str, str]
    ) -> QuotaExceeded:
        """The 429 ``insufficient_quota`` for a request the budget cannot take. When
        only the reservations of requests in flight are in the way, the SDK is told to
        retry in a second; otherwise not to retry (``x-should-retry``)."""
        BUDGET_REJECTIONS.inc()
        left, held = max(verdict.budget_left, 0), verdict.budget_held
        which = key.budget_period
        whose = f"team {key.id}'s" if isinstance(key, Team) else "API key's"
        charge = show(units(ask.charge))
        if ask.charge <= left + held:
            headers.update({"Retry-After": "1", "retry-after-ms": "1000"})
            headers["x-should-retry"] = "true"
            message = (
                f"This {whose} {which} budget has {show(units(left))} left beyond what "
                f"requests in flight reserved ({show(units(held))}), and this request may "
                f"cost up to {charge}. Retry when they have finished."
            )
        else:
            headers["x-should-retry"] = "false"
            message = (
                f"You exceeded your current quota: this {whose} {which} budget of "
                f"{show(units(ask.budget))} has {show(units(left))} left, and this request "
                f"may cost up to {charge}. Lower max_tokens, or wait for the next period."
            )
        return QuotaExceeded(message, headers=headers)


def _named(key: Key | Team) -> str:
    """How logs and caches name a key or a team (a team id may equal a key id)."""
    return f"team {key.id}" if isinstance(key, Team) else f"key {key.id}"
