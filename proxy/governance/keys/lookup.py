"""Presented key → ``Key``, with the database off the hot path.

Order: the master key and the keys declared in the config (a dict by SHA-256, no
I/O), then ``KeyCache`` over the store. Known keys are trusted for ``auth.cache_ttl``
seconds; after that the entry is stale: it is still served while one query in the
background refreshes it, so a revoked key stops working within ``cache_ttl`` plus one
store round trip, and a request with a cached key never waits on the store. Unknown
ones are remembered for ``auth.negative_ttl``. Known and unknown entries are two LRUs
of ``auth.cache_size`` each, kept apart so a flood of random bad keys only ever evicts
other bad keys. Concurrent misses for one key share one query.

When the store fails (refuses, errs, or hangs past ``database.timeout``) it is not
asked again for a jittered, growing backoff (at most ``BACKOFF_MAX``), and then by one
query in the background: until one succeeds, known keys keep working on their stale
entries and unknown keys get a 503 at once (we cannot tell), never a 401. So a hung
store costs one bounded wait (the first failure's), never one per request.

Invariants: the presented key is hashed at once and only its SHA-256 is kept (as a
cache key); it is never logged, stored or echoed in an error message.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from time import monotonic, time
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import asyncpg
from multidict import istr

from ...config.schema import Auth, DeclaredKey
from ...errors import ServiceUnavailable, Unauthorized
from ...usage.writer import failure_backoff
from . import secret
from .record import MASTER, Key, declared

if TYPE_CHECKING:
    from ..tokens import TokenVerifier

log = logging.getLogger("proxy.keys")
V = TypeVar("V")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# What a failing key store raises (asyncpg, SQLite, the network, our own timeout).
STORE_FAILURES = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    sqlite3.Error,
    OSError,
    TimeoutError,
)

BACKOFF_MAX = 5.0  # seconds between tries of a failing store, at most

_MISSING = (
    "You didn't provide an API key. Send it as `Authorization: Bearer <key>` "
    "(or as an `api-key` header)."
)
_INCORRECT = "Incorrect API key provided."
_REVOKED = "This API key has been revoked."
_EXPIRED = "This API key has expired."
# Where a key comes (istr: a request's CIMultiDict does not lower them per lookup)
_AUTHORIZATION = istr("Authorization")
_API_KEY = istr("api-key")


def looks_like_jwt(value: str) -> bool:
    """Three base64url parts whose header starts like a JSON object (``eyJ``)."""
    return value.startswith("eyJ") and value.count(".") == 2


def presented(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>``, else ``api-key``."""
    authorization = headers.get(_AUTHORIZATION)
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return headers.get(_API_KEY) or None


class Finder(Protocol[R_co]):
    async def find(self, digest: str, /) -> R_co | None: ...


class KeyCache(Generic[R]):
    """The store's answers by SHA-256, with TTLs; see the module docstring. The same
    cache serves teams by id (``KeyCache(TeamStore(db), ...)``: the gate's)."""

    def __init__(self, store: Finder[R], auth: Auth, timeout: float) -> None:
        self.store = store
        self.ttl = auth.cache_ttl
        self.negative_ttl = auth.negative_ttl
        self.size = auth.cache_size
        self.timeout = timeout
        self.known: OrderedDict[str, tuple[R, float]] = OrderedDict()
        self.unknown: OrderedDict[str, float] = OrderedDict()
        self.loading: dict[str, asyncio.Task[R | Exception | None]] = {}
        self.failing = False
        self.failures = 0  # consecutive store failures
        self.retry_at = 0.0  # monotonic time before which the store is not asked

    async def find(self, digest: str) -> R | None:
        """The key stored under ``digest`` (revoked or expired ones too), or None."""
        now = monotonic()
        hit = self.known.get(digest)
        if hit is not None:
            self.known.move_to_end(digest)
            if hit[1] <= now and now >= self.retry_at:
                self._refresh(digest)  # stale: served as is while the store is asked
            return hit[0]
        missed_until = self.unknown.get(digest)
        if missed_until is not None and missed_until > now:
            return None
        if self.failing:  # not waited on: asked in the background when the backoff allows
            if now >= self.retry_at:
                self._refresh(digest)
            raise _unavailable()
        # Shielded: a client that goes away must not cancel the query others wait on.
        result = await asyncio.shield(self._refresh(digest))
        if isinstance(result, Exception):
            raise _unavailable()
        return result

    def _refresh(self, digest: str) -> asyncio.Task[R | Exception | None]:
        """The store's query for ``digest``: the one in flight, else a new one."""
        task = self.loading.get(digest)
        if task is None:
            task = self.loading[digest] = asyncio.create_task(self._load(digest))
            task.add_done_callback(lambda _: self.loading.pop(digest, None))
        return task

    async def _load(self, digest: str) -> R | Exception | None:
        try:
            async with asyncio.timeout(self.timeout):
                key = await self.store.find(digest)
        except STORE_FAILURES as exc:
            self.failures += 1
            self.retry_at = monotonic() + min(failure_backoff(self.failures), BACKOFF_MAX)
            if not self.failing:
                self.failing = True
                log.warning(
                    "key store unreachable (%s); cached keys keep working, unknown keys "
                    "get 503 until it is back",
                    type(exc).__name__,
                )
            return exc
        self.failures = 0
        if self.failing:
            self.failing = False
            log.info("key store is back")
        now = monotonic()
        if key is None:
            _put(self.unknown, digest, now + self.negative_ttl, self.size)
        else:
            self.unknown.pop(digest, None)
            _put(self.known, digest, (key, now + self.ttl), self.size)
        return key


def _unavailable() -> ServiceUnavailable:
    return ServiceUnavailable(
        "The API key store is unavailable; retry shortly.", headers={"Retry-After": "1"}
    )


def _put(lru: OrderedDict[str, V], digest: str, value: V, size: int) -> None:
    lru[digest] = value
    lru.move_to_end(digest)
    if len(lru) > size:
        lru.popitem(last=False)


class KeyLookup:
    """Authenticates a request's headers to a ``Key`` or raises ``Unauthorized``."""

    def __init__(
        self,
        cache: KeyCache[Key] | None,
        auth: Auth,
        declared_keys: Iterable[DeclaredKey],
        tokens: TokenVerifier | None = None,
    ) -> None:
        self.cache: KeyCache[Key] | None = cache
        self.master = auth.master_key_sha256
        self.fixed = {k.sha256: declared(k) for k in declared_keys}
        self.tokens = tokens

    async def authenticate(self, headers: Mapping[str, str]) -> Key:
        """The key of a request's credentials: an API key, or a JWT's ``jwt:<user>``
        key when ``auth.jwt`` is configured (proxy/governance/tokens.py)."""
        value = presented(headers)
        if value is None:
            raise Unauthorized(_MISSING)
        if self.tokens is not None and looks_like_jwt(value):
            return (await self.tokens.verify(value)).key
        digest = secret.digest(value)
        if self.master and hmac.compare_digest(digest, self.master):
            return MASTER
        key = self.fixed.get(digest)
        if key is None and self.cache is not None and secret.looks_issued(value):
            key = await self.cache.find(digest)
        if key is None:
            raise Unauthorized(_INCORRECT)
        if not key.is_usable(time()):
            raise Unauthorized(_REVOKED if key.revoked else _EXPIRED)
        return key
