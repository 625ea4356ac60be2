"""JSON Web Tokens at the API: ``Authorization: Bearer <JWT>`` from configured issuers.

A token is verified with PyJWT against its issuer's JWKS (``Jwks``): the algorithm
must be one the issuer allows (RS256, ES256, EdDSA: never ``none`` and never an HMAC,
so a public key can never be used as an HMAC secret), the key is the JWKS entry
named by ``kid``, and ``iss``, ``aud``, ``exp`` (required) and ``nbf`` are checked
with ``auth.jwt.leeway`` seconds of skew. Every refusal is a 401 ``invalid_api_key``.

A verified token becomes a ``Key`` (``jwt:<user id>``, the team and role from its
claims, per-user limits from the issuer's config), remembered by the token's SHA-256
until its ``exp``: a request pays for one signature check per token, then a hash and
a dict lookup (``python -m bench.jwt`` measures it).

JWKS: fetched on first use and every ``jwks_ttl`` (in the background: known keys keep
working meanwhile); an unknown ``kid`` fetches it again at most once per
``jwks_min_interval`` (key rotation), else it is refused and logged. A fetch that
fails or hangs (bounded by ``jwks_timeout``) backs off before the next; concurrent
requests share one fetch. So an unreachable or hung JWKS endpoint costs at most one
bounded wait per backoff window, never one per request, and known keys keep working.

Invariants: the token itself is never logged or kept (only its SHA-256).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Mapping
from time import monotonic, time
from typing import Any

import aiohttp
import jwt
import msgspec

from ..config.schema import Jwt, JwtIssuer
from ..errors import Unauthorized
from ..usage.writer import failure_backoff
from .keys.record import Key

log = logging.getLogger("proxy.jwt")

BACKOFF_MAX = 30.0  # seconds between fetches of a failing JWKS, at most

_INVALID = "Invalid token."


def refused(why: str) -> Unauthorized:
    """The 401 for a token we do not accept (the reason is safe to show)."""
    return Unauthorized(f"{_INVALID} {why}")


class Jwks:
    """One issuer's JSON Web Key Set, fetched over HTTP and cached; see the module
    docstring for when it is fetched."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        ttl: float,
        min_interval: float,
        timeout: float,
    ) -> None:
        self.url = url
        self.session = session
        self.ttl, self.min_interval, self.timeout = ttl, min_interval, timeout
        self.keys: dict[str, jwt.PyJWK] = {}
        self.fetched_at = -1.0  # monotonic time of the last good fetch (-1: never)
        self.tried_at = -1.0  # when the last fetch for an unknown kid ended
        self.failures = 0
        self.retry_at = 0.0
        self.fetching: asyncio.Task[None] | None = None

    async def key(self, kid: str) -> jwt.PyJWK | None:
        """The key named ``kid``, or None when the JWKS does not have it (after at most
        one bounded fetch, when the rate limit and the backoff allow one)."""
        now = monotonic()
        found = self.keys.get(kid)
        if found is not None:
            if now - self.fetched_at >= self.ttl and now >= self.retry_at:
                self._fetch()  # stale: refreshed in the background
            return found
        never = self.fetched_at < 0
        if now < self.retry_at or (not never and now - self.tried_at < self.min_interval):
            return None
        await asyncio.shield(self._fetch())
        if not never:  # a rotation's fetch; the interval counts from its end (a hung
            self.tried_at = monotonic()  # endpoint's wait does not use it up)
        return self.keys.get(kid)

    def _fetch(self) -> asyncio.Task[None]:
        if self.fetching is None or self.fetching.done():
            self.fetching = asyncio.create_task(self._load())
        return self.fetching

    async def _load(self) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                async with self.session.get(self.url) as response:
                    response.raise_for_status()
                    body = await response.read()
            keys = jwt.PyJWKSet.from_json(body.decode()).keys
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, jwt.PyJWTError) as exc:
            self.failures += 1
            self.retry_at = monotonic() + min(failure_backoff(self.failures), BACKOFF_MAX)
            log.warning("JWKS %s unusable (%s); known keys keep working", self.url, _why(exc))
            return
        if self.failures:
            log.info("JWKS %s is back", self.url)
        self.failures = 0
        self.fetched_at = monotonic()
        self.keys = {k.key_id: k for k in keys if k.key_id}


def _why(exc: BaseException) -> str:
    return type(exc).__name__ if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"


class Verified(msgspec.Struct, frozen=True):
    """What a verified token says: the key its requests run under, and until when."""

    key: Key
    user_id: str
    expires: float


class TokenVerifier:
    """Verifies JWTs from the configured issuers into ``Key`` records."""

    def __init__(self, settings: Jwt, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        fetch = (settings.jwks_ttl, settings.jwks_min_interval, settings.jwks_timeout)
        self.issuers = {i.issuer: (i, Jwks(i.jwks_url, session, *fetch)) for i in settings.issuers}
        self.cache: OrderedDict[bytes, Verified] = OrderedDict()

    async def verify(self, token: str) -> Verified:
        """The token's ``Verified`` or ``Unauthorized`` (see the module docstring)."""
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        hit = self.cache.get(digest)
        if hit is not None and hit.expires > time():
            return hit
        verified = await self._verify(token)
        self.cache[digest] = verified
        if len(self.cache) > self.settings.cache_size:
            self.cache.popitem(last=False)
        return verified

    async def _verify(self, token: str) -> Verified:
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise refused("It is not a well-formed JWT.") from None
        iss = claims.get("iss")
        found = self.issuers.get(iss) if isinstance(iss, str) else None
        if found is None:
            raise refused("Its issuer is not accepted here.")
        issuer, jwks = found
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise refused(f"Its algorithm ({str(alg)[:20]}) is not accepted.")
        kid = header.get("kid")
        key = await jwks.key(kid) if isinstance(kid, str) else None
        if key is None:
            log.warning("JWT refused: unknown kid %r from %s", str(kid)[:64], issuer.issuer)
            raise refused("Its signing key is unknown.")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=issuer.audience,
                issuer=issuer.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise refused("It has expired.") from None
        except jwt.ImmatureSignatureError:
            raise refused("It is not valid yet.") from None
        except jwt.InvalidAudienceError:
            raise refused("Its audience is not accepted here.") from None
        except jwt.PyJWTError:
            raise refused("Its signature or claims are not valid.") from None
        return _verified(issuer, claims, self.settings.leeway)


def _verified(issuer: JwtIssuer, claims: dict[str, Any], leeway: float) -> Verified:
    user = claims.get(issuer.user_claim)
    if not isinstance(user, str) or not user:
        raise refused(f"It has no {issuer.user_claim} claim.")
    team = claims.get(issuer.team_claim, issuer.default_team)
    if not isinstance(team, str) or not team:
        raise refused(f"It has no {issuer.team_claim} claim.")
    key = Key(
        id=f"jwt:{user}"[:200],
        name=user[:200],
        rpm=issuer.user_rpm,
        tpm=issuer.user_tpm,
        max_parallel=issuer.user_max_parallel,
        budget=issuer.user_budget,
        team_id=team,
        role=role_of(claims.get(issuer.role_claim), issuer.role_map) or "member",
        metadata={"user": user, "iss": issuer.issuer},
    )
    return Verified(key, user, float(claims["exp"]) + leeway)


_RANK = {"member": 0, "viewer": 1, "admin": 2}


def role_of(claim: Any, role_map: Mapping[str, str]) -> str | None:
    """The highest role a claim names (a string or a list of them), through
    ``role_map`` when it is given (claim value → role), else as is; None: none."""
    values = [claim] if isinstance(claim, str) else claim if isinstance(claim, list) else []
    roles = [role_map.get(v) if role_map else v for v in values if isinstance(v, str)]
    known = [r for r in roles if r in _RANK]
    return max(known, key=_RANK.__getitem__) if known else None
