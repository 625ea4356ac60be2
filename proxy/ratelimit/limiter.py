"""The limiter the gate calls: one key's limits, in Redis when it is configured and
reachable, in process otherwise (the same algorithm, bucket.py).

Invariants:
- An admission is one round trip (bucket.lua: request bucket, token bucket and
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
  ``tasks`` (awaited at close). A slot whose release never reached Redis (crash,
  outage) expires after ``limits.slot_ttl``; live slots are renewed by the background
  task (expiry by this host's clock), so a long stream keeps its slot.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator, Coroutine
from time import monotonic, time_ns
from typing import Any, NamedTuple

from aiohttp import web

from ..config import Config, Limits
from ..config import Redis as RedisConfig
from ..keys.record import Key
from ..metrics import set_limiter_backend
from .bucket import Call, Verdict
from .local import LocalBuckets, now_ms
from .shared import FAILURES, REDIS, SERVER_TIME, Client, RedisBuckets

log = logging.getLogger("proxy.ratelimit")


class Ticket(NamedTuple):
    """An admission: the verdict, the slot taken ("" when none) and where it was
    decided (Redis or this process), which is where it must be settled."""

    verdict: Verdict
    slot: str
    shared: bool


class Limiter:
    """Admits and settles requests against API keys' limits; see the module docstring."""

    def __init__(self, limits: Limits, redis: RedisConfig, client: Client | None) -> None:
        self.slot_ttl = int(limits.slot_ttl * 1000)
        self.interval = limits.flush_interval
        self.timeout = redis.timeout
        self.local = LocalBuckets()
        self.shared = RedisBuckets(client, redis.key_prefix) if client is not None else None
        self.using_redis = self.shared is not None
        # Tokens owed to Redis per key id: (the key's tpm, tokens; negative: a refund).
        self.debts: dict[str, tuple[int, int]] = {}
        # Slots taken in Redis and not released yet: slot id → key id.
        self.held: dict[str, str] = {}
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
        if self.using_redis and self.debts:
            await self._flush()
        if self.tasks:
            _, late = await asyncio.wait(self.tasks, timeout=self.timeout + 1)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def admit(self, key: Key, cost: int) -> Ticket:
        """Take one request, ``cost`` tokens and a parallel slot for ``key``, or none."""
        slot = f"{self._instance}-{next(self._slot_ids)}" if key.max_parallel else ""
        debt = 0
        if self.shared is not None and self.using_redis:
            debt = self._take_debt(key.id)
            call = _call(key, SERVER_TIME, cost, debt, True, slot, "", self.slot_ttl)
            try:
                async with asyncio.timeout(self.timeout):
                    verdict = await self.shared.check(key.id, call)
            except FAILURES as exc:
                self._fall_back(exc)
            else:
                if verdict.allowed and slot:
                    self.held[slot] = key.id
                return Ticket(verdict, slot, True)
        call = _call(key, now_ms(), cost, debt, True, slot, "", self.slot_ttl)
        return Ticket(self.local.check(key.id, call), slot, False)

    def settle(self, key: Key, ticket: Ticket, debt: int) -> None:
        """Give back an admitted request's slot and charge ``debt`` tokens (the real
        usage minus the reservation; negative: a refund). Never blocks."""
        debt = debt if key.tpm else 0
        if not ticket.shared:
            if debt or ticket.slot:
                call = _call(key, now_ms(), 0, debt, False, "", ticket.slot, self.slot_ttl)
                self.local.check(key.id, call)
            return
        if ticket.slot:
            self.held.pop(ticket.slot, None)
            if self.using_redis:
                debt += self._take_debt(key.id)
                self._spawn(self._settle_shared(key.id, key.tpm or 0, ticket.slot, debt))
                return
            # Redis is down: the slot there expires by itself.
        if debt:
            self._owe(key.id, key.tpm or 0, debt)

    def _take_debt(self, key_id: str) -> int:
        return self.debts.pop(key_id, (0, 0))[1] if self.debts else 0

    def _owe(self, key_id: str, tpm: int, tokens: int) -> None:
        owed = self.debts.get(key_id, (tpm, 0))[1] + tokens
        self.debts[key_id] = (tpm, owed)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)  # held so it is not garbage-collected mid-flight
        task.add_done_callback(self.tasks.discard)

    async def _settle_shared(self, key_id: str, tpm: int, slot: str, debt: int) -> None:
        call = Call(SERVER_TIME, 0, tpm, 0, 0, debt, False, "", slot, self.slot_ttl)
        assert self.shared is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self.shared.check(key_id, call)
        except FAILURES as exc:
            self._fall_back(exc)
            if debt:
                self._owe(key_id, tpm, debt)

    def _fall_back(self, exc: BaseException) -> None:
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
                    await self._flush()
                    if monotonic() - self._renewed >= self.slot_ttl / 3000:
                        await self._renew()
                else:
                    await self._probe()
            except Exception:  # never let the loop die: limits would stop syncing
                log.exception("rate limiter maintenance failed")

    async def _flush(self) -> None:
        debts, self.debts = self.debts, {}
        await asyncio.gather(
            *(self._settle_shared(key_id, tpm, "", owed) for key_id, (tpm, owed) in debts.items())
        )

    async def _renew(self) -> None:
        assert self.shared is not None
        self._renewed = monotonic()
        if not self.held:
            return
        expiry = time_ns() // 1_000_000 + self.slot_ttl
        try:
            async with asyncio.timeout(self.timeout):
                await self.shared.renew(dict(self.held), expiry, self.slot_ttl)
        except FAILURES as exc:
            self._fall_back(exc)

    async def _probe(self) -> None:
        assert self.shared is not None
        try:
            async with asyncio.timeout(self.timeout):
                await self.shared.ping()
        except FAILURES:
            return
        self.using_redis = True
        log.info("rate limiter: Redis is reachable again; limits are shared again")
        set_limiter_backend(self.backend)


def _call(
    key: Key, now: int, cost: int, debt: int, take: bool, slot: str, release: str, ttl: int
) -> Call:
    return Call(
        now, key.rpm or 0, key.tpm or 0, key.max_parallel or 0, cost, debt, take, slot,
        release, ttl,
    )  # fmt: skip


LIMITER = web.AppKey("limiter", Limiter)


async def open_limiter(app: web.Application, config: Config) -> AsyncIterator[None]:
    """cleanup_ctx body: the worker's ``Limiter`` under ``app[LIMITER]``, on the Redis
    client of ``app[REDIS]`` when there is one."""
    limiter = app[LIMITER] = Limiter(config.limits, config.redis, app.get(REDIS))
    limiter.start()
    try:
        yield
    finally:
        await limiter.close()
