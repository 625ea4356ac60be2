"""Token buckets: the pure algorithm, and ``check``, the Python twin of ``bucket.lua``.

``take`` is one bucket; ``check`` is everything one key's limiter call does (the
request bucket, the token bucket and the parallel slots, all or nothing), exactly as
``bucket.lua`` does it inside Redis. The in-process limiter runs ``check``; one table
of cases (tests/test_bucket.py) runs against both, so they cannot drift apart.

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
- ``check`` takes from every bucket or from none; only the carried-over ``debt`` and
  a ``release`` are applied when it refuses.
"""

from __future__ import annotations

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


class Call(NamedTuple):
    """One limiter call for one key; the fields are bucket.lua's ARGV, in order."""

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


class Verdict(NamedTuple):
    """What ``check`` (or bucket.lua) answered. ``kind`` names the limit that refused
    ("requests", "tokens", "parallel"), "" when admitted."""

    allowed: bool
    kind: str
    requests_remaining: int
    requests_reset_ms: int
    tokens_remaining: int
    tokens_reset_ms: int
    retry_ms: int


@dataclass(slots=True)
class KeyState:
    """One key's limiter state: what bucket.lua keeps in its three Redis keys."""

    requests: Level | None = None
    tokens: Level | None = None
    slots: dict[str, int] = field(default_factory=dict)  # slot id → expiry ms


def check(state: KeyState, call: Call) -> Verdict:
    """Apply one limiter call to ``state`` (see the module invariants)."""
    now, rpm, tpm = call.now, call.rpm, call.tpm
    requests = refill(state.requests, now, rpm, rpm) if rpm else None
    tokens = None
    if tpm:
        tokens = refill(state.tokens, now, tpm, tpm)
        tokens = Level(min(tpm * UNIT, tokens.units - call.debt * UNIT), tokens.stamp)
    if call.release:
        state.slots.pop(call.release, None)
    kind, retry = "", 0
    if call.take:
        kind, retry, requests, tokens = _take_all(state, call, requests, tokens)
    state.requests = requests if rpm else state.requests
    state.tokens = tokens if tpm else state.tokens
    return Verdict(
        kind == "",
        kind,
        remaining(requests) if requests else 0,
        reset_ms(requests, rpm, rpm) if requests else 0,
        remaining(tokens) if tokens else 0,
        reset_ms(tokens, tpm, tpm) if tokens else 0,
        retry,
    )


def _take_all(
    state: KeyState, call: Call, requests: Level | None, tokens: Level | None
) -> tuple[str, int, Level | None, Level | None]:
    """Take one request, ``cost`` tokens and a slot, or nothing: (kind, retry_ms, the
    request level, the token level) afterwards."""
    now = call.now
    by_request = take(requests, now, call.rpm, call.rpm, 1) if requests else None
    if by_request and not by_request.allowed:
        return "requests", by_request.retry_ms, requests, tokens
    by_tokens = take(tokens, now, call.tpm, call.tpm, call.cost) if tokens else None
    if by_tokens and not by_tokens.allowed:
        return "tokens", by_tokens.retry_ms, requests, tokens
    if call.parallel:
        state.slots = {slot: expiry for slot, expiry in state.slots.items() if expiry > now}
        if len(state.slots) >= call.parallel:
            return "parallel", PARALLEL_RETRY_MS, requests, tokens
        state.slots[call.slot] = now + call.slot_ttl
    return (
        "",
        0,
        by_request.level if by_request else None,
        by_tokens.level if by_tokens else None,
    )
