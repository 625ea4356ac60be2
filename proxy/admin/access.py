"""Who is calling the admin API, and what their role lets them do.

A caller is a ``Principal`` with a role: ``admin`` (everything), ``viewer`` (read
everything, change nothing) or ``member`` (their own key, its limits, budget and
usage). Credentials, tried in this order:

- ``Authorization: Bearer <master key>`` → admin;
- ``Authorization: Bearer <ops token>`` → viewer (what monitoring holds: it reads);
- ``Authorization: Bearer <API key>`` → member of that key (usable keys only);
- the console's session cookie, made by ``POST /admin/v1/session`` from one of the
  above: an HMAC-signed, expiring statement of the principal, so every worker and
  replica checks it without shared state. Its HMAC key is derived from the master
  key's hash and the ops token, so sessions exist only when one of them is set; a
  member's session is checked against the key store on each request (a revoked key's
  session ends with it).

Invariants: credentials are compared in constant time, hashed at once, never logged
and never echoed in an error message.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Iterable
from typing import Literal

import msgspec
from aiohttp import web

from ..config import Config
from ..errors import Forbidden, Unauthorized
from ..keys import secret
from ..keys.record import Key, declared
from ..keys.store import KeyStore

Role = Literal["admin", "viewer", "member"]
ROLES: tuple[Role, ...] = ("admin", "viewer", "member")
COOKIE = "morngpt_console"
SESSION_SECONDS = 12 * 3600
_RANK = {"member": 0, "viewer": 1, "admin": 2}


class Principal(msgspec.Struct, frozen=True):
    """The caller of an admin request."""

    role: Role
    name: str
    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None

    def may(self, role: Role) -> bool:
        """Whether this principal's role is at least ``role``."""
        return _RANK[self.role] >= _RANK[role]


class _Session(msgspec.Struct, frozen=True, array_like=True):
    principal: Principal
    expires: float


_NO_CREDENTIAL = (
    "This endpoint needs a credential: Authorization: Bearer <key> or a console session."
)
_BAD_CREDENTIAL = "Incorrect or revoked credential."


class Access:
    """Turns requests into principals and principals into session cookies."""

    def __init__(self, config: Config) -> None:
        self.master = config.auth.master_key_sha256
        self.ops = config.server.ops_token
        self.declared = {k.sha256: declared(k) for k in config.keys}
        seed = f"morngpt-console\0{self.master}\0{self.ops}".encode()
        self.signing = hashlib.sha256(seed).digest() if (self.master or self.ops) else b""
        self.secure = bool(config.server.tls_cert)

    async def principal(self, request: web.Request, store: KeyStore | None) -> Principal:
        """The caller, or ``Unauthorized``."""
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return await self.from_credential(auth[7:].strip(), store)
        cookie = request.cookies.get(COOKIE)
        if cookie:
            return await self._from_cookie(cookie, store)
        raise Unauthorized(_NO_CREDENTIAL)

    async def from_credential(self, credential: str, store: KeyStore | None) -> Principal:
        digest = secret.digest(credential)
        if self.master and hmac.compare_digest(digest, self.master):
            return Principal("admin", "master key")
        ops = self.ops.encode("utf-8", "surrogateescape")
        given = credential.encode("utf-8", "surrogateescape")
        if ops and hmac.compare_digest(given, ops):
            return Principal("viewer", "ops token")
        key = self.declared.get(digest)
        if key is None and store is not None and secret.looks_issued(credential):
            key = await store.find(digest)
        if key is None or not key.is_usable(time.time()):
            raise Unauthorized(_BAD_CREDENTIAL)
        return member(key)

    async def _from_cookie(self, cookie: str, store: KeyStore | None) -> Principal:
        session = self._verify(cookie)
        if session is None or session.expires < time.time():
            raise Unauthorized("The console session has expired; log in again.")
        principal = session.principal
        if principal.role == "member" and principal.key_id is not None:
            key = await _current(principal.key_id, self.declared.values(), store)
            if key is None or not key.is_usable(time.time()):
                raise Unauthorized(_BAD_CREDENTIAL)
        return principal

    def cookie(self, principal: Principal) -> str:
        """A signed session for ``principal``, valid ``SESSION_SECONDS``."""
        if not self.signing:
            raise Forbidden(
                "Console sessions need auth.master_key_env or server.ops_token_env set.",
                code="sessions_disabled",
            )
        body = msgspec.msgpack.encode(_Session(principal, time.time() + SESSION_SECONDS))
        mac = hmac.new(self.signing, body, hashlib.sha256).digest()
        return _b64(body) + "." + _b64(mac)

    def _verify(self, cookie: str) -> _Session | None:
        if not self.signing:
            return None
        body_text, _, mac_text = cookie.partition(".")
        try:
            body, mac = _unb64(body_text), _unb64(mac_text)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, hmac.new(self.signing, body, hashlib.sha256).digest()):
            return None
        try:
            return msgspec.msgpack.decode(body, type=_Session)
        except msgspec.DecodeError:
            return None


def member(key: Key) -> Principal:
    """The principal of an API key's holder."""
    return Principal("member", key.name, key_id=key.id)


def require(principal: Principal, role: Role) -> None:
    """Raise ``Forbidden`` unless ``principal`` has at least ``role``."""
    if not principal.may(role):
        raise Forbidden(f"This needs the {role} role.", code="insufficient_role")


async def _current(key_id: str, fixed: Iterable[Key], store: KeyStore | None) -> Key | None:
    for key in fixed:
        if key.id == key_id:
            return key
    return None if store is None else await store.get(key_id)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError("not base64") from exc
