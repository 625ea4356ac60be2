"""OpenID Connect login for the operator console: authorization code flow with PKCE.

Mount it on the ops app and ask it who is logged in::

    login = OidcLogin(config.oidc)        # config.oidc: config.Oidc (resolved)
    app.cleanup_ctx.append(login.context)  # its HTTP session and the provider's JWKS
    login.add_routes(app.router)          # GET /console/login, /console/callback,
                                          # GET or POST /console/logout
    principal = login.principal(request)  # identity.Principal, or None: not logged in

``/console/login?next=/console/keys`` sends the browser to the provider with a fresh
``state``, ``nonce`` and PKCE verifier (S256), kept in a short-lived signed cookie;
``/console/callback`` checks the state, exchanges the code (client id and secret by
HTTP Basic), verifies the ID token (signature against the provider's JWKS, ``iss``,
``aud``, ``exp``, ``nonce``), maps its claims to a role and sets the session cookie;
``/console/logout`` clears it. The provider is found by discovery
(``{issuer}/.well-known/openid-configuration``); every call to it is bounded by
``oidc.timeout``.

The session is a cookie (``__Host-morngpt-console``: HttpOnly, Secure,
SameSite=Lax, Path=/) holding a token signed (HS256, PyJWT) with
``oidc.session_secret_env``: every worker and replica can read it, nothing is stored
server-side. Logout deletes the cookie and refuses the session in this worker from
then on; a copy of the cookie taken before logout stays valid in other workers until
``oidc.session_ttl`` runs out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import jwt
from aiohttp import web
from authlib.common.security import generate_token
from authlib.oauth2.client import OAuth2Client

from ..config.schema import Oidc
from ..governance.identity import Principal
from ..governance.tokens import Jwks, role_of

log = logging.getLogger("proxy.oidc")

SESSION_COOKIE = "__Host-morngpt-console"
LOGIN_COOKIE = "__Host-morngpt-login"
_LOGIN_TTL = 600  # seconds a login may take at the provider
_ALGORITHMS = ("RS256", "ES256", "EdDSA")
_REVOKED_MAX = 10_000


class LoginFailed(Exception):
    """The login cannot complete; the message is safe to show."""


class OidcLogin:
    """The console's OpenID Connect login; see the module docstring."""

    def __init__(self, settings: Oidc, prefix: str = "/console") -> None:
        self.settings = settings
        self.prefix = prefix.rstrip("/")
        self.session: aiohttp.ClientSession | None = None
        self.metadata: dict[str, Any] | None = None
        self.jwks: Jwks | None = None
        self.revoked: OrderedDict[str, float] = OrderedDict()  # session id -> its exp
        self._discovering: asyncio.Lock = asyncio.Lock()

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """cleanup_ctx body: the HTTP session its calls to the provider use."""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self.session = session
            yield
            self.session = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get(f"{self.prefix}/login", self.login)
        router.add_get(f"{self.prefix}/callback", self.callback)
        router.add_get(f"{self.prefix}/logout", self.logout)
        router.add_post(f"{self.prefix}/logout", self.logout)

    # --- handlers ----------------------------------------------------------------

    async def login(self, request: web.Request) -> web.Response:
        """GET {prefix}/login[?next=path]: off to the provider."""
        metadata = await self._provider()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        client = self._client()
        url, _ = client.create_authorization_url(
            metadata["authorization_endpoint"], state=state, code_verifier=verifier, nonce=nonce
        )
        pending = {"state": state, "nonce": nonce, "verifier": verifier,
                   "next": _local(request.query.get("next"), self.prefix)}  # fmt: skip
        response = _redirect(url)
        _set_cookie(response, LOGIN_COOKIE, self._sign(pending, _LOGIN_TTL), _LOGIN_TTL)
        return response

    async def callback(self, request: web.Request) -> web.Response:
        """GET {prefix}/callback?code&state: the session cookie, then ``next``."""
        try:
            pending = self._read(request.cookies.get(LOGIN_COOKIE))
            if pending is None:
                raise LoginFailed("The login expired or was not started here; try again.")
            if "error" in request.query:
                raise LoginFailed(f"The provider refused: {request.query['error'][:100]}")
            state = request.query.get("state", "")
            if not hmac.compare_digest(state.encode(), str(pending["state"]).encode()):
                raise LoginFailed("The login's state does not match; try again.")
            claims = await self._exchange(request.query.get("code", ""), pending)
            principal = self._principal_of(claims)
        except LoginFailed as exc:
            log.warning("console login refused: %s", exc)
            response = web.Response(status=401, text=f"Login failed: {exc}\n")
            response.del_cookie(LOGIN_COOKIE, path="/")
            return response
        ttl = self.settings.session_ttl
        session = {"sub": principal.user_id, "role": principal.role, "name": principal.name,
                   "team": principal.team_id, "sid": secrets.token_urlsafe(16)}  # fmt: skip
        found = _redirect(str(pending["next"]))
        found.del_cookie(LOGIN_COOKIE, path="/")
        _set_cookie(found, SESSION_COOKIE, self._sign(session, ttl), int(ttl))
        log.info("console login: %s as %s", principal.user_id, principal.role)
        return found

    async def logout(self, request: web.Request) -> web.Response:
        """GET or POST {prefix}/logout: the session ends (see the module docstring)."""
        session = self._read(request.cookies.get(SESSION_COOKIE))
        if session is not None:
            self.revoked[str(session["sid"])] = float(session["exp"])
            while len(self.revoked) > _REVOKED_MAX:
                self.revoked.popitem(last=False)
        response = _redirect(f"{self.prefix}/")
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    def principal(self, request: web.Request) -> Principal | None:
        """Who is logged in to the console with this request's cookie, or None."""
        session = self._read(request.cookies.get(SESSION_COOKIE))
        if session is None or "role" not in session or session.get("sid") in self.revoked:
            return None
        return Principal(
            role=str(session["role"]),
            source="session",
            user_id=str(session["sub"]),
            team_id=session.get("team"),
            name=str(session.get("name") or session["sub"]),
        )

    # --- the provider -------------------------------------------------------------

    def _client(self) -> OAuth2Client:
        return OAuth2Client(
            None,
            client_id=self.settings.client_id,
            redirect_uri=self.settings.redirect_url,
            scope=" ".join(self.settings.scopes),
            code_challenge_method="S256",
        )

    def _basic(self) -> str:
        """client_secret_basic (RFC 6749 2.3.1: each part form-encoded first)."""
        pair = f"{quote_plus(self.settings.client_id)}:{quote_plus(self.settings.client_secret)}"
        return "Basic " + base64.b64encode(pair.encode()).decode()

    def _http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError("OidcLogin.context is not running (add it to cleanup_ctx)")
        return self.session

    async def _provider(self) -> dict[str, Any]:
        """The provider's discovery document, fetched once (bounded)."""
        if self.metadata is None:
            async with self._discovering:
                if self.metadata is None:
                    url = self.settings.issuer.rstrip("/") + "/.well-known/openid-configuration"
                    try:
                        async with self._http().get(url) as response:
                            response.raise_for_status()
                            metadata = await response.json()
                    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                        log.warning("OpenID discovery at %s failed (%s)", url, type(exc).__name__)
                        raise web.HTTPServiceUnavailable(
                            text="The identity provider is unreachable; retry shortly.\n"
                        ) from None
                    s = self.settings
                    self.jwks = Jwks(metadata["jwks_uri"], self._http(), 3600.0, 30.0, s.timeout)
                    self.metadata = metadata
        return self.metadata

    async def _exchange(self, code: str, pending: dict[str, Any]) -> dict[str, Any]:
        """The verified ID token's claims for an authorization code."""
        metadata = await self._provider()
        form = {"grant_type": "authorization_code", "code": code,
                "redirect_uri": self.settings.redirect_url,
                "code_verifier": str(pending["verifier"])}  # fmt: skip
        try:
            async with self._http().post(
                metadata["token_endpoint"], data=form, headers={"Authorization": self._basic()}
            ) as response:
                if response.status != 200:
                    raise LoginFailed(f"The provider refused the code (HTTP {response.status}).")
                tokens = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise LoginFailed(f"The provider did not answer ({type(exc).__name__}).") from None
        id_token = tokens.get("id_token") if isinstance(tokens, dict) else None
        if not isinstance(id_token, str):
            raise LoginFailed("The provider sent no ID token.")
        return await self._verify(id_token, str(pending["nonce"]))

    async def _verify(self, id_token: str, nonce: str) -> dict[str, Any]:
        assert self.jwks is not None  # set with the metadata
        try:
            header = jwt.get_unverified_header(id_token)
        except jwt.PyJWTError:
            raise LoginFailed("The ID token is malformed.") from None
        alg = header.get("alg")
        if alg not in _ALGORITHMS:
            raise LoginFailed("The ID token's algorithm is not accepted.")
        kid = header.get("kid")
        key = await self.jwks.key(kid) if isinstance(kid, str) else None
        if key is None:
            raise LoginFailed("The ID token's signing key is unknown.")
        try:
            claims: dict[str, Any] = jwt.decode(
                id_token,
                key,
                algorithms=[alg],
                audience=self.settings.client_id,
                issuer=self.settings.issuer,
                leeway=30,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            raise LoginFailed(f"The ID token is not valid ({type(exc).__name__}).") from None
        if not hmac.compare_digest(str(claims.get("nonce", "")).encode(), nonce.encode()):
            raise LoginFailed("The ID token's nonce does not match.")
        return claims

    def _principal_of(self, claims: dict[str, Any]) -> Principal:
        s = self.settings
        role = role_of(claims.get(s.role_claim), s.role_map) or s.default_role
        if role is None:
            raise LoginFailed("Your account has no role on this proxy.")
        name = claims.get("email") or claims.get("name") or claims["sub"]
        team = claims.get("team")
        return Principal(
            role=role,
            source="session",
            user_id=str(claims["sub"]),
            team_id=team if isinstance(team, str) else None,
            name=str(name),
        )

    # --- signed cookies -----------------------------------------------------------

    def _sign(self, payload: dict[str, Any], ttl: float) -> str:
        body = {**payload, "exp": int(time.time() + ttl)}
        return jwt.encode(body, self.settings.session_secret, algorithm="HS256")

    def _read(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie:
            return None
        with contextlib.suppress(jwt.PyJWTError):
            payload: dict[str, Any] = jwt.decode(
                cookie,
                self.settings.session_secret,
                algorithms=["HS256"],
                options={"require": ["exp"]},
            )
            return payload
        return None


def _redirect(url: str) -> web.Response:
    return web.Response(status=302, headers={"Location": url, "Cache-Control": "no-store"})


def _set_cookie(response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="Lax"
    )


def _local(target: str | None, prefix: str) -> str:
    """Where to go after login: a path on this host under ``prefix`` (never another
    site: an open redirect), else the console's start page."""
    if target and target.startswith(prefix + "/") and "//" not in target and "\\" not in target:
        return target
    return prefix + "/"
