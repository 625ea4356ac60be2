"""Who is calling, and what they may do: the one place roles are decided.

A request's credentials become a ``Principal`` (``Authenticator.authenticate``):

- the master key or the ops token: ``admin``;
- an API key (stored or declared): the key's own ``role`` (default ``member``);
- a JWT from a configured issuer (proxy/governance/tokens.py): the role its claims name;
- a console session (proxy/admin/oidc.py, ``OidcLogin.principal``): the role the OpenID
  provider's claims named at login.

Roles, each including the one below it:

- ``admin``: everything (create, change, revoke keys and teams; read everything);
- ``viewer``: read keys, teams, usage and deployments; change nothing;
- ``member``: their own keys and usage only (``Principal.owns``).

The admin API enforces them with ``require(principal, role)`` and, for a member,
``principal.owns(key)``. Nothing here reads a body or does I/O of its own except
through the key lookup and the JWT verifier, both bounded and cached.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import msgspec

from ..errors import Forbidden, Unauthorized
from .keys.lookup import presented
from .keys.record import Key

if TYPE_CHECKING:
    from .keys.lookup import KeyLookup

ROLES = ("member", "viewer", "admin")  # in increasing power
_RANK = {role: rank for rank, role in enumerate(ROLES)}


class Principal(msgspec.Struct, frozen=True):
    """An authenticated caller. ``source`` says how: "master", "ops_token", "key",
    "jwt" or "session". ``key_id`` is the API key's id (None for the others; a JWT's
    requests are recorded under ``jwt:<user id>``); ``team_id`` and ``user_id`` when
    known."""

    role: str
    source: str
    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    name: str = ""

    def has(self, role: str) -> bool:
        """Whether this principal's role is ``role`` or above it."""
        return _RANK.get(self.role, -1) >= _RANK[role]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def owns(self, key: Key) -> bool:
        """Whether ``key`` is this principal's own: the key it authenticated with, or a
        key whose ``metadata["owner"]`` is its user id. Viewers and admins may read
        every key; use this for members."""
        if self.key_id is not None and key.id == self.key_id:
            return True
        return self.user_id is not None and key.metadata.get("owner") == self.user_id


def require(principal: Principal, role: str) -> None:
    """Raise a 403 ``Forbidden`` unless ``principal`` has ``role`` (or above)."""
    if not principal.has(role):
        message = f"This needs the {role} role; yours is {principal.role}."
        raise Forbidden(message, code="insufficient_role")


def of_key(key: Key, user_id: str | None = None) -> Principal:
    """The principal of a request made with ``key`` (the master key is ``admin``)."""
    if key.id == "master":
        return Principal(role="admin", source="master", name=key.name)
    source = "jwt" if key.id.startswith("jwt:") else "key"
    return Principal(
        role=key.role,
        source=source,
        key_id=None if source == "jwt" else key.id,
        team_id=key.team_id,
        user_id=user_id if user_id is not None else key.metadata.get("user"),
        name=key.name,
    )


class KeyAuthenticator(Protocol):
    async def authenticate(self, headers: Mapping[str, str]) -> Key: ...


class Authenticator:
    """Credentials in request headers → ``Principal``.

    ``lookup`` is the API path's key lookup (``KeyLookup``, which also verifies JWTs
    when ``auth.jwt`` is configured); ``ops_token`` the configured ops token ("" when
    none). Use one per worker: ``State.authenticator`` (state.py)."""

    def __init__(self, lookup: KeyLookup | KeyAuthenticator | None, ops_token: str = "") -> None:
        self.lookup = lookup
        self.ops = f"Bearer {ops_token}".encode() if ops_token else b""

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The principal of these headers (``Authorization: Bearer`` or ``api-key``).
        Raises ``Unauthorized`` (401 invalid_api_key) when there are no credentials or
        they are wrong, revoked or expired, and ``ServiceUnavailable`` when the key
        store cannot tell."""
        given = headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if self.ops and hmac.compare_digest(given, self.ops):
            return Principal(role="admin", source="ops_token", name="ops token")
        if self.lookup is None:
            if presented(headers) is None:
                raise Unauthorized("This needs credentials (Authorization: Bearer …).")
            raise Unauthorized("Incorrect API key provided.")
        return of_key(await self.lookup.authenticate(headers))
