"""Token buckets: the pure algorithm, and ``check``, the Python twin of ``bucket.lua``.

``take`` is one bucket; ``check`` is everything one key's limiter call does (the
request bucket, the token bucket, the budget and the parallel slots, all or nothing),
exactly as ``bucket.lua`` does it inside Redis. The in-process limiter runs ``check``; one table
of cases (tests/governance/test_bucket.py) runs against both, so they cannot drift apart.
``check_all`` is one call for several scopes at once (a key and its team): admitted
only when every scope allows it, taken from all or from none.

Invariants (shared with bucket.lua):
- Levels are integers in units: one token is ``UNIT`` = 60 000 units, so a limit of
  L per minute refills exactly L units per millisecond. All arithmetic is integer
  (exact in Lua's doubles below 2**53), so Python and Lua agree to the unit.
- Time is passed in, in milliseconds; nothing here reads a clock. A clock that goes
  backwards refills nothing and keeps the later stamp.
- A bucket holds at most ``burst`` tokens; a missing bucket is a full one.
- A take needs at most a full bucket (the check caps the cost at ``burst``) but is
  charged in full: what a large request takes beyond the level is debt, and later
  takes wait until refill has repaid it. Reconciliation (``debt``) works the same way.
  A take of several requests at once (a lease, ``Call.requests``) is the same rule
  for the request bucket; requests given back (``returned``) refill it, up to full.
- ``check`` takes from every bucket or from none; only the carried-over ``debt``, a
  ``release`` and the ``settlements`` are applied when it refuses.

Budgets (only when ``Call.budget`` > 0; keys without one never get here), per key
and period, in integer nano-units (pricing.py):
- The state is ``spent`` (settled), ``held`` (the sum of live reservations), an
  ``epoch`` naming it and ``created`` (``now`` when it was made). A take needs
  ``charge <= budget - spent - held``; it adds a hold ``"<hold>:<charge>"`` that
  expires ``hold_ttl`` after ``now`` unless renewed (a dead process's reservation
  comes back by itself) or given back by a settlement.
- A missing state is never read as "nothing spent": a take refuses with kind
  ``rebuild`` (nothing taken) until the caller passes ``base`` (the period's spend
  from the usage ledger), which creates the state (spent = base) if still missing.
  Settlements never create it: what a lost state missed is in the ledger.
- ``settlements`` (finished requests, carried like token debts: on the key's next
  call or a flush) are applied before the take, each at most once. One adds its
  ``spend`` if its hold was still held here (and gives it back), or, when it was
  reserved against another state (another ``epoch``: the one Redis lost) or in no
  state at all (admitted in process, no hold), if it finished at or after this state
  was created: its ledger row cannot be in the sum the state was rebuilt from. Any
  other settlement is a repeat (a call that timed out but ran), or its row was
  already in that sum (or in the writer's queue when it was read: the documented
  window), or its hold expired before it came (the owner could not renew it): it is
  dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

UNIT = 60_000
# What a 429 for a full set of parallel slots tells the client to wait: slots free up
# when a request ends, which no clock can predict.
PARALLEL_RETRY_MS = 1000


class Level(NamedTuple):
    """A bucket's content at a moment: ``units`` (may be negative: debt) at ``stamp`` ms."""

    units: int
    stamp: int


class Decision(NamedTuple):
    """What ``take`` decided. ``level`` is the bucket afterwards (taken from only when
    ``allowed``); ``retry_ms`` is how long until ``cost`` would be admitted (0 when
    allowed)."""

    allowed: bool
    level: Level
    retry_ms: int


def refill(level: Level | None, now: int, rate: int, burst: int) -> Level:
    """The bucket at ``now``: refilled by ``rate`` units per ms since its stamp, capped
    at ``burst`` tokens."""
    if level is None:
        return Level(burst * UNIT, now)
    if now <= level.stamp:
        return level
    return Level(min(burst * UNIT, level.units + (now - level.stamp) * rate), now)


def take(state: Level | None, now: int, rate: int, burst: int, cost: int) -> Decision:
    """Take ``cost`` tokens from a bucket refilling ``rate`` tokens per minute."""
    level = refill(state, now, rate, burst)
    need = min(cost, burst) * UNIT
    if level.units >= need:
        return Decision(True, Level(level.units - cost * UNIT, level.stamp), 0)
    return Decision(False, level, _ceil_div(need - level.units, rate))


def remaining(level: Level) -> int:
    """Whole tokens left (0 while in debt)."""
    return max(level.units, 0) // UNIT


def reset_ms(level: Level, rate: int, burst: int) -> int:
    """Milliseconds until the bucket is full again."""
    return _ceil_div(burst * UNIT - level.units, rate)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --- check: the twin of bucket.lua -----------------------------------------------------


class Settlement(NamedTuple):
    """A finished request's budget: the hold to give back ("" when none), the cost to
    add, the epoch of the state it was reserved against ("" when none) and when it
    finished (ms, on the clock of ``Call.now``)."""

    hold: str
    spend: int
    epoch: str
    finished: int


class Call(NamedTuple):
    """One limiter call for one key; the fields are bucket.lua's ARGV, in order
    (except ``period``, which names the budget's Redis keys)."""

    now: int  # ms
    rpm: int  # requests per minute; 0: no request bucket
    tpm: int  # tokens per minute; 0: no token bucket
    parallel: int  # most requests in flight at once; 0: no slots
    cost: int  # tokens to reserve for this request
    debt: int  # reconciliation carried over: tokens to charge (negative: refund)
    take: bool  # False: only apply ``debt`` and ``release`` (settling)
    slot: str  # id of the slot to take (when ``parallel``)
    release: str  # id of a slot to give back, or ""
    slot_ttl: int  # ms a slot lives unless refreshed (crashed processes leak none)
    # The budget (module docstring); all nano-units. 0: the key has none.
    budget: int = 0
    period: int = 0  # which period's state (its start, Unix seconds)
    hold: str = ""  # id of the reservation to take (when ``take``)
    charge: int = 0  # nano-units to reserve: the request's worst case
    base: int = -1  # >= 0: create a missing state with this spend (rebuilt)
    epoch: str = ""  # the epoch of a state created from ``base``
    period_ttl: int = 0  # ms the period's state lives on (0: for ever)
    hold_ttl: int = 0  # ms a hold lives unless renewed
    # Requests a take takes: 1, or a lease's worth (limiter.py); it needs them all
    # (at most a full bucket), as a take of tokens needs its ``cost``.
    requests: int = 1
    returned: int = 0  # requests given back: a lease's unused ones
    settlements: tuple[Settlement, ...] = ()  # ARGV's tail, four values each


class Verdict(NamedTuple):
    """What ``check`` (or bucket.lua) answered. ``kind`` names the limit that refused
    ("requests", "tokens", "budget", "parallel"; "rebuild": the budget's state is
    missing), "" when admitted."""

    allowed: bool
    kind: str
    requests_remaining: int
    requests_reset_ms: int
    tokens_remaining: int
    tokens_reset_ms: int
    retry_ms: int
    # With a budget: what is left after this call (budget - spent - held; negative
    # when overspent), the live reservations, and the state's epoch ("": no state).
    budget_left: int = 0
    budget_held: int = 0
    epoch: str = ""
    # check_all: the index of the scope that refused (0: the key; 1: its team).
    scope: int = 0


@dataclass(slots=True)
class Budget:
    """One key's budget in one period: bucket.lua's budget hash and holds set."""

    spent: int
    epoch: str
    created: int
    held: int = 0
    holds: dict[str, int] = field(default_factory=dict)  # "<id>:<charge>" → expiry ms
    expires: int | None = None  # ``now`` at which Redis would have dropped it


@dataclass(slots=True)
class KeyState:
    """One key's limiter state: what bucket.lua keeps in its Redis keys."""

    requests: Level | None = None
    tokens: Level | None = None
    slots: dict[str, int] = field(default_factory=dict)  # slot id → expiry ms
    budgets: dict[int, Budget] = field(default_factory=dict)  # period → its budget


def check(state: KeyState, call: Call) -> Verdict:
    """Apply one limiter call to ``state`` (see the module invariants)."""
    return check_all([state], [call])[0]


def check_all(states: Sequence[KeyState], calls: Sequence[Call]) -> list[Verdict]:
    """Apply one call per scope (a key, then its team) to their states at once: the
    request is admitted only if every scope that takes allows it (the first refusal
    wins, in order), and then taken from all of them; else from none. Each verdict
    carries the common ``allowed``, ``kind``, ``retry_ms`` and ``scope`` (the index of
    the refusing scope) with its own scope's levels."""
    prepared = [_prepare(state, call) for state, call in zip(states, calls, strict=True)]
    kind, retry, refused_by = "", 0, 0
    for index, (state, call, ready) in enumerate(zip(states, calls, prepared, strict=True)):
        if call.take:
            kind, retry = _refusal(state, call, *ready)
            if kind:
                refused_by = index
                break
    verdicts = []
    for state, call, (requests, tokens, budget) in zip(states, calls, prepared, strict=True):
        if call.take and not kind:
            requests, tokens = _take_all(state, call, requests, tokens, budget)
        state.requests = requests if call.rpm else state.requests
        state.tokens = tokens if call.tpm else state.tokens
        if budget is not None and call.period_ttl:
            budget.expires = call.now + call.period_ttl
        rpm, tpm = call.rpm, call.tpm
        verdicts.append(
            Verdict(
                kind == "",
                kind,
                remaining(requests) if requests else 0,
                reset_ms(requests, rpm, rpm) if requests else 0,
                remaining(tokens) if tokens else 0,
                reset_ms(tokens, tpm, tpm) if tokens else 0,
                retry,
                call.budget - budget.spent - budget.held if budget else 0,
                budget.held if budget else 0,
                budget.epoch if budget else "",
                refused_by,
            )
        )
    return verdicts


def _prepare(state: KeyState, call: Call) -> tuple[Level | None, Level | None, Budget | None]:
    """Phase 1 for one scope: the buckets refilled (and the debt charged), the release
    applied, the budget settled."""
    now, rpm, tpm = call.now, call.rpm, call.tpm
    requests = None
    if rpm:
        requests = refill(state.requests, now, rpm, rpm)
        requests = Level(min(rpm * UNIT, requests.units + call.returned * UNIT), requests.stamp)
    tokens = None
    if tpm:
        tokens = refill(state.tokens, now, tpm, tpm)
        tokens = Level(min(tpm * UNIT, tokens.units - call.debt * UNIT), tokens.stamp)
    if call.release:
        state.slots.pop(call.release, None)
    budget = _settle_budget(state, call) if call.budget else None
    return requests, tokens, budget


def _settle_budget(state: KeyState, call: Call) -> Budget | None:
    """The period's budget after creating it from ``base``, dropping expired holds and
    applying the settlements (None: there is no state)."""
    now = call.now
    budget = state.budgets.get(call.period)
    if budget is not None and budget.expires is not None and now >= budget.expires:
        budget = None
    if budget is None:
        if call.base < 0:
            return None
        state.budgets = {
            p: b for p, b in state.budgets.items() if b.expires is None or now < b.expires
        }
        budget = state.budgets[call.period] = Budget(call.base, call.epoch, now)
    for hold in [h for h, expiry in budget.holds.items() if expiry <= now]:
        del budget.holds[hold]
        budget.held -= held_charge(hold)
    for settled in call.settlements:
        held = bool(settled.hold) and budget.holds.pop(settled.hold, None) is not None
        if held:
            budget.held -= held_charge(settled.hold)
        if held or (settled.epoch != budget.epoch and settled.finished >= budget.created):
            budget.spent += settled.spend
    return budget


def held_charge(hold: str) -> int:
    """The nano-units a reservation ``"<id>:<charge>"`` holds."""
    return int(hold.rpartition(":")[2])


def _refusal(
    state: KeyState,
    call: Call,
    requests: Level | None,
    tokens: Level | None,
    budget: Budget | None,
) -> tuple[str, int]:
    """Phase 2 for one scope: what refuses one request, ``cost`` tokens, the budget's
    ``charge`` and a slot ("", 0: nothing). Expired slots are dropped on the way."""
    now = call.now
    if call.budget and budget is None:
        return "rebuild", 0
    by_request = take(requests, now, call.rpm, call.rpm, call.requests) if requests else None
    if by_request and not by_request.allowed:
        return "requests", by_request.retry_ms
    by_tokens = take(tokens, now, call.tpm, call.tpm, call.cost) if tokens else None
    if by_tokens and not by_tokens.allowed:
        return "tokens", by_tokens.retry_ms
    if budget is not None and call.charge > call.budget - budget.spent - budget.held:
        return "budget", 0
    if call.parallel:
        state.slots = {slot: expiry for slot, expiry in state.slots.items() if expiry > now}
        if len(state.slots) >= call.parallel:
            return "parallel", PARALLEL_RETRY_MS
    return "", 0


def _take_all(
    state: KeyState,
    call: Call,
    requests: Level | None,
    tokens: Level | None,
    budget: Budget | None,
) -> tuple[Level | None, Level | None]:
    """Phase 3 for one scope (every scope allowed it): take ``requests`` requests,
    ``cost`` tokens, the budget's ``charge`` and a slot; the levels afterwards."""
    now = call.now
    if call.parallel:
        state.slots[call.slot] = now + call.slot_ttl
    if budget is not None:
        budget.holds[f"{call.hold}:{call.charge}"] = now + call.hold_ttl
        budget.held += call.charge
    if requests is not None:
        requests = Level(requests.units - call.requests * UNIT, requests.stamp)
    if tokens is not None:
        tokens = Level(tokens.units - call.cost * UNIT, tokens.stamp)
    return requests, tokens
