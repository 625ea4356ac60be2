"""What a JWT costs a request: ``python -m bench.jwt [--requests N] [--reuse R]``.

Runs the API path's ``KeyLookup.authenticate`` (what the gate calls on every request's
headers) in one process, against a JWKS served over loopback by this script (keys
made per run), and prints microseconds per request for:

- an API key declared in the config (the baseline: a SHA-256 and a dict lookup);
- a JWT seen before (the verification cache: a SHA-256 and a dict lookup);
- a JWT seen for the first time, per algorithm (a full signature check);
- the amortised cost when each token is used ``--reuse`` times (a client keeps its
  token for its lifetime: at 1 request/s, a 5-minute token serves 300).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from proxy.config import schema as cfg
from proxy.governance.keys import secret
from proxy.governance.keys.lookup import KeyLookup
from proxy.governance.tokens import TokenVerifier

KINDS: dict[str, tuple[str, Callable[[], Any], Any]] = {
    "RS256": ("RS256", lambda: rsa.generate_private_key(65537, 2048), RSAAlgorithm),
    "ES256": ("ES256", lambda: ec.generate_private_key(ec.SECP256R1()), ECAlgorithm),
    "EdDSA": ("EdDSA", ed25519.Ed25519PrivateKey.generate, OKPAlgorithm),
}


async def per_request(run: Callable[[], Coroutine[Any, Any, Any]], count: int) -> float:
    """Median over 5 rounds of the mean µs per call of ``run``."""
    rounds = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(count):
            await run()
        rounds.append((time.perf_counter() - started) / count * 1e6)
    return statistics.median(rounds)


async def main(requests: int, reuse: int) -> None:
    keys = {alg: make() for alg, (_, make, _) in KINDS.items()}
    jwks = {"keys": [{**codec.to_jwk(keys[alg].public_key(), as_dict=True), "kid": alg}
                     for alg, (_, _, codec) in KINDS.items()]}  # fmt: skip
    app = web.Application()

    async def serve_jwks(request: web.Request) -> web.Response:
        return web.json_response(jwks)

    app.router.add_get("/jwks", serve_jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    issuer = f"http://{host}:{port}"
    settings = cfg.Jwt(
        issuers=[cfg.JwtIssuer(issuer=issuer, jwks_url=f"{issuer}/jwks", audience=["proxy"])],
        cache_size=max(10_000, requests * 2),
    )
    value = secret.generate()
    declared = cfg.DeclaredKey(id="bench", sha256=secret.digest(value))
    serial = iter(range(10**9))

    def token(alg: str) -> str:
        now = int(time.time())
        claims = {"iss": issuer, "aud": "proxy", "sub": f"user{next(serial)}", "team": "t",
                  "exp": now + 600}  # fmt: skip
        return jwt.encode(claims, keys[alg], algorithm=alg, headers={"kid": alg})

    try:
        async with aiohttp.ClientSession() as session:
            verifier = TokenVerifier(settings, session)
            lookup = KeyLookup(None, cfg.Auth(), [declared], verifier)
            api_key = {"Authorization": f"Bearer {value}"}
            await lookup.authenticate({"Authorization": f"Bearer {token('RS256')}"})  # JWKS
            base = await per_request(lambda: lookup.authenticate(api_key), requests)
            seen = {"Authorization": f"Bearer {token('ES256')}"}
            await lookup.authenticate(seen)
            cached = await per_request(lambda: lookup.authenticate(seen), requests)
            print(f"API key (baseline)            {base:8.2f} µs/request")
            print(f"JWT, verified before (cache)  {cached:8.2f} µs/request  "
                  f"({cached / base:.2f}x the API key)")  # fmt: skip
            for alg in KINDS:
                fresh = [{"Authorization": f"Bearer {token(alg)}"} for _ in range(requests // 10)]
                started = time.perf_counter()
                for headers in fresh:
                    await lookup.authenticate(headers)
                cold = (time.perf_counter() - started) / len(fresh) * 1e6
                amortised = (cold + (reuse - 1) * cached) / reuse
                print(f"JWT {alg}, first use           {cold:8.2f} µs/request; "
                      f"amortised over {reuse} uses: {amortised:6.2f} µs/request")  # fmt: skip
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--reuse", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.reuse))
