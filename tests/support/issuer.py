"""A real token issuer for the tests: signing keys made per run (RSA, P-256, Ed25519),
a JWKS endpoint that can be made to fail or hang, and an OpenID provider's discovery,
authorization and token endpoints for the code flow with PKCE (S256)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import urlencode

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ALGORITHMS = {"rsa": "RS256", "ec": "ES256", "ed": "EdDSA"}


def new_key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return ed25519.Ed25519PrivateKey.generate()


def public_jwk(kind: str, key: Any, kid: str) -> dict[str, Any]:
    codec = {"rsa": RSAAlgorithm, "ec": ECAlgorithm, "ed": OKPAlgorithm}[kind]
    jwk: dict[str, Any] = codec.to_jwk(key.public_key(), as_dict=True)  # type: ignore[attr-defined]
    return {**jwk, "kid": kid, "use": "sig", "alg": ALGORITHMS[kind]}


class Issuer:
    """Start with ``await issuer.start()``; ``url`` is its ``iss``."""

    def __init__(self, client_id: str = "console", client_secret: str = "s3cret") -> None:
        self.keys: dict[str, tuple[str, Any]] = {}  # kid -> (kind, private key)
        self.published: list[str] = []  # kids in the JWKS
        for kind in ALGORITHMS:
            self.add_key(kind)
        self.jwks_mode = "ok"  # "ok", "refuse" (HTTP 503) or "hang"
        self.jwks_hits = 0
        self.client_id, self.client_secret = client_id, client_secret
        self.user: dict[str, Any] = {"sub": "alice", "roles": ["proxy-admins"]}
        self.codes: dict[str, dict[str, Any]] = {}
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.hung = asyncio.Event()
        self.released = asyncio.Event()

    def add_key(self, kind: str, publish: bool = True) -> str:
        kid = f"{kind}-{secrets.token_hex(4)}"
        self.keys[kid] = (kind, new_key(kind))
        if publish:
            self.published.append(kid)
        return kid

    def kid(self, kind: str) -> str:
        return next(k for k in self.published if self.keys[k][0] == kind)

    def sign(self, claims: dict[str, Any] | None = None, kind: str = "rsa", **extra: Any) -> str:
        """A token with sensible defaults (this issuer, audience "proxy", 5 minutes)."""
        kid = extra.pop("kid", None) or self.kid(kind)
        now = int(time.time())
        body = {"iss": self.url, "aud": "proxy", "sub": "alice", "team": "t1",
                "iat": now, "exp": now + 300, **(claims or {})}  # fmt: skip
        body = {k: v for k, v in body.items() if v is not None}
        kind, key = self.keys[kid]
        return jwt.encode(body, key, algorithm=ALGORITHMS[kind], headers={"kid": kid})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/jwks", self.jwks)
        app.router.add_get("/authorize", self.authorize)
        app.router.add_post("/token", self.token)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        self.released.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.url,
            "authorization_endpoint": f"{self.url}/authorize",
            "token_endpoint": f"{self.url}/token",
            "jwks_uri": f"{self.url}/jwks",
            "response_types_supported": ["code"],
            "code_challenge_methods_supported": ["S256"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256", "EdDSA"],
        })  # fmt: skip

    async def jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if self.jwks_mode == "hang":
            self.hung.set()
            await self.released.wait()  # till close(): a hang that never answers
        if self.jwks_mode == "refuse":
            return web.Response(status=503)
        keys = [public_jwk(*self.keys[kid], kid) for kid in self.published]
        return web.json_response({"keys": keys})

    async def authorize(self, request: web.Request) -> web.Response:
        """Logs ``self.user`` in at once and sends the browser back with a code."""
        q = request.query
        if (
            q.get("response_type") != "code"
            or q.get("client_id") != self.client_id
            or q.get("code_challenge_method") != "S256"
            or not q.get("code_challenge")
            or not q.get("state")
        ):
            return web.Response(status=400, text="bad authorization request")
        code = secrets.token_urlsafe(16)
        self.codes[code] = dict(q)
        target = f"{q['redirect_uri']}?{urlencode({'code': code, 'state': q['state']})}"
        raise web.HTTPFound(target)

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        auth = request.headers.get("Authorization", "")
        expected = base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if auth != f"Basic {expected}":
            return web.json_response({"error": "invalid_client"}, status=401)
        asked = self.codes.pop(str(form.get("code")), None)
        verifier = str(form.get("code_verifier", ""))
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        if (
            asked is None
            or form.get("grant_type") != "authorization_code"
            or form.get("redirect_uri") != asked["redirect_uri"]
            or challenge != asked["code_challenge"]
        ):
            return web.json_response({"error": "invalid_grant"}, status=400)
        id_token = self.sign({"aud": self.client_id, "nonce": asked.get("nonce"), **self.user})
        return web.json_response(
            {"access_token": secrets.token_urlsafe(16), "token_type": "Bearer",
             "expires_in": 300, "id_token": id_token}
        )  # fmt: skip
