"""A proxy with the admin API on its ops port (master key, ops token, fast ledger and
key cache), and a client that checks every answer against the OpenAPI document."""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
from openapi_schema_validator import OAS31Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from proxy.admin.openapi import document
from proxy.config import schema as cfg
from proxy.config.load import quick_start, resolve
from proxy.config.upstreams import Price

from .env import UPSTREAM_KEY, free_port
from .inproc import MakeProxy, Proxy
from .leaks import SECRETS

MASTER = "mk-" + secrets.token_urlsafe(32)
OPS = "ops-" + secrets.token_urlsafe(24)
SECRETS.update((MASTER, OPS))
DOC = document()
_REGISTRY = Registry().with_resource("urn:admin", DRAFT202012.create_resource(DOC))


def admin_config(upstream_url: str, monkeypatch: Any) -> cfg.Config:
    monkeypatch.setenv("MORNGPT_TEST_MASTER", MASTER)
    monkeypatch.setenv("MORNGPT_TEST_OPS", OPS)
    base = quick_start(upstream_url, UPSTREAM_KEY)
    priced = [
        msgspec.structs.replace(m, price=Price(Decimal("1000"), Decimal("2000")))
        for m in base.models
    ]
    config = msgspec.structs.replace(
        base,
        models=priced,
        server=msgspec.structs.replace(
            base.server, ops_token_env="MORNGPT_TEST_OPS", ops_port=free_port()
        ),
        auth=cfg.Auth(master_key_env="MORNGPT_TEST_MASTER", cache_ttl=0.05, negative_ttl=0.05),
        usage=cfg.Ledger(flush_interval=0.05),
    )
    return resolve(config)


def _template(path: str) -> str:
    """The OpenAPI path a concrete path matches."""
    for template in DOC["paths"]:
        pattern = re.sub(r"\\{\w+\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            return str(template)
    raise AssertionError(f"{path} is not in the OpenAPI document")


def check(method: str, path: str, status: int, body: Any) -> None:
    """``body`` is what the document says ``method path`` answers with ``status``."""
    operation = DOC["paths"][_template(path)][method.lower()]
    answer = operation["responses"].get(str(status))
    assert answer is not None, f"{method} {path}: status {status} is not documented"
    if "content" not in answer:
        assert body is None, f"{method} {path}: {status} documents no body"
        return
    schema = {"$ref": "urn:admin" + answer["content"]["application/json"]["schema"]["$ref"]}
    OAS31Validator(schema, registry=_REGISTRY).validate(body)


class Admin:
    """A client of one proxy's admin API, with a credential (or a session cookie)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, credential: str | None) -> None:
        self.http = http
        self.base = base
        self.credential = credential

    async def call(
        self, method: str, path: str, json: Any = None, expect: int = 200, raw: bytes | None = None,
        **params: Any,
    ) -> Any:  # fmt: skip
        headers = {"Authorization": f"Bearer {self.credential}"} if self.credential else {}
        data = raw if raw is not None else (None if json is None else msgspec.json.encode(json))
        if data is not None:
            headers["Content-Type"] = "application/json"
        url = f"{self.base}/admin/v1{path}"
        async with self.http.request(method, url, data=data, headers=headers, params=params) as r:
            text = await r.read()
            body = msgspec.json.decode(text) if text else None
            assert r.status == expect, (r.status, body)
            if r.status >= 400:
                assert r.content_type == "application/json"
        check(method, "/admin/v1" + path, expect, body)
        return body


def admin_of(proxy: Proxy, credential: str | None) -> contextlib.AbstractAsyncContextManager[Admin]:
    port = proxy.state.config.server.ops_port
    assert port is not None
    return admin_of_port(port, credential)


@contextlib.asynccontextmanager
async def admin_of_port(port: int, credential: str | None) -> AsyncIterator[Admin]:
    # unsafe: keep cookies for an IP address, as a browser does
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        yield Admin(http, f"http://127.0.0.1:{port}", credential)


async def start(make_proxy: MakeProxy, upstream_url: str, monkeypatch: Any) -> Proxy:
    return await make_proxy(admin_config(upstream_url, monkeypatch), auth=True)
