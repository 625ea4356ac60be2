"""OpenID Connect login for the console (proxy/admin/oidc.py): the code flow with PKCE against
the issuer of tests/issuer.py, over real HTTP, cookies handled as a browser would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from proxy.admin.oidc import LOGIN_COOKIE, SESSION_COOKIE, OidcLogin
from proxy.config import schema as cfg

from .issuer import Issuer

SECRET = "session-secret-" + "k" * 40


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    issuer = Issuer()
    await issuer.start()
    try:
        yield issuer
    finally:
        await issuer.close()


class Console:
    """An ops-like app with the login mounted and a route that says who is logged in."""

    def __init__(self, issuer: Issuer, **settings: Any) -> None:
        self.issuer = issuer
        self.settings = settings
        self.url = ""
        self.runner: web.AppRunner | None = None
        self.login: OidcLogin | None = None

    async def start(self) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        oidc = cfg.Oidc(
            issuer=self.issuer.url,
            redirect_url=f"{self.url}/console/callback",
            role_map={"proxy-admins": "admin", "proxy-viewers": "viewer"},
            client_id="console",
            client_secret="s3cret",
            session_secret=SECRET,
            **self.settings,
        )
        self.login = login = OidcLogin(oidc)
        app = web.Application()
        app.cleanup_ctx.append(login.context)
        login.add_routes(app.router)

        async def whoami(request: web.Request) -> web.Response:
            principal = login.principal(request)
            return web.json_response(None if principal is None else msgspec.to_builtins(principal))

        app.router.add_get("/console/whoami", whoami)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def console(issuer: Issuer) -> AsyncIterator[Console]:
    console = Console(issuer)
    await console.start()
    try:
        yield console
    finally:
        await console.close()


def cookies_of(response: aiohttp.ClientResponse) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", []):
        jar.load(header)
    return jar


async def log_in(
    http: aiohttp.ClientSession, console: Console, next_path: str = "/console/keys"
) -> tuple[aiohttp.ClientResponse, SimpleCookie]:
    """Login → provider → callback, as a browser follows it: (callback answer, cookies)."""
    async with http.get(
        f"{console.url}/console/login", params={"next": next_path}, allow_redirects=False
    ) as r:
        assert r.status == 302
        login_cookie = cookies_of(r)[LOGIN_COOKIE]
        to_provider = r.headers["Location"]
    assert to_provider.startswith(console.issuer.url + "/authorize?")
    assert "code_challenge_method=S256" in to_provider
    async with http.get(to_provider, allow_redirects=False) as r:
        assert r.status == 302
        back = r.headers["Location"]
    assert back.startswith(f"{console.url}/console/callback?")
    headers = {"Cookie": f"{LOGIN_COOKIE}={login_cookie.value}"}
    async with http.get(back, headers=headers, allow_redirects=False) as r:
        await r.read()
        return r, cookies_of(r)


async def whoami(http: aiohttp.ClientSession, console: Console, session: str) -> Any:
    headers = {"Cookie": f"{SESSION_COOKIE}={session}"}
    async with http.get(f"{console.url}/console/whoami", headers=headers) as r:
        return await r.json()


async def test_code_flow_with_pkce_sets_a_strict_session_cookie_and_logout_ends_it(
    console: Console,
) -> None:
    async with aiohttp.ClientSession() as http:
        answer, cookies = await log_in(http, console)
        assert answer.status == 302
        assert answer.headers["Location"] == "/console/keys"
        session = cookies[SESSION_COOKIE]
        assert session["httponly"]
        assert session["secure"]
        assert session["samesite"] == "Lax"
        assert session["path"] == "/"
        assert cookies[LOGIN_COOKIE].value == ""  # the login's cookie is spent
        me = await whoami(http, console, session.value)
        assert me["role"] == "admin"
        assert me["source"] == "session"
        assert me["user_id"] == "alice"
        async with http.post(
            f"{console.url}/console/logout",
            headers={"Cookie": f"{SESSION_COOKIE}={session.value}"},
            allow_redirects=False,
        ) as r:
            assert r.status == 302
            assert cookies_of(r)[SESSION_COOKIE].value == ""
        assert await whoami(http, console, session.value) is None
        assert await whoami(http, console, session.value[:-2] + "xx") is None


async def test_roles_come_from_claims_and_no_role_no_login(console: Console) -> None:
    async with aiohttp.ClientSession() as http:
        console.issuer.user = {"sub": "vic", "roles": ["proxy-viewers"], "email": "v@x"}
        _, cookies = await log_in(http, console)
        me = await whoami(http, console, cookies[SESSION_COOKIE].value)
        assert (me["role"], me["name"]) == ("viewer", "v@x")
        console.issuer.user = {"sub": "nobody", "roles": ["unrelated"]}
        answer, cookies = await log_in(http, console)
        assert answer.status == 401
        assert SESSION_COOKIE not in cookies


async def test_refusals_state_missing_cookie_and_open_redirects(console: Console) -> None:
    async with aiohttp.ClientSession() as http:
        # A callback without the login's cookie (a forged or replayed link).
        async with http.get(
            f"{console.url}/console/callback", params={"code": "x", "state": "y"}
        ) as r:
            assert r.status == 401
            assert SESSION_COOKIE not in cookies_of(r)
        # A state that is not the one this browser was given.
        async with http.get(f"{console.url}/console/login", allow_redirects=False) as r:
            login_cookie = cookies_of(r)[LOGIN_COOKIE].value
        async with http.get(
            f"{console.url}/console/callback",
            params={"code": "x", "state": "not-it"},
            headers={"Cookie": f"{LOGIN_COOKIE}={login_cookie}"},
        ) as r:
            assert r.status == 401
            assert "state" in await r.text()
        # next= can only be a console path on this host.
        for target in ("https://evil.example/", "//evil.example/console/", "/other"):
            answer, _ = await log_in(http, console, target)
            assert answer.headers["Location"] == "/console/"
