"""Who is calling the admin API: credentials through identity.py (the one place roles
are decided: master key and ops token → admin, an API key → its own role), or the
console's session cookie.

With ``oidc`` configured, the console's single sign-on session (oidc.py, #19) is
accepted too, with the role the provider's claims gave. Otherwise a session
(``POST /admin/v1/session`` with one of those credentials) is an
HMAC-signed, expiring statement of the principal, so every worker and replica checks
it without shared state. Its HMAC key is derived from the master key's hash and the
ops token, so sessions exist only when one of them is set. A session made from an API
key is checked against the key store on each request: revoking the key ends it, and
a changed role or team applies at once.

Invariants: credentials are never logged, stored or echoed; the cookie holds the
principal (role, ids, name), never a credential.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

import msgspec
from aiohttp import web

from ..config.schema import Config
from ..errors import Forbidden, Unauthorized
from ..governance.identity import Authenticator, Principal, of_key
from ..governance.keys.lookup import presented
from ..governance.keys.store import KeyStore
from .oidc import OidcLogin

COOKIE = "morngpt_console"
SESSION_SECONDS = 12 * 3600


class _Session(msgspec.Struct, frozen=True, array_like=True):
    principal: Principal
    expires: float


class Access:
    """Turns requests into principals and principals into session cookies."""

    def __init__(
        self,
        config: Config,
        authenticator: Callable[[], Authenticator],
        login: OidcLogin | None = None,
    ) -> None:
        self.authenticator = authenticator
        self.login = login
        master, ops = config.auth.master_key_sha256, config.server.ops_token
        seed = f"morngpt-console\0{master}\0{ops}".encode()
        self.signing = hashlib.sha256(seed).digest() if (master or ops) else b""
        self.secure = bool(config.server.tls_cert)

    async def principal(self, request: web.Request, store: KeyStore | None) -> Principal:
        """The caller: from its credential headers, else its session; or ``Unauthorized``."""
        if presented(request.headers) is not None:
            return await self.authenticator().authenticate(request.headers)
        if self.login is not None and (signed_on := self.login.principal(request)) is not None:
            return signed_on
        cookie = request.cookies.get(COOKIE)
        if not cookie:
            raise Unauthorized(
                "This needs a credential (Authorization: Bearer …) or a console session."
            )
        return await self._from_cookie(cookie, store)

    async def from_credential(self, credential: str) -> Principal:
        return await self.authenticator().authenticate({"Authorization": f"Bearer {credential}"})

    async def _from_cookie(self, cookie: str, store: KeyStore | None) -> Principal:
        session = self._verify(cookie)
        if session is None or session.expires < time.time():
            raise Unauthorized("The console session has expired; log in again.")
        principal = session.principal
        if principal.source == "key" and principal.key_id is not None:
            key = None if store is None else await store.get(principal.key_id)
            if key is None or not key.is_usable(time.time()):
                raise Unauthorized("The key this session was opened with no longer works.")
            return of_key(key)
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


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValueError("not base64") from exc
