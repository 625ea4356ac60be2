"""The token-bucket cases: one table of (call, expected verdict) steps that
tests/governance/test_bucket.py runs against the Python twin and bucket.lua, and
tests/governance/test_cluster.py against a Redis Cluster."""

from __future__ import annotations

from typing import Any

from proxy.governance.ratelimit.bucket import UNIT, Call, Settlement, Verdict


def call(
    now: int,
    *,
    rpm: int = 0,
    tpm: int = 0,
    parallel: int = 0,
    cost: int = 0,
    debt: int = 0,
    take: bool = True,
    slot: str = "",
    release: str = "",
    ttl: int = 60_000,
    **budget: Any,
) -> Call:
    if "budget" in budget:
        budget.setdefault("hold_ttl", ttl)
    return Call(now, rpm, tpm, parallel, cost, debt, take, slot, release, ttl, **budget)


def spend(now: int, budget: int, **fields: Any) -> Call:
    """A budget-only call: settling unless it says ``take=True``."""
    return call(now, take=fields.pop("take", False), budget=budget, **fields)


def ok(
    r_left: int = 0, r_reset: int = 0, t_left: int = 0, t_reset: int = 0, **budget: Any
) -> Verdict:
    return Verdict(True, "", r_left, r_reset, t_left, t_reset, 0, **budget)


def no(
    kind: str,
    retry: int,
    r_left: int = 0,
    r_reset: int = 0,
    t_left: int = 0,
    t_reset: int = 0,
    **budget: Any,
) -> Verdict:
    return Verdict(False, kind, r_left, r_reset, t_left, t_reset, retry, **budget)


def left(left: int, held: int = 0, epoch: str = "e1") -> dict[str, Any]:
    """The budget part of a verdict."""
    return {"budget_left": left, "budget_held": held, "epoch": epoch}


def settled(hold: str, spend: int, epoch: str = "e1", finished: int = 0) -> dict[str, Any]:
    """One finished request's settlement, as a ``Call`` field."""
    return {"settlements": (Settlement(hold, spend, epoch, finished),)}


# A key with a budget of 1000 nano-units, period 7, rebuilt from a ledger spend of 100.
B = {"budget": 1000, "period": 7}
REBUILT = {**B, "base": 100, "epoch": "e1"}


Step = tuple[Call, Verdict]

CASES: dict[str, list[Step]] = {
    "a fresh bucket holds a minute's worth, then refuses": [
        (call(0, rpm=3), ok(2, 20_000)),
        (call(0, rpm=3), ok(1, 40_000)),
        (call(0, rpm=3), ok(0, 60_000)),
        (call(0, rpm=3), no("requests", 20_000, 0, 60_000)),
    ],
    "refill admits again exactly when a token is back": [
        (call(0, rpm=2), ok(1, 30_000)),
        (call(0, rpm=2), ok(0, 60_000)),
        (call(29_999, rpm=2), no("requests", 1, 0, 30_001)),
        (call(30_000, rpm=2), ok(0, 60_000)),
    ],
    "refill is exact for limits that do not divide a minute": [
        # reset after the (i+1)th take: ceil((i + 1) * 60 000 / 7) ms
        *[(call(0, rpm=7), ok(6 - i, -(-(i + 1) * UNIT // 7))) for i in range(7)],
        (call(8_571, rpm=7), no("requests", 1, 0, 51_429)),
        (call(8_572, rpm=7), ok(0, 60_000)),
    ],
    "a refusal by tokens takes no request either": [
        (call(0, rpm=10, tpm=100, cost=30), ok(9, 6_000, 70, 18_000)),
        (call(0, rpm=10, tpm=100, cost=80), no("tokens", 6_000, 9, 6_000, 70, 18_000)),
        (call(0, rpm=10, tpm=100, cost=70), ok(8, 12_000, 0, 60_000)),
    ],
    "a request larger than the bucket waits for a full one, then leaves debt": [
        (call(0, tpm=100, cost=250), ok(0, 0, 0, 150_000)),
        (call(0, tpm=100, cost=1), no("tokens", 90_600, 0, 0, 0, 150_000)),
        (call(90_599, tpm=100, cost=1), no("tokens", 1, 0, 0, 0, 59_401)),
        (call(90_600, tpm=100, cost=1), ok(0, 0, 0, 60_000)),
    ],
    "reconciliation refunds and charges, never above a full bucket": [
        (call(0, tpm=100, cost=50), ok(0, 0, 50, 30_000)),
        (call(0, tpm=100, debt=-30, take=False), ok(0, 0, 80, 12_000)),
        (call(0, tpm=100, debt=60, take=False), ok(0, 0, 20, 48_000)),
        (call(0, tpm=100, debt=-1000, take=False), ok(0, 0, 100, 0)),
        (call(0, tpm=100, debt=300, take=False), ok(0, 0, 0, 180_000)),
        (call(0, tpm=100, cost=1), no("tokens", 120_600, 0, 0, 0, 180_000)),
    ],
    "a lease takes all it asks for or nothing; what it returns refills, up to full": [
        (call(0, rpm=10, requests=4), ok(6, 24_000)),
        (call(0, rpm=10, requests=7), no("requests", 6_000, 6, 24_000)),
        (call(0, rpm=10, take=False, returned=3), ok(9, 6_000)),
        (call(0, rpm=10, take=False, returned=5), ok(10, 0)),
        (call(0, rpm=10, requests=20), ok(0, 120_000)),
        (call(6_000, rpm=10), no("requests", 60_000, 0, 114_000)),
    ],
    "debt carried into an admission counts before the check": [
        (call(0, tpm=100, cost=90), ok(0, 0, 10, 54_000)),
        (call(0, tpm=100, cost=20, debt=-50), ok(0, 0, 40, 36_000)),
    ],
    "parallel slots: refused when all are taken, free again on release": [
        (call(0, parallel=2, slot="a"), ok()),
        (call(0, parallel=2, slot="b"), ok()),
        (call(0, parallel=2, slot="c"), no("parallel", 1000)),
        (call(1, release="a", take=False), ok()),
        (call(1, parallel=2, slot="c"), ok()),
        (call(1, parallel=2, slot="d"), no("parallel", 1000)),
    ],
    "a slot nobody released expires (crashed process)": [
        (call(0, parallel=1, slot="a", ttl=1000), ok()),
        (call(999, parallel=1, slot="b", ttl=1000), no("parallel", 1000)),
        (call(1000, parallel=1, slot="b", ttl=1000), ok()),
    ],
    "a refusal by slots takes no request and no tokens": [
        (call(0, rpm=5, tpm=100, parallel=1, cost=10, slot="a"), ok(4, 12_000, 90, 6_000)),
        (
            call(0, rpm=5, tpm=100, parallel=1, cost=10, slot="b"),
            no("parallel", 1000, 4, 12_000, 90, 6_000),
        ),
    ],
    "a clock that goes back refills nothing": [
        (call(10_000, rpm=1), ok(0, 60_000)),
        (call(5_000, rpm=1), no("requests", 60_000, 0, 60_000)),
        (call(70_000, rpm=1), ok(0, 60_000)),
    ],
    "settling takes nothing": [
        (call(0, rpm=1, take=False), ok(1, 0)),
        (call(0, rpm=1), ok(0, 60_000)),
    ],
    "a missing budget is rebuilt before anything is taken": [
        (call(0, rpm=5, hold="a", charge=10, **B), no("rebuild", 0, 5, 0)),
        (call(0, rpm=5, hold="a", charge=10, **REBUILT), ok(4, 12_000, **left(890, 10))),
        # Once it exists, base is ignored: another worker's rebuild changes nothing.
        (
            call(0, rpm=5, hold="b", charge=10, **{**REBUILT, "base": 0}),
            ok(3, 24_000, **left(880, 20)),
        ),
    ],
    "reservations hold the budget until settled; the worst case must fit": [
        (spend(0, **REBUILT, hold="a", charge=500, take=True), ok(**left(400, 500))),
        (spend(0, **B, hold="b", charge=401, take=True), no("budget", 0, **left(400, 500))),
        (spend(0, **B, hold="b", charge=400, take=True), ok(**left(0, 900))),
        (spend(0, **B, hold="c", charge=1, take=True), no("budget", 0, **left(0, 900))),
        # "a" cost 120 of its 500: the rest comes back, only the spend stays.
        (spend(1, **B, **settled("a:500", 120)), ok(**left(380, 400))),
        (spend(1, **B, hold="c", charge=381, take=True), no("budget", 0, **left(380, 400))),
        (spend(1, **B, hold="c", charge=380, take=True), ok(**left(0, 780))),
        # Releasing twice gives back once.
        (spend(2, **B, **settled("a:500", 0)), ok(**left(0, 780))),
    ],
    "a reservation nobody settles expires (dead process)": [
        (spend(0, **REBUILT, hold="a", charge=900, ttl=1000, take=True), ok(**left(0, 900))),
        (spend(999, **B, hold="b", charge=1, take=True), no("budget", 0, **left(0, 900))),
        (spend(1000, **B, hold="b", charge=1, take=True), ok(**left(899, 1))),
        # A settlement that comes after its hold expired is dropped: the hold is back
        # already (the limiter renews the holds it still owes a settlement for).
        (spend(1001, **B, **settled("a:900", 50)), ok(**left(899, 1))),
    ],
    "overspending leaves the key refused, free requests too": [
        (spend(0, **REBUILT, hold="a", charge=900, take=True), ok(**left(0, 900))),
        (spend(0, **B, **settled("a:900", 1000)), ok(**left(-100, 0))),
        (spend(0, **B, hold="b", charge=0, take=True), no("budget", 0, **left(-100, 0))),
    ],
    "settling never creates a lost state": [
        (spend(0, **B, **settled("a:5", 300)), ok()),
        (spend(0, **B, hold="a", charge=1, take=True), no("rebuild", 0)),
    ],
    "a settlement counts once: on its own state, or one made before it finished": [
        (spend(10, **REBUILT, hold="a", charge=10, take=True), ok(**left(890, 10))),
        # Reserved against a lost state, finished before this one was rebuilt: its row
        # is in the ledger sum the state was rebuilt from.
        (spend(20, **B, **settled("", 5, "e0", 9)), ok(**left(890, 10))),
        # ...finished after: its row cannot be in that sum.
        (spend(20, **B, **settled("", 5, "e0", 10)), ok(**left(885, 10))),
        # Reserved against this state: counted when its hold comes back...
        (spend(20, **B, **settled("a:10", 5, "e1", 0)), ok(**left(890, 0))),
        # ...and only then: the same settlement again (a call that timed out but ran).
        (spend(21, **B, **settled("a:10", 5, "e1", 0)), ok(**left(890, 0))),
        # Admitted in process while Redis was away (no hold): counted if it finished
        # after the state was made.
        (spend(22, **B, **settled("", 7, "", 11)), ok(**left(883, 0))),
    ],
    "each period has its own budget": [
        (spend(0, **REBUILT, hold="a", charge=600, take=True), ok(**left(300, 600))),
        (spend(0, **{**B, "period": 8}, hold="b", charge=600, take=True), no("rebuild", 0)),
        (
            spend(
                0,
                **{**REBUILT, "period": 8, "base": 0, "epoch": "e2"},
                hold="b",
                charge=600,
                take=True,
            ),
            ok(**left(400, 600, "e2")),
        ),
        (spend(0, **B, **settled("a:600", 600)), ok(**left(300, 0))),
    ],
    "a refusal by the budget takes no request and no tokens": [
        (
            call(0, rpm=5, tpm=100, cost=10, hold="a", charge=950, **REBUILT),
            no("budget", 0, 5, 0, 100, 0, **left(900)),
        ),
        (
            call(0, rpm=5, tpm=100, cost=10, hold="a", charge=900, **B),
            ok(4, 12_000, 90, 6_000, **left(0, 900)),
        ),
    ],
}


def scoped(verdict: Verdict, scope: int) -> Verdict:
    """A verdict of ``check_all``: the refusing scope's index with it."""
    return verdict._replace(scope=scope)


# Calls for several scopes at once (a key, then its team): (scope, call) pairs, and each
# scope's verdict. Scopes named here share state across steps (two keys, one team).
TeamStep = tuple[list[tuple[str, Call]], list[Verdict]]

TEAM_CASES: dict[str, list[TeamStep]] = {
    "the team's limit refuses what the key allows, and nothing is taken from the key": [
        ([("a", call(0, rpm=10)), ("t", call(0, rpm=2))], [ok(9, 6_000), ok(1, 30_000)]),
        ([("a", call(0, rpm=10)), ("t", call(0, rpm=2))], [ok(8, 12_000), ok(0, 60_000)]),
        (
            [("a", call(0, rpm=10)), ("t", call(0, rpm=2))],
            [
                scoped(no("requests", 30_000, 8, 12_000), 1),
                scoped(no("requests", 30_000, 0, 60_000), 1),
            ],
        ),
    ],
    "the key's limit refuses first, and nothing is taken from the team": [
        (
            [("a", call(0, tpm=10, cost=10)), ("t", call(0, tpm=100, cost=10))],
            [ok(0, 0, 0, 60_000), ok(0, 0, 90, 6_000)],
        ),
        (
            [("a", call(0, tpm=10, cost=5)), ("t", call(0, tpm=100, cost=5))],
            [no("tokens", 30_000, 0, 0, 0, 60_000), no("tokens", 30_000, 0, 0, 90, 6_000)],
        ),
    ],
    "two keys share their team's parallel slots and tokens": [
        (
            [("a", call(0, parallel=2, slot="a1")), ("t", call(0, parallel=2, slot="t1"))],
            [ok(), ok()],
        ),
        (
            [("b", call(0, parallel=2, slot="b1")), ("t", call(0, parallel=2, slot="t2"))],
            [ok(), ok()],
        ),
        (
            [("b", call(0, parallel=2, slot="b2")), ("t", call(0, parallel=2, slot="t3"))],
            [scoped(no("parallel", 1000), 1), scoped(no("parallel", 1000), 1)],
        ),
        ([("t", call(1, release="t1", take=False))], [ok()]),
        (
            [("b", call(1, parallel=2, slot="b2")), ("t", call(1, parallel=2, slot="t3"))],
            [ok(), ok()],
        ),
    ],
    "a team budget its keys cannot overshoot together": [
        (
            [("a", call(0)), ("t", spend(0, take=True, hold="h1", charge=600, **REBUILT))],
            [ok(), ok(**left(300, 600))],
        ),
        (
            [("b", call(0)), ("t", spend(0, take=True, hold="h2", charge=400, **B))],
            [scoped(no("budget", 0), 1), scoped(no("budget", 0, **left(300, 600)), 1)],
        ),
        ([("t", spend(1, **B, **settled("h1:600", 100)))], [ok(**left(800, 0))]),
        (
            [("b", call(2)), ("t", spend(2, take=True, hold="h2", charge=400, **B))],
            [ok(), ok(**left(400, 400))],
        ),
    ],
    "a lost team budget asks for a rebuild and takes nothing from the key": [
        (
            [("a", call(0, rpm=3)), ("t", spend(0, take=True, hold="h", charge=1, **B))],
            [scoped(no("rebuild", 0, 3, 0), 1), scoped(no("rebuild", 0), 1)],
        ),
    ],
}
