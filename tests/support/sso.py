"""Single sign-on helpers (tests/admin/test_oidc.py, tests/admin/test_admin.py): the login
settings against the test issuer (tests/support/issuer.py), a console-like app with
the login mounted, and a browser's way through the code flow."""

from __future__ import annotations

import socket
from http.cookies import SimpleCookie
from typing import Any, Protocol

import aiohttp
import msgspec
from aiohttp import web

from proxy.admin.oidc import LOGIN_COOKIE, SESSION_COOKIE, OidcLogin
from proxy.config import schema as cfg

from .issuer import Issuer

SECRET = "session-secret-" + "k" * 40


def oidc_settings(issuer_url: str, redirect_url: str, **settings: Any) -> cfg.Oidc:
    """The login against the test issuer: two roles from the ``roles`` claim."""
    return cfg.Oidc(
        issuer=issuer_url,
        redirect_url=redirect_url,
        role_map={"proxy-admins": "admin", "proxy-viewers": "viewer"},
        client_id="console",
        client_secret="s3cret",
        session_secret=SECRET,
        **settings,
    )


class Site(Protocol):
    """Where the login is mounted, and its issuer."""

    url: str
    issuer: Issuer


class Console:
    """An ops-like app with the login mounted and a route that says who is logged in."""

    def __init__(self, issuer: Issuer, **settings: Any) -> None:
        self.issuer = issuer
        self.settings = settings
        self.url = ""
        self.runner: web.AppRunner | None = None
        self.login: OidcLogin | None = None

    async def start(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        oidc = oidc_settings(self.issuer.url, f"{self.url}/console/callback", **self.settings)
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


def cookies_of(response: aiohttp.ClientResponse) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", []):
        jar.load(header)
    return jar


async def log_in(
    http: aiohttp.ClientSession, console: Site, next_path: str = "/console/keys"
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


async def whoami(http: aiohttp.ClientSession, console: Site, session: str) -> Any:
    headers = {"Cookie": f"{SESSION_COOKIE}={session}"}
    async with http.get(f"{console.url}/console/whoami", headers=headers) as r:
        return await r.json()
