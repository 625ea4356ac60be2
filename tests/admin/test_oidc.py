"""OpenID Connect login for the console (proxy/admin/oidc.py): the code flow with PKCE against
the issuer of tests/support/issuer.py, over real HTTP, cookies handled as a browser would."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.admin.oidc import LOGIN_COOKIE, SESSION_COOKIE
from tests.support.issuer import Issuer
from tests.support.sso import Console, cookies_of, log_in, whoami


@pytest.fixture
async def console(issuer: Issuer) -> AsyncIterator[Console]:
    console = Console(issuer)
    await console.start()
    try:
        yield console
    finally:
        await console.close()


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
