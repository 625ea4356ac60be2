"""The admin API over real HTTP on the ops port: keys, usage, budgets, deployments, the
live overview, roles and sessions; every answer checked against the OpenAPI document."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from openapi_spec_validator import validate

from bench.fake_upstream import FakeUpstream
from proxy.admin.oidc import SESSION_COOKIE
from proxy.config import schema as cfg
from tests.support.admin import (
    DOC,
    MASTER,
    OPS,
    admin_config,
    admin_of,
    admin_of_port,
    check,
    start,
)
from tests.support.env import free_port
from tests.support.inproc import MakeProxy, Proxy
from tests.support.issuer import Issuer
from tests.support.leaks import SECRETS
from tests.support.served import serve
from tests.support.sso import log_in, oidc_settings
from tests.support.wait import until


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any) -> Proxy:
    return await start(make_proxy, upstream.url, monkeypatch)


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> cfg.Database | None:
    """A fresh PostgreSQL database, or (None) the proxy's own SQLite file."""
    if request.param == "postgres":
        return cfg.Database(url=request.getfixturevalue("migrated_pg"))
    return None


@pytest.fixture
async def either(
    backend: cfg.Database | None, make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any
) -> Proxy:
    """The proxy on each backend: the admin API's SQL runs on both."""
    config = admin_config(upstream.url, monkeypatch)
    if backend is not None:
        config = msgspec.structs.replace(config, database=backend)
    return await make_proxy(config, auth=True)


def test_the_openapi_document_is_valid() -> None:
    validate(DOC)


async def test_the_document_is_served(proxy: Proxy) -> None:
    async with admin_of(proxy, None) as admin:
        async with admin.http.get(f"{admin.base}/admin/v1/openapi.json") as r:
            assert r.status == 200
            assert await r.json() == DOC


async def _chat(proxy: Proxy, key: str) -> None:
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=key, max_retries=0) as client:
        await client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}]
        )


async def test_a_key_from_creation_to_revocation(either: Proxy) -> None:
    proxy = either
    async with admin_of(proxy, MASTER) as admin:
        created = await admin.call(
            "POST", "/keys", {"name": "app", "rpm": 100, "models": ["m1"], "budget": "5"},
            expect=201,
        )  # fmt: skip
        key = created["secret"]
        SECRETS.add(key)
        assert key.startswith("sk-morn-")
        assert created["prefix"] == key[:12]
        assert created["status"] == "active"
        assert float(created["spend"]["spent"]) == 0

        listed = await admin.call("GET", "/keys")
        assert [k["id"] for k in listed["data"]] == [created["id"]]
        assert "secret" not in listed["data"][0]  # shown once, at creation only

        await _chat(proxy, key)

        async def recorded() -> bool:
            usage = await admin.call("GET", "/usage", group_by="key")
            return any(row["group"] == created["id"] for row in usage["data"])

        await until(recorded)
        usage = await admin.call("GET", "/usage", group_by="key", key_id=created["id"])
        (row,) = usage["data"]
        assert row["requests"] == 1
        assert row["errors"] == 0
        assert row["prompt_tokens"] > 0
        assert float(row["cost"]) > 0
        daily = await admin.call("GET", "/usage", group_by="model", granularity="day")
        assert daily["data"][0]["period_start"] % 86400 == 0

        overview = await admin.call("GET", "/overview")
        assert overview["requests"] >= 1
        assert sum(overview["duration"]["counts"]) >= 1
        assert float(overview["spend_today"]) > 0

        shown = await admin.call("GET", f"/keys/{created['id']}")
        assert float(shown["spend"]["spent"]) == float(row["cost"])
        budgets = await admin.call("GET", "/budgets")
        assert [b["key_id"] for b in budgets["data"]] == [created["id"]]

        changed = await admin.call(
            "PATCH", f"/keys/{created['id']}", {"rpm": None, "tpm": 5000, "models": []}
        )
        assert changed["rpm"] is None
        assert changed["tpm"] == 5000
        assert changed["models"] == []

        revoked = await admin.call("DELETE", f"/keys/{created['id']}")
        assert revoked["status"] == "revoked"

    async def refused() -> bool:
        try:
            await _chat(proxy, key)
        except openai.AuthenticationError:
            return True
        return False

    await until(refused)


async def test_roles(proxy: Proxy) -> None:
    async with admin_of(proxy, MASTER) as admin:
        mine = await admin.call("POST", "/keys", {"name": "mine"}, expect=201)
        other = await admin.call("POST", "/keys", {"name": "other"}, expect=201)
        watcher = await admin.call("POST", "/keys", {"name": "w", "role": "viewer"}, expect=201)
        SECRETS.update((mine["secret"], other["secret"], watcher["secret"]))
        deployments = await admin.call("GET", "/deployments")
        assert "base_url" in deployments["models"][0]["deployments"][0]
        assert (await admin.call("GET", "/me"))["role"] == "admin"

    async with admin_of(proxy, OPS) as ops:
        assert (await ops.call("GET", "/me"))["source"] == "ops_token"

    async with admin_of(proxy, watcher["secret"]) as viewer:
        assert (await viewer.call("GET", "/me"))["role"] == "viewer"
        assert len((await viewer.call("GET", "/keys"))["data"]) == 3
        await viewer.call("GET", "/overview")
        seen = await viewer.call("GET", "/deployments")
        assert "base_url" not in seen["models"][0]["deployments"][0]
        refusal = await viewer.call("POST", "/keys", {"name": "x"}, expect=403)
        assert refusal["error"]["code"] == "insufficient_role"
        await viewer.call("DELETE", f"/keys/{mine['id']}", expect=403)
        await viewer.call("POST", "/teams", {"name": "t"}, expect=403)

    async with admin_of(proxy, mine["secret"]) as member:
        me = await member.call("GET", "/me")
        assert me["role"] == "member"
        assert me["key_id"] == mine["id"]
        assert [k["id"] for k in (await member.call("GET", "/keys"))["data"]] == [mine["id"]]
        await member.call("GET", f"/keys/{mine['id']}")
        await member.call("GET", f"/keys/{other['id']}", expect=404)
        await member.call("GET", "/deployments", expect=403)
        await member.call("GET", "/overview", expect=403)
        await member.call("PATCH", f"/keys/{mine['id']}", {"rpm": 1}, expect=403)
        usage = await member.call("GET", "/usage", group_by="key", key_id=other["id"])
        assert all(row["group"] == mine["id"] for row in usage["data"])

    for credential in (None, "sk-morn-" + "x" * 43, "wrong"):
        async with admin_of(proxy, credential) as nobody:
            body = await nobody.call("GET", "/keys", expect=401)
            assert body["error"]["type"] == "invalid_request_error"


async def test_teams(either: Proxy) -> None:
    proxy = either
    async with admin_of(proxy, MASTER) as admin:
        team = await admin.call(
            "POST", "/teams", {"name": "research", "id": "research", "budget": "100", "rpm": 50},
            expect=201,
        )  # fmt: skip
        assert team["spend"]["spent"] in ("0", "0.00")
        await admin.call("POST", "/teams", {"name": "research"}, expect=400)
        await admin.call("POST", "/teams", {"name": "x", "id": "no spaces"}, expect=400)
        member = await admin.call("POST", "/keys", {"name": "r1", "team_id": "research"}, 201)
        SECRETS.add(member["secret"])
        assert member["team_id"] == "research"
        await admin.call("POST", "/keys", {"name": "x", "team_id": "nope"}, expect=400)
        loner = await admin.call("POST", "/keys", {"name": "loner"}, expect=201)
        SECRETS.add(loner["secret"])

        await _chat(proxy, member["secret"])

        async def recorded() -> bool:
            usage = await admin.call("GET", "/usage", group_by="team", team_id="research")
            return [(r["group"], r["requests"]) for r in usage["data"]] == [("research", 1)]

        await until(recorded)
        listed = await admin.call("GET", "/keys", team_id="research")
        assert [k["id"] for k in listed["data"]] == [member["id"]]
        changed = await admin.call("PATCH", "/teams/research", {"rpm": None, "tpm": 10})
        assert changed["rpm"] is None
        assert changed["tpm"] == 10
        moved = await admin.call("PATCH", f"/keys/{loner['id']}", {"team_id": "research"})
        assert moved["team_id"] == "research"
        refusal = await admin.call("DELETE", "/teams/research", expect=400)
        assert refusal["error"]["code"] == "team_in_use"

    async with admin_of(proxy, member["secret"]) as mine:
        teams = await mine.call("GET", "/teams")
        assert [t["id"] for t in teams["data"]] == ["research"]
        await mine.call("GET", "/teams/research")
        await mine.call("PATCH", "/teams/research", {"rpm": 1}, expect=403)

    async with admin_of(proxy, MASTER) as admin:
        empty = await admin.call("POST", "/teams", {"name": "empty"}, expect=201)
        await admin.call("DELETE", f"/teams/{empty['id']}", expect=204)
        await admin.call("GET", f"/teams/{empty['id']}", expect=404)


async def test_sessions(proxy: Proxy) -> None:
    async with admin_of(proxy, MASTER) as admin:
        key = await admin.call("POST", "/keys", {"name": "member"}, expect=201)
        SECRETS.add(key["secret"])
    async with admin_of(proxy, None) as browser:
        await browser.call("POST", "/session", {"credential": "nope"}, expect=401)
        me = await browser.call("POST", "/session", {"credential": key["secret"]})
        assert me["role"] == "member"
        url = f"{browser.base}/admin/v1/session"
        async with aiohttp.request("POST", url, json={"credential": key["secret"]}) as r:
            set_cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in set_cookie
        assert "SameSite=Strict" in set_cookie
        assert key["secret"] not in set_cookie  # a signed statement, not the key
        assert (await browser.call("GET", "/me"))["key_id"] == key["id"]

        async with admin_of(proxy, MASTER) as admin:
            await admin.call("DELETE", f"/keys/{key['id']}")
        await browser.call("GET", "/me", expect=401)  # the key's session ended with it

        await browser.call("POST", "/session", {"credential": MASTER})
        assert (await browser.call("GET", "/me"))["role"] == "admin"
        browser.http.cookie_jar.update_cookies(
            {"morngpt_console": "e30.AAAA"}, aiohttp.client.URL(browser.base)
        )
        await browser.call("GET", "/me", expect=401)  # forged
        await browser.call("DELETE", "/session", expect=204)


@pytest.mark.parametrize(
    ("method", "path", "body", "params"),
    [
        ("POST", "/keys", b"{not json", {}),
        ("POST", "/keys", b'{"name": "a", "colour": "red"}', {}),
        ("POST", "/keys", b'{"name": ""}', {}),
        ("POST", "/keys", b'{"name": "a", "rpm": -1}', {}),
        ("POST", "/keys", b'{"name": "a", "budget": "1", "budget_tz": "Mars/Base"}', {}),
        ("POST", "/keys", b'{"name": "a", "budget_period": "hourly"}', {}),
        ("PATCH", "/keys/key_x", b"{}", {}),
        ("GET", "/usage", None, {"group_by": "colour"}),
        ("GET", "/usage", None, {"start": "nan"}),
        ("GET", "/usage", None, {"start": "10", "end": "5"}),
        ("GET", "/usage", None, {"model": "a\x00b"}),
        ("GET", "/usage", None, {"key_id": "k" * 300}),
        ("GET", "/keys", None, {"limit": "0"}),
        ("GET", "/keys", None, {"offset": "x"}),
    ],
)
async def test_bad_input_is_a_400(
    proxy: Proxy, method: str, path: str, body: bytes | None, params: dict[str, str]
) -> None:
    async with admin_of(proxy, MASTER) as admin:
        answer = await admin.call(method, path, raw=body, expect=400, **params)
        assert answer["error"]["type"] == "invalid_request_error"


async def test_unknown_things_are_404s(proxy: Proxy) -> None:
    async with admin_of(proxy, MASTER) as admin:
        await admin.call("GET", "/keys/key_nope", expect=404)
        await admin.call("PATCH", "/keys/key_nope", {"rpm": 5}, expect=404)
        await admin.call("DELETE", "/keys/key_nope", expect=404)
        for odd in ("%00", "a%20b", "x" * 200, "%C3%A9"):
            await admin.call("GET", f"/keys/{odd}", expect=404)
            await admin.call("PATCH", f"/teams/{odd}", {"rpm": 1}, expect=404)
        async with admin.http.get(f"{admin.base}/admin/v1/nowhere") as r:
            assert r.status == 404
            assert (await r.json())["error"]["code"] == "not_found"


async def test_pages(proxy: Proxy) -> None:
    async with admin_of(proxy, MASTER) as admin:
        for i in range(5):
            made = await admin.call("POST", "/keys", {"name": f"k{i}"}, expect=201)
            SECRETS.add(made["secret"])
        seen, offset = [], 0
        while True:
            page = await admin.call("GET", "/keys", limit=2, offset=offset)
            seen += [k["name"] for k in page["data"]]
            if not page["has_more"]:
                assert page["next_offset"] is None
                break
            offset = page["next_offset"]
        assert seen == [f"k{i}" for i in range(5)]


async def test_the_overview_counts_what_the_proxy_served(proxy: Proxy) -> None:
    async with admin_of(proxy, OPS) as viewer:
        before = await viewer.call("GET", "/overview")
        async with admin_of(proxy, MASTER) as admin:
            made = await admin.call("POST", "/keys", {"name": "live"}, expect=201)
            SECRETS.add(made["secret"])
        for _ in range(3):
            await _chat(proxy, made["secret"])
        after = await viewer.call("GET", "/overview")
        assert after["requests"] - before["requests"] == 3
        assert after["errors"] == before["errors"]
        assert after["completion_tokens"] > before["completion_tokens"]
        assert after["at"] >= before["at"]
        assert after["at"] <= time.time()


async def test_the_overview_sums_every_worker(
    upstream: FakeUpstream, tmp_path: Path, monkeypatch: Any
) -> None:
    """``serve --workers 2``: the overview counts what both workers served."""
    monkeypatch.setenv("MORNGPT_TEST_OPS", OPS)
    ops = free_port()
    config = tmp_path / "proxy.json"
    config.write_bytes(
        msgspec.json.encode(
            {
                "models": [{"name": "*", "deployments": [{"base_url": upstream.url}]}],
                "server": {"workers": 2, "ops_port": ops, "ops_token_env": "MORNGPT_TEST_OPS"},
                "database": {"sqlite_path": str(tmp_path / "proxy.db")},
                "usage": {"spool_dir": str(tmp_path / "spool"), "flush_interval": 0.05},
            }
        )
    )
    async with serve("--config", str(config)) as served:
        await served.wait_log("ops endpoints on", count=2)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        # A new connection each time: the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(40):
                url = f"{served.url}/v1/chat/completions"
                async with http.post(url, json=body) as r:
                    assert r.status == 200
            headers = {"Authorization": f"Bearer {OPS}"}
            busy: list[str] = []

            async def both_busy() -> bool:
                # A worker folds what it served into the metrics FOLD_SECONDS later.
                async with http.get(f"http://127.0.0.1:{ops}/metrics", headers=headers) as r:
                    scraped = await r.text()
                busy[:] = [
                    line for line in scraped.splitlines()
                    if line.startswith("morngpt_worker_requests{") and not line.endswith(" 0.0")
                ]  # fmt: skip
                return len(busy) == 2

            await until(both_busy)  # both workers served some
        async with admin_of_port(ops, OPS) as admin:

            async def all_counted() -> bool:
                overview = await admin.call("GET", "/overview")
                return bool(overview["requests"] == 40)

            await until(all_counted)
            overview = await admin.call("GET", "/overview")
            assert overview["requests"] == 40
            assert sum(overview["duration"]["counts"]) == 40

            async def ledgered() -> bool:
                usage = await admin.call("GET", "/usage")
                return sum(row["requests"] for row in usage["data"]) == 40

            await until(ledgered)


@pytest.mark.parametrize("fault", ["refused", "hung"])
async def test_a_database_that_is_down_or_hung_is_a_503_and_the_overview_stands(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any, fault: str
) -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # accepts, never answers

    hung = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = hung.sockets[0].getsockname()[1] if fault == "hung" else free_port()
    try:
        config = admin_config(upstream.url, monkeypatch)
        down = cfg.Database(url=f"postgresql://postgres@127.0.0.1:{port}/x", timeout=0.5)
        proxy = await make_proxy(msgspec.structs.replace(config, database=down), auth=True)
        async with admin_of(proxy, MASTER) as admin:
            for path in ("/keys", "/usage", "/teams"):
                started = time.monotonic()
                refusal = await admin.call("GET", path, expect=503)
                assert refusal["error"]["code"] == "service_unavailable"
                assert time.monotonic() - started < 5  # bounded, never a hang
            overview = await admin.call("GET", "/overview")
            assert overview["spend_today"] is None
    finally:
        for writer in held:
            writer.close()
        hung.close()
        await hung.wait_closed()


async def test_single_sign_on_sessions(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: Any, issuer: Issuer
) -> None:
    """With ``oidc`` configured, the console's login (oidc.py) is mounted on the ops
    listener and its session is a principal of the admin API, with its claims' role."""
    config = admin_config(upstream.url, monkeypatch)
    ops = config.server.ops_port
    oidc = oidc_settings(issuer.url, f"http://127.0.0.1:{ops}/console/callback")
    await make_proxy(msgspec.structs.replace(config, oidc=oidc), auth=True)
    signed_in = SimpleNamespace(url=f"http://127.0.0.1:{ops}", issuer=issuer)
    async with admin_of_port(ops or 0, None) as browser:
        options = await browser.call("GET", "/session")
        assert options["oidc"] is True
        issuer.user = {"sub": "vera", "roles": ["proxy-viewers"]}
        answer, cookies = await log_in(browser.http, signed_in, "/console/keys")
        assert answer.status == 302
        assert answer.headers["Location"] == "/console/keys"
        session = {"Cookie": f"{SESSION_COOKIE}={cookies[SESSION_COOKIE].value}"}
        async with browser.http.get(f"{browser.base}/admin/v1/me", headers=session) as r:
            me = await r.json()
        check("GET", "/admin/v1/me", r.status, me)
        assert (me["role"], me["source"], me["user_id"]) == ("viewer", "session", "vera")
        async with browser.http.post(
            f"{browser.base}/admin/v1/keys", headers=session, json={"name": "x"}
        ) as r:
            assert r.status == 403
        async with browser.http.get(f"{browser.base}/admin/v1/keys", headers=session) as r:
            assert r.status == 200


async def test_hostile_bodies_are_refused_in_shape(proxy: Proxy) -> None:
    async with admin_of(proxy, MASTER) as admin:
        url = f"{admin.base}/admin/v1/keys"
        headers = {"Authorization": f"Bearer {MASTER}", "Content-Type": "application/json"}
        large = proxy.state.config.server.max_body_bytes + 1
        bodies = {b'{"name": "' + b"x" * large + b'"}': 413, b"\xff\xfe": 400, b"[]": 400}
        for body, status in bodies.items():
            async with admin.http.post(url, data=io.BytesIO(body), headers=headers) as r:
                answer = await r.json()
                assert r.status == status, answer
                assert set(answer["error"]) == {"message", "type", "param", "code"}
