"""What the limiter (limiter.py) asks and answers: the budget an admission reserves
against (``Ask``), the admission itself (``Ticket``), what a key still owes Redis
(``Owed``), the scope names of a key and a team, and the ``Call`` to bucket.py built
from them. The invariants they serve are in limiter.py's docstring."""

from __future__ import annotations

from time import time_ns
from typing import NamedTuple, Protocol

from ..keys.record import Key
from .bucket import Call, Settlement, Verdict


class Ask(NamedTuple):
    """A budget to reserve against in one admission, in nano-units (pricing.py)."""

    budget: int  # the key's limit for the period
    period: int  # ``Period.id``
    charge: int  # the request's worst case
    period_ttl: int  # ms the period's state must live on (0: for ever)
    base: int = -1  # >= 0: the period's spend rebuilt from the ledger
    epoch: str = ""  # names a state created from ``base``


class Ticket(NamedTuple):
    """An admission: the verdict, the slot taken ("" when none) and where it was
    decided (Redis or this process), which is where it must be settled; with a
    budget, what was asked and the hold taken (``"<id>:<charge>"``, "" when none)."""

    verdict: Verdict
    slot: str
    shared: bool
    hold: str = ""
    ask: Ask | None = None
    # The key's team's part of the same admission (None: no team with limits).
    team: Ticket | None = None


class Owed(NamedTuple):
    """Settlements owed to Redis for one key and budget period."""

    budget: int
    period_ttl: int
    settlements: list[Settlement]


class Limited(Protocol):
    """What a scope's limits are read from: a ``Key`` or a ``Team``."""

    @property
    def rpm(self) -> int | None: ...
    @property
    def tpm(self) -> int | None: ...
    @property
    def max_parallel(self) -> int | None: ...


def scope_of(key: Key) -> str:
    """The name of a key's limiter state: its id, or, in a team, its id under the
    team's Redis Cluster hash tag (so one call can reach both)."""
    return key.id if key.team_id is None else f"{team_scope(key.team_id)}:{key.id}"


def team_scope(team_id: str) -> str:
    """The name of a team's limiter state."""
    return f"{{team:{team_id}}}"


def joined(tickets: list[Ticket]) -> Ticket:
    """The key's ticket, with its team's part when there is one."""
    return tickets[0] if len(tickets) == 1 else tickets[0]._replace(team=tickets[1])


def build_call(
    key: Limited,
    *,
    now: int,
    cost: int,
    debt: int,
    take: bool,
    slot: str,
    release: str,
    ttl: int,
    ask: Ask | None = None,
    hold: str = "",
    hold_ttl: int = 0,
) -> Call:
    call = Call(
        now=now,
        rpm=key.rpm or 0,
        tpm=key.tpm or 0,
        parallel=key.max_parallel or 0,
        cost=cost,
        debt=debt,
        take=take,
        slot=slot,
        release=release,
        slot_ttl=ttl,
    )
    if ask is None:
        return call
    return call._replace(
        budget=ask.budget,
        period=ask.period,
        hold=hold,
        charge=ask.charge,
        base=ask.base,
        epoch=ask.epoch,
        period_ttl=ask.period_ttl,
        hold_ttl=hold_ttl,
    )


def fold(settlements: list[Settlement]) -> Settlement:
    """Many settlements as one without a hold (their holds expire in Redis): the spends
    summed, judged by when the last of them finished (bucket.py), so they are counted
    rather than forgiven when a rebuild came in between."""
    spend = sum(s.spend for s in settlements)
    return Settlement("", spend, "", max(s.finished for s in settlements))


def wall_ms() -> int:
    """Milliseconds of this host's wall clock: when a request finished, as bucket.lua
    compares it with the Redis clock that stamped a budget state."""
    return time_ns() // 1_000_000
