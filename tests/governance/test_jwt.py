"""JWTs at the API (proxy/governance/tokens.py) against a real issuer (tests/support/issuer.py):
every algorithm, every refusal, key rotation and a JWKS that fails or hangs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import openai
import pytest
from cryptography.hazmat.primitives import serialization

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.governance.keys.teams import TeamStore
from proxy.state import STATE
from tests.support.inproc import MakeProxy, Proxy
from tests.support.issuer import Issuer
from tests.support.keys import keyed

MESSAGES = [{"role": "user", "content": "hi"}]


def jwt_auth(issuer: Issuer, user_rpm: int | None = None, **settings: Any) -> cfg.Auth:
    trusted = cfg.JwtIssuer(
        issuer=issuer.url,
        jwks_url=f"{issuer.url}/jwks",
        audience=["proxy"],
        role_claim="roles",
        role_map={"proxy-admins": "admin", "proxy-viewers": "viewer"},
        user_rpm=user_rpm,
    )
    defaults: dict[str, Any] = {"jwks_min_interval": 0.2, "jwks_timeout": 0.5}
    return cfg.Auth(jwt=cfg.Jwt(issuers=[trusted], **{**defaults, **settings}))


async def start(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    issuer: Issuer,
    team_rpm: int | None = None,
    **settings: Any,
) -> Proxy:
    proxy = await make_proxy(keyed(upstream.url, auth=jwt_auth(issuer, **settings)), auth=True)
    teams = TeamStore(proxy.runner.app[STATE].db)
    await teams.create("team one", team_id="t1", models=["m1"], rpm=team_rpm)
    return proxy


async def chat(proxy: Proxy, token: str, model: str = "m1") -> str | None:
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=token, max_retries=0) as c:
        reply = await c.chat.completions.create(model=model, messages=MESSAGES)
    return reply.choices[0].message.content


async def refused(proxy: Proxy, token: str) -> str:
    with pytest.raises(openai.AuthenticationError) as caught:
        await chat(proxy, token)
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    assert token not in caught.value.message
    return caught.value.message


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token made by hand: unsigned (``alg: none``) or HMAC-signed with ``secret``."""
    head = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    if secret is None:
        return head + "."
    return f"{head}.{b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())}"


async def test_tokens_of_every_algorithm_are_served_under_their_user_and_team(
    make_proxy: MakeProxy, upstream: FakeUpstream, issuer: Issuer
) -> None:
    proxy = await start(make_proxy, upstream, issuer)
    for kind in ("rsa", "ec", "ed"):
        assert await chat(proxy, issuer.sign(kind=kind)) is not None
    for exchange in proxy.recorder.exchanges:
        assert exchange.key_id == "jwt:alice"
    # The team's models apply to its users.
    with pytest.raises(openai.PermissionDeniedError):
        await chat(proxy, issuer.sign(), model="m2")
    # Roles from claims, for the admin API.
    token = issuer.sign({"roles": ["other", "proxy-viewers"], "sub": "bob"})
    principal = await proxy.state.authenticator.authenticate({"Authorization": f"Bearer {token}"})
    assert (principal.role, principal.source, principal.user_id, principal.team_id) == (
        "viewer", "jwt", "bob", "t1",
    )  # fmt: skip
    assert principal.key_id is None


async def test_users_share_their_teams_limits_and_have_their_own(
    make_proxy: MakeProxy, upstream: FakeUpstream, issuer: Issuer
) -> None:
    proxy = await start(make_proxy, upstream, issuer, team_rpm=3, user_rpm=2)
    alice, bob = issuer.sign({"sub": "alice"}), issuer.sign({"sub": "bob"}, kind="ed")
    assert await chat(proxy, alice) is not None
    assert await chat(proxy, alice) is not None
    with pytest.raises(openai.RateLimitError) as caught:  # alice's own 2 a minute
        await chat(proxy, alice)
    assert "team" not in caught.value.message
    assert await chat(proxy, bob) is not None  # the team's third
    with pytest.raises(openai.RateLimitError) as caught:  # the team's 3 a minute
        await chat(proxy, bob)
    assert "team t1" in caught.value.message
    assert len(upstream.received) == 3


async def test_every_bad_token_is_a_401(
    make_proxy: MakeProxy, upstream: FakeUpstream, issuer: Issuer
) -> None:
    proxy = await start(make_proxy, upstream, issuer)
    now = int(time.time())
    good = {"iss": issuer.url, "aud": "proxy", "sub": "eve", "team": "t1", "exp": now + 300}
    rsa_kid = issuer.kid("rsa")
    public_pem = (
        issuer.keys[rsa_kid][1]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    unpublished = issuer.add_key("rsa", publish=False)
    cases = {
        "alg none": forged({"alg": "none", "kid": rsa_kid}, good, None),
        "HMAC with the public key": forged({"alg": "HS256", "kid": rsa_kid}, good, public_pem),
        "expired": issuer.sign({"exp": now - 120}),
        "not yet valid": issuer.sign({"nbf": now + 120}),
        "no exp": issuer.sign({"exp": None}),
        "wrong audience": issuer.sign({"aud": "someone-else"}),
        "unknown issuer": issuer.sign({"iss": "https://evil.example"}),
        "unknown kid": issuer.sign(kid=unpublished),
        "signed by another key": issuer.sign(kid=unpublished).rsplit(".", 1)[0]
        + "."
        + issuer.sign().rsplit(".", 1)[1],
        "no team": issuer.sign({"team": None}),
        "unknown team": issuer.sign({"team": "t9"}),
        "no user": issuer.sign({"sub": None}),
        "garbage": "eyJhbGciOiJSUzI1NiJ9.e30.AAAA",
    }
    messages = {name: await refused(proxy, token) for name, token in cases.items()}
    assert "expired" in messages["expired"]
    assert "algorithm" in messages["alg none"]
    assert "algorithm" in messages["HMAC with the public key"]
    assert "audience" in messages["wrong audience"]
    assert "unknown" in messages["unknown team"]
    assert upstream.received == []
    # Within the leeway (30 s by default) a token just past its exp still passes.
    assert await chat(proxy, issuer.sign({"exp": now - 5})) is not None


async def test_key_rotation_is_picked_up_on_an_unknown_kid(
    make_proxy: MakeProxy, upstream: FakeUpstream, issuer: Issuer
) -> None:
    proxy = await start(make_proxy, upstream, issuer)
    assert await chat(proxy, issuer.sign()) is not None
    new = issuer.add_key("rsa")
    issuer.published = [new]  # the old key retired, the new one published
    await asyncio.sleep(0.25)  # jwks_min_interval: the rotation may fetch again after it
    assert await chat(proxy, issuer.sign({"sub": "carol"}, kid=new)) is not None


async def test_a_failing_jwks_keeps_known_keys_and_refuses_unknown_kids(
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    issuer: Issuer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start(make_proxy, upstream, issuer)
    assert await chat(proxy, issuer.sign()) is not None
    issuer.jwks_mode = "refuse"
    fresh = issuer.add_key("ec")
    await asyncio.sleep(0.25)
    with caplog.at_level(logging.WARNING, logger="proxy.jwt"):
        await refused(proxy, issuer.sign(kind="ec", kid=fresh))
    assert "unknown kid" in caplog.text
    assert "JWKS" in caplog.text
    # Known keys keep working, with new tokens (a new signature check) as well.
    assert await chat(proxy, issuer.sign({"sub": "dave"}, kind="ed")) is not None
    # The endpoint gone altogether (connections refused): the same.
    await issuer.close()
    await asyncio.sleep(0.6)  # past the first backoff (at most 0.5 s) and the interval
    started = time.monotonic()
    await refused(proxy, issuer.sign(kind="ec", kid=fresh))
    assert time.monotonic() - started < 2
    assert await chat(proxy, issuer.sign({"sub": "erin"}, kind="rsa")) is not None


async def test_a_hung_jwks_costs_one_bounded_wait_per_backoff_not_one_per_request(
    make_proxy: MakeProxy, upstream: FakeUpstream, issuer: Issuer
) -> None:
    # Fetches for unknown kids at most every 5 s: however slow this machine is, the
    # requests after the hung fetch fall in one window.
    proxy = await start(make_proxy, upstream, issuer, jwks_timeout=0.5, jwks_min_interval=5)
    assert await chat(proxy, issuer.sign()) is not None
    issuer.jwks_mode = "hang"
    hits = issuer.jwks_hits
    fresh = issuer.add_key("rsa")
    started = time.monotonic()
    tokens = [issuer.sign({"sub": f"u{i}"}, kid=fresh) for i in range(5)]
    await asyncio.gather(*(refused(proxy, t) for t in tokens))  # one shared fetch
    first = time.monotonic() - started
    assert 0.4 < first < 5
    assert issuer.jwks_hits == hits + 1
    for i in range(5):  # within the window: refused without a fetch (so without a wait)
        await refused(proxy, issuer.sign({"sub": f"v{i}"}, kid=fresh))
    assert issuer.jwks_hits == hits + 1
    assert await chat(proxy, issuer.sign({"sub": "known"})) is not None


async def test_the_jwt_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m bench.jwt``, tiny: every line it prints is there (figures: docs)."""
    from bench.jwt import main

    await main(requests=200, reuse=10)
    out = capsys.readouterr().out
    for line in ("API key (baseline)", "verified before (cache)", "RS256", "ES256", "EdDSA"):
        assert line in out
