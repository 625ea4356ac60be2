"""The limiter the gate calls: one key's limits, in Redis when it is configured and
reachable, in process otherwise (the same algorithm, bucket.py).

Invariants:
- An admission is one round trip at most (bucket.lua: request bucket, token bucket and
  parallel slot, all or nothing). Keys without limits never get here.
- Every Redis call is bounded by ``redis.timeout``. A failure switches this worker to
  its in-process buckets (logged once, ``morngpt_limiter_backend`` = local); the
  background task probes Redis every ``limits.flush_interval`` and switches back by
  itself (logged once).
- Token reconciliation does not cost a round trip of its own: the difference between
  the reservation and the real usage is owed by the key and carried into its next
  admission, or flushed by the background task within ``limits.flush_interval``. So
  Redis lags the true token count by at most one flush interval of traffic per worker.
  A key with a parallel limit settles at once (the slot must come back promptly), in
  the same call that releases its slot.
- A parallel slot is released on every path, in a background task tracked in
  ``tasks`` (awaited at close). A release that cannot reach Redis (an outage, or a
  call whose answer was lost) is owed (``releases``) and sent as soon as Redis
  answers again, before this worker admits there again: otherwise the slot would
  count against the key until it expires and its requests would get false 429s. A
  slot of a crashed process expires after ``limits.slot_ttl``; live slots are renewed
  by the background task (expiry by this host's clock), so a long stream keeps its
  slot.
- Budgets (``Ask``) ride on the same calls: the admission reserves the worst case (a
  hold, renewed and expiring like a slot). Settlements (hold back, real cost added)
  are owed like token debts: carried into the key's next admission for that period
  or flushed within ``limits.flush_interval`` (at once, with the slot, for keys with
  a parallel limit). So a finished request's hold may linger that long; bucket.py's
  rule (its own state, or one created before it finished) makes a late settlement
  count exactly once. Spending admitted in process while Redis was away is owed to
  Redis the same way, so a Redis that kept its state does not forgive it.
- A key with rpm/tpm limits only is admitted from leases (lease.py); what one did
  not use is given back at the flush, owed like a token debt (``returns``, ``debts``).
- Owed settlements per key and period are bounded (``MAX_OWED``): beyond it (a long
  outage), they are folded into one without holds (those expire in Redis).
- A hold stays in ``holds`` (renewed with the slots) until its settlement reached
  Redis, so a settlement delayed by an outage still finds its hold, unless the
  outage outlasted ``limits.slot_ttl`` (then the spend is dropped and only a rebuild
  from the ledger would count it: docs/budgets.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import Coroutine
from time import monotonic, time_ns
from typing import Any

from ...config.schema import Limits
from ...config.schema import Redis as RedisConfig
from ...ops.metrics import set_limiter_backend
from ..keys.record import Key
from ..keys.teams import Team
from . import lease
from .bucket import Call, Settlement
from .local import LocalBuckets, now_ms
from .shared import FAILURES, SERVER_TIME, RedisBuckets, RedisClient
from .ticket import (
    Ask,
    Limited,
    Owed,
    Ticket,
    build_call,
    fold,
    joined,
    scope_of,
    team_scope,
    wall_ms,
)

log = logging.getLogger("proxy.ratelimit")
MAX_OWED = 1000
# In-process holds never expire: no other process can die holding them.
_LOCAL_HOLD_TTL = 2**62


class Limiter:
    """Admits and settles requests against API keys' limits; see the module docstring."""

    def __init__(self, limits: Limits, redis: RedisConfig, client: RedisClient | None) -> None:
        self.slot_ttl = int(limits.slot_ttl * 1000)
        self.interval = limits.flush_interval
        self.share = limits.lease_share
        self.timeout = redis.timeout
        self.local = LocalBuckets()
        self.shared = (
            None if client is None else RedisBuckets(client, redis.key_prefix, self.timeout)
        )
        self.using_redis = self.shared is not None
        # Tokens owed to Redis per key id: (the key's tpm, tokens; negative: a refund).
        self.debts: dict[str, tuple[int, int]] = {}
        # Leases held per key id; an empty one keeps the key's last verdict.
        self.leases: dict[str, lease.Lease] = {}
        # Keys whose lease call is in flight: set when it is answered.
        self.leasing: dict[str, asyncio.Event] = {}
        # Requests of leases owed back to Redis per key id: (the key's rpm, requests).
        self.returns: dict[str, tuple[int, int]] = {}
        # Slots taken in Redis and not released yet: slot id → key id.
        self.held: dict[str, str] = {}
        # Budget holds taken in Redis and not released yet: hold → its set's Redis key.
        self.holds: dict[str, str] = {}
        # Budget settlements owed to Redis, per (key id, period).
        self.owed: dict[tuple[str, int], Owed] = {}
        # Slot releases owed to Redis: slot id → key id.
        self.releases: dict[str, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._slot_ids = itertools.count()
        self._instance = secrets.token_hex(4)  # slot ids are unique across processes
        self._maintainer: asyncio.Task[None] | None = None
        self._renewed = monotonic()

    @property
    def backend(self) -> str:
        """The ``morngpt_limiter_backend`` label this worker is on now."""
        if self.shared is None:
            return "memory"
        return "redis" if self.using_redis else "local"

    def start(self) -> None:
        set_limiter_backend(self.backend)
        if self.shared is not None:
            self._maintainer = asyncio.create_task(self._maintain())

    async def close(self) -> None:
        """Stop the background task, flush what is owed, wait for releases (bounded)."""
        if self._maintainer is not None:
            self._maintainer.cancel()
            await asyncio.gather(self._maintainer, return_exceptions=True)
        if self.using_redis and (self.debts or self.owed or self.releases or self.leases):
            await self.flush()
        if self.tasks:
            _, late = await asyncio.wait(self.tasks, timeout=self.timeout + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()

    async def admit(
        self,
        key: Key,
        cost: int,
        ask: Ask | None = None,
        team: Team | None = None,
        team_ask: Ask | None = None,
    ) -> Ticket:
        """Take one request, ``cost`` tokens, a parallel slot and (with ``ask``) the
        worst case of the budget for ``key``, and the same from its ``team`` (with
        ``team_ask`` for the team's budget) in the same call, or none of them. A
        verdict of kind ``rebuild`` asks the caller to come back with the ``base`` of
        the ask of the scope it names (``Verdict.scope``: 0 the key, 1 the team)."""
        scope = scope_of(key)
        if self.using_redis and self.share and lease.may(key, ask, team):
            leased = self.leases.get(scope)
            admitted = leased.take(cost) if leased else None
            if admitted is not None:
                return Ticket(admitted, "", True)
            return await self._lease(key, scope, cost)
        parts: list[tuple[str, Limited, Ask | None]] = [(scope, key, ask)]
        if team is not None and team.is_limited:
            parts.append((team_scope(team.id), team, team_ask))
        slots = [self._new_id() if limits.max_parallel else "" for _, limits, _ in parts]
        holds = [self._new_id() if a else "" for _, _, a in parts]
        ttl = self.slot_ttl
        debts = [0] * len(parts)
        if self.shared is not None and self.using_redis:
            calls = []
            for i, (scope, limits, a) in enumerate(parts):
                debts[i] = self._take_debt(scope)
                call = build_call(
                    limits, now=SERVER_TIME, cost=cost, debt=debts[i], take=True, slot=slots[i],
                    release="", ttl=ttl, ask=a, hold=holds[i], hold_ttl=ttl,
                )  # fmt: skip
                if a is not None and self.owed:
                    call = call._replace(settlements=self._take_owed(scope, a.period))
                calls.append(call)
            scoped = [(scope, call) for (scope, _, _), call in zip(parts, calls, strict=True)]
            try:
                verdicts = await self.shared.check_all(scoped)  # bounded by redis.timeout
            except FAILURES as exc:
                self._fall_back(exc)
                for scope, call in scoped:
                    self._owe_again(scope, call)
            else:
                tickets = []
                for (scope, call), verdict, slot, hold, (_, _, a) in zip(
                    scoped, verdicts, slots, holds, parts, strict=True
                ):
                    self._delivered(call)
                    tickets.append(self._admitted(scope, Ticket(verdict, slot, True, hold, a)))
                return joined(tickets)
        now = now_ms()
        calls = [
            build_call(
                limits, now=now, cost=cost, debt=debts[i], take=True, slot=slots[i], release="",
                ttl=ttl, ask=a, hold=holds[i], hold_ttl=_LOCAL_HOLD_TTL,
            )
            for i, (_, limits, a) in enumerate(parts)
        ]  # fmt: skip
        verdicts = self.local.check_all([scope for scope, _, _ in parts], calls)
        tickets = []
        for verdict, slot, hold, (_, _, a) in zip(verdicts, slots, holds, parts, strict=True):
            held = f"{hold}:{a.charge}" if a and verdict.allowed else ""
            tickets.append(Ticket(verdict, slot, False, held, a))
        return joined(tickets)

    async def _lease(self, key: Key, scope: str, cost: int, share: bool = True) -> Ticket:
        """Admit a request of a key that may lease (lease.py) with one call to Redis,
        taking a lease's worth when there is room (one such call at a time per key:
        the others wait for its lease); in process when Redis fails."""
        rpm, tpm = key.rpm or 0, key.tpm or 0
        count = lease.size(rpm, tpm, cost, self.share, self.leases.get(scope)) if share else 1
        if count > 1:
            if scope in self.leasing:
                await self.leasing[scope].wait()
                return await self.admit(key, cost)
            self.leasing[scope] = asyncio.Event()
        call = build_call(
            key, now=SERVER_TIME, cost=cost * count, debt=self._take_debt(scope), take=True,
            slot="", release="", ttl=self.slot_ttl,
        )._replace(requests=count, returned=self.returns.pop(scope, (0, 0))[1])  # fmt: skip
        assert self.shared is not None
        try:
            verdict = await self.shared.check(scope, call)  # bounded by redis.timeout
        except FAILURES as exc:
            self._fall_back(exc)
            self._owe_again(scope, call)
            local = call._replace(now=now_ms(), cost=cost, requests=1, returned=0)
            return Ticket(self.local.check(scope, local), "", False)
        finally:
            if count > 1:
                self.leasing.pop(scope).set()
        got = count if verdict.allowed else 0
        taken = lease.keep(self.leases, scope, lease.Lease(rpm, tpm, got, cost * got, verdict))
        if not verdict.allowed:
            if count > 1:  # the lease did not fit: this request alone may (one call)
                return await self._lease(key, scope, cost, share=False)
            return Ticket(verdict, "", True)
        admitted = taken.take(cost)
        assert admitted is not None
        return Ticket(admitted, "", True)

    def _give_back(self, scope: str, unused: lease.Lease) -> None:
        """Owe Redis what a lease did not use."""
        if unused.tpm and unused.tokens:
            self._owe(scope, unused.tpm, -unused.tokens)
        if unused.rpm and unused.requests:
            self._return(scope, unused.rpm, unused.requests)

    def _return(self, scope: str, rpm: int, requests: int) -> None:
        self.returns[scope] = (rpm, self.returns.get(scope, (rpm, 0))[1] + requests)

    def _new_id(self) -> str:
        return f"{self._instance}-{next(self._slot_ids)}"

    def _admitted(self, key_id: str, ticket: Ticket) -> Ticket:
        """Note what a Redis admission holds, for renewal."""
        verdict, ask = ticket.verdict, ticket.ask
        if ask is not None:
            if verdict.allowed:
                assert self.shared is not None
                ticket = ticket._replace(hold=f"{ticket.hold}:{ask.charge}")
                self.holds[ticket.hold] = self.shared.budget_names(key_id, ask.period)[1]
            else:
                ticket = ticket._replace(hold="")
        if verdict.allowed and ticket.slot:
            self.held[ticket.slot] = key_id
        return ticket

    def settle(
        self, key: Key, ticket: Ticket, debt: int, spend: int = 0, team: Team | None = None
    ) -> None:
        """Give back an admitted request's slot and budget hold, charge ``debt`` tokens
        (the real usage minus the reservation; negative: a refund) and add ``spend``
        nano-units to the budget; the same for the team's part of the ticket (``team``:
        the team it was admitted with). Never blocks."""
        self._settle(scope_of(key), key, ticket, debt, spend)
        if ticket.team is not None and team is not None:
            self._settle(team_scope(team.id), team, ticket.team, debt, spend)

    def _settle(self, scope: str, limits: Limited, ticket: Ticket, debt: int, spend: int) -> None:
        """``settle`` for one scope (a key, or a team)."""
        debt = debt if limits.tpm else 0
        ask = ticket.ask
        if not ticket.shared:
            self._settle_local(scope, limits, ticket, debt, spend)
            return
        # The hold stays in ``holds`` (renewed) until its settlement reached Redis.
        settled = None
        if ask is not None:
            settled = Settlement(ticket.hold, spend, ticket.verdict.epoch, wall_ms())
        if ticket.slot:
            self.held.pop(ticket.slot, None)
            if self.using_redis:
                debt += self._take_debt(scope)
                call = build_call(
                    limits, now=SERVER_TIME, cost=0, debt=debt, take=False, slot="",
                    release=ticket.slot, ttl=self.slot_ttl, ask=ask,
                )  # fmt: skip
                if ask is not None and settled is not None:
                    owed = self._take_owed(scope, ask.period) if self.owed else ()
                    call = call._replace(settlements=(*owed, settled))
                self._spawn(self._settle_shared(scope, call))
                return
            self.releases[ticket.slot] = scope  # Redis is down: given back when it is up
        if debt:
            self._owe(scope, limits.tpm or 0, debt)
        if ask is not None and settled is not None:
            self._owe_settlement(scope, ask.budget, ask.period, ask.period_ttl, settled)

    def _settle_local(
        self, scope: str, limits: Limited, ticket: Ticket, debt: int, spend: int
    ) -> None:
        """Settle a ticket the in-process buckets admitted. Its spend is owed to Redis
        too (when there is one): if Redis kept its state meanwhile, it must count."""
        ask = ticket.ask
        if not (debt or ticket.slot or ask):
            return
        call = build_call(
            limits, now=now_ms(), cost=0, debt=debt, take=False, slot="", release=ticket.slot,
            ttl=self.slot_ttl, ask=ask,
        )  # fmt: skip
        if ask is not None:
            local = Settlement(ticket.hold, spend, ticket.verdict.epoch, now_ms())
            call = call._replace(settlements=(local,))
            if spend and self.shared is not None:
                remote = Settlement("", spend, "", wall_ms())
                self._owe_settlement(scope, ask.budget, ask.period, ask.period_ttl, remote)
        self.local.check(scope, call)

    def _take_debt(self, key_id: str) -> int:
        return self.debts.pop(key_id, (0, 0))[1] if self.debts else 0

    def _owe(self, key_id: str, tpm: int, tokens: int) -> None:
        owed = self.debts.get(key_id, (tpm, 0))[1] + tokens
        self.debts[key_id] = (tpm, owed)

    def _owe_settlement(
        self, key_id: str, budget: int, period: int, ttl: int, settled: Settlement
    ) -> None:
        owed = self.owed.get((key_id, period))
        if owed is None:
            owed = self.owed[key_id, period] = Owed(budget, ttl, [])
        owed.settlements.append(settled)
        if len(owed.settlements) > MAX_OWED:
            for folded in owed.settlements:
                self.holds.pop(folded.hold, None)  # let them expire: they are not settled
            owed.settlements[:] = [fold(owed.settlements)]

    def _take_owed(self, key_id: str, period: int) -> tuple[Settlement, ...]:
        owed = self.owed.pop((key_id, period), None)
        return tuple(owed.settlements) if owed else ()

    def _delivered(self, call: Call) -> None:
        """A call reached Redis: the holds it settled need no more renewing."""
        for settled in call.settlements:
            self.holds.pop(settled.hold, None)

    def _owe_again(self, key_id: str, call: Call) -> None:
        """What a failed call carried to Redis, owed again."""
        if call.debt and not call.take:  # an admission's debt went to the local buckets
            self._owe(key_id, call.tpm, call.debt)
        if call.release:
            self.releases[call.release] = key_id
        if call.returned:
            self._return(key_id, call.rpm, call.returned)
        if call.take and call.slot:  # Redis may have taken it before the answer was lost
            self.releases[call.slot] = key_id
        for settled in call.settlements:
            self._owe_settlement(key_id, call.budget, call.period, call.period_ttl, settled)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # held so it is not garbage-collected mid-flight
        task.add_done_callback(self.tasks.discard)

    async def _settle_shared(self, key_id: str, call: Call) -> None:
        """One settling call; what it carried is owed again when Redis cannot take it."""
        assert self.shared is not None
        try:
            await self.shared.check(key_id, call)  # bounded by redis.timeout
        except FAILURES as exc:
            self._fall_back(exc)
            self._owe_again(key_id, call)
        else:
            self._delivered(call)

    def _fall_back(self, exc: BaseException) -> None:
        if self.shared is not None:
            self.shared.drop()  # a connection that failed or timed out is not used again
        if self.using_redis:
            self.using_redis = False
            log.warning(
                "rate limiter: Redis unreachable (%s); limits are per worker process "
                "until it is back",
                type(exc).__name__,
            )
            set_limiter_backend(self.backend)

    async def _maintain(self) -> None:
        """Background: flush debts and renew slots while on Redis; probe it while not."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                if self.using_redis:
                    await self.flush()
                    if monotonic() - self._renewed >= self.slot_ttl / 3000:
                        await self._renew()
                else:
                    await self._probe()
            except Exception:  # never let the loop die: limits would stop syncing
                log.exception("rate limiter maintenance failed")

    async def flush(self) -> None:
        """Send what is owed to Redis (releases, debts, settlements, unused leases)."""
        assert self.shared is not None
        self.shared.fold()  # the calls made since the last flush, into their metric
        await self._release_owed()
        for scope, unused in self.leases.items():
            self._give_back(scope, unused)
        self.leases.clear()
        debts, self.debts = self.debts, {}
        returns, self.returns = self.returns, {}
        owed, self.owed = self.owed, {}
        settling = self._settling()
        back = {
            key_id: settling._replace(tpm=tpm, debt=owed) for key_id, (tpm, owed) in debts.items()
        }
        for key_id, (rpm, count) in returns.items():
            back[key_id] = back.get(key_id, settling)._replace(rpm=rpm, returned=count)
        calls = list(back.items())
        calls += [
            (key_id, settling._replace(budget=o.budget, period=period, period_ttl=o.period_ttl,
                                       settlements=tuple(o.settlements)))
            for (key_id, period), o in owed.items()
        ]  # fmt: skip
        await asyncio.gather(*(self._settle_shared(key_id, call) for key_id, call in calls))

    def _settling(self) -> Call:
        """A call that only settles (takes nothing), stamped by the Redis clock."""
        return Call(
            now=SERVER_TIME, rpm=0, tpm=0, parallel=0, cost=0, debt=0, take=False, slot="",
            release="", slot_ttl=self.slot_ttl,
        )  # fmt: skip

    async def _release_owed(self) -> None:
        """Give back in Redis the slots whose release could not reach it."""
        releases, self.releases = self.releases, {}
        base = self._settling()
        await asyncio.gather(
            *(self._settle_shared(key_id, base._replace(release=slot))
              for slot, key_id in releases.items())
        )  # fmt: skip

    async def _renew(self) -> None:
        assert self.shared is not None
        self._renewed = monotonic()
        if not self.held and not self.holds:
            return
        expiry = time_ns() // 1_000_000 + self.slot_ttl
        try:
            async with asyncio.timeout(self.timeout):
                await self.shared.renew(dict(self.held), expiry, self.slot_ttl, dict(self.holds))
        except FAILURES as exc:
            self._fall_back(exc)

    async def _probe(self) -> None:
        assert self.shared is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self.shared.ping()
        except FAILURES:
            return
        # The slots released meanwhile first, so that no request gets a false 429.
        await self._release_owed()
        if self.releases:  # it failed again
            return
        self.using_redis = True
        # Budgets kept in process meanwhile are stale from now on: a later outage
        # rebuilds them from the ledger again.
        for state in self.local.states.values():
            state.budgets.clear()
        log.info("rate limiter: Redis is reachable again; limits are shared again")
        set_limiter_backend(self.backend)
