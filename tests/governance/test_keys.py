"""API keys: format and hashing, the store on SQLite and PostgreSQL, the ``keys``
command line, and authentication through the proxy with the official SDK."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import openai
import orjson
import pytest

from bench.fake_upstream import FakeUpstream
from proxy.cli import main
from proxy.config import schema as cfg
from proxy.config.load import resolve
from proxy.config.upstreams import Deployment, Model
from proxy.db import Db
from proxy.errors import ServiceUnavailable
from proxy.governance.keys import secret
from proxy.governance.keys.lookup import KeyCache
from proxy.governance.keys.store import KeyStore
from proxy.state import STATE
from tests.support.env import PYTHON, free_port, proxy_env
from tests.support.inproc import MakeProxy, Proxy
from tests.support.keys import config_file_for, declare, issue, keyed
from tests.support.leaks import SECRETS

MESSAGES = [{"role": "user", "content": "hi"}]


def sdk(proxy: Proxy, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.base, api_key=key, max_retries=0)


async def chat(proxy: Proxy, key: str, model: str = "m1") -> str | None:
    async with sdk(proxy, key) as client:
        reply = await client.chat.completions.create(model=model, messages=MESSAGES)
    return reply.choices[0].message.content


# --- Format and hashing --------------------------------------------------------------


def test_keys_are_random_prefixed_and_stored_only_as_a_hash() -> None:
    keys = {secret.generate() for _ in range(1000)}
    assert len(keys) == 1000
    for key in list(keys)[:10]:
        assert key.startswith("sk-morn-")
        assert secret.looks_issued(key)
        assert len(key) - len("sk-morn-") == 43  # 256 random bits, URL-safe base64
        assert secret.digest(key) == hashlib.sha256(key.encode()).hexdigest()
        assert secret.display_prefix(key) == key[:12]
    assert not secret.looks_issued("sk-morn-short")


# --- The store, on both backends -----------------------------------------------------


@pytest.fixture
async def store(database: cfg.Database) -> AsyncIterator[KeyStore]:
    db = await Db.open(database)
    try:
        yield KeyStore(db)
    finally:
        await db.close()


async def test_store_creates_finds_updates_and_revokes(store: KeyStore) -> None:
    key, value = await store.create(
        "app1",
        rpm=600,
        tpm=100_000,
        max_parallel=4,
        models=["a", "b"],
        expires_at=2_000_000_000.5,
        metadata={"team": "search", "n": 1},
    )
    SECRETS.add(value)
    found = await store.find(secret.digest(value))
    assert found is not None
    assert found.created_at == pytest.approx(key.created_at, abs=0.001)  # PostgreSQL: µs
    assert msgspec.structs.replace(found, created_at=key.created_at) == key
    assert (found.rpm, found.tpm, found.max_parallel) == (600, 100_000, 4)
    assert found.models == frozenset(("a", "b"))
    assert found.expires_at == pytest.approx(2_000_000_000.5, abs=0.001)
    assert found.metadata == {"team": "search", "n": 1}
    assert await store.find(secret.digest(secret.generate())) is None
    assert value not in repr(await store.all_keys())
    updated = await store.update(key.id, {"rpm": None, "models": [], "name": "renamed"})
    assert updated is not None
    assert (updated.rpm, updated.tpm, updated.models, updated.name) == (
        None,
        100_000,
        frozenset(),
        "renamed",
    )
    assert await store.update("key_missing", {"rpm": 1}) is None
    assert await store.revoke(key.id)
    assert not await store.revoke("key_missing")
    revoked = await store.find(secret.digest(value))
    assert revoked is not None
    assert revoked.revoked


# --- The command line -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_keys_command_line(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest
) -> None:
    if backend == "postgres":
        database = f"{{url: '{request.getfixturevalue('migrated_pg')}'}}"
    else:
        database = f"{{sqlite_path: '{tmp_path / 'k.db'}'}}"
    conf = ["--config", config_file_for(tmp_path, database)]

    assert main(["keys", "create", "--name", "app1", "--rpm", "600", "--tpm", "100000",
                 "--models", "a", "b,c", "--meta", "team=search", *conf]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    value = out.strip()
    SECRETS.add(value)
    assert secret.looks_issued(value)
    key_id = err.split()[1]
    assert key_id.startswith("key_")
    assert "only this once" in err

    assert main(["keys", "list", *conf]) == 0
    listing = capsys.readouterr().out
    assert value not in listing
    assert key_id in listing
    assert value[:12] in listing
    assert "600" in listing
    assert "a,b,c" in listing
    assert "active" in listing

    assert main(["keys", "update", key_id, "--rpm", "0", "--max-parallel", "3", *conf]) == 0
    capsys.readouterr()
    assert main(["keys", "list", "--json", *conf]) == 0
    [row] = orjson.loads(capsys.readouterr().out)
    assert (row["rpm"], row["tpm"], row["max_parallel"]) == (None, 100_000, 3)
    assert sorted(row["models"]) == ["a", "b", "c"]
    assert row["metadata"] == {"team": "search"}
    assert value not in str(row)

    assert main(["keys", "revoke", key_id, *conf]) == 0
    assert main(["keys", "list", *conf]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "revoke", "key_nope", *conf]) == 1
    assert "no key key_nope" in capsys.readouterr().err


async def test_a_key_made_by_the_command_line_works_at_once(
    make_proxy: MakeProxy, upstream: FakeUpstream, tmp_path: Path
) -> None:
    proxy = await make_proxy(keyed(upstream.url), auth=True)
    path = proxy.state.config.database.sqlite_path  # the proxy's own embedded database
    config_file = config_file_for(tmp_path, f"{{sqlite_path: '{path}'}}")
    process = await asyncio.create_subprocess_exec(
        *(PYTHON, "-m", "proxy", "keys", "create", "--name", "cli", "--config", config_file),
        stdout=asyncio.subprocess.PIPE,
        env=proxy_env(),
    )
    out, _ = await process.communicate()
    assert process.returncode == 0
    value = out.decode().strip()
    SECRETS.add(value)
    assert await chat(proxy, value)


# --- Authentication through the proxy -------------------------------------------------


@pytest.fixture
async def keyed_proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    auth = cfg.Auth(cache_ttl=0.2, negative_ttl=0.2, cache_size=5)
    return await make_proxy(keyed(upstream.url, auth=auth), auth=True)


async def test_missing_or_wrong_keys_are_openai_401s(
    keyed_proxy: Proxy, upstream: FakeUpstream
) -> None:
    wrong = secret.generate()
    SECRETS.add(wrong)
    for key in (wrong, "sk-not-ours-at-all", wrong[:-1]):
        with pytest.raises(openai.AuthenticationError) as caught:
            await chat(keyed_proxy, key, model="no-such-model")  # 401 before the 404
        assert caught.value.code == "invalid_api_key"
        assert caught.value.status_code == 401
        assert key not in caught.value.message
        assert key[8:20] not in caught.value.message
    async with aiohttp.ClientSession() as http:
        async with http.post(keyed_proxy.base + "/chat/completions", json={"model": "m1"}) as r:
            assert r.status == 401
            error = (await r.json())["error"]
        async with http.get(keyed_proxy.base + "/models") as r:
            assert r.status == 401
    assert error["type"] == "invalid_request_error"
    assert "didn't provide an API key" in error["message"]
    assert upstream.received == []


async def test_a_bad_key_is_refused_before_its_body_is_read(keyed_proxy: Proxy) -> None:
    # The body never comes: a 401 at once (not after server.body_timeout) shows the key
    # was checked on the headers alone.
    host, port = keyed_proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer sk-not-a-key\r\nContent-Length: 1000000\r\n\r\n{"
    )
    async with asyncio.timeout(5):
        status = await reader.readline()
    writer.close()
    assert status.startswith(b"HTTP/1.1 401")


async def test_a_key_works_as_bearer_and_as_azure_api_key(
    keyed_proxy: Proxy, upstream: FakeUpstream
) -> None:
    value, key_id = await issue(keyed_proxy)
    assert await chat(keyed_proxy, value)
    async with aiohttp.ClientSession() as http:
        async with http.post(
            keyed_proxy.base + "/chat/completions",
            json={"model": "m1", "messages": MESSAGES},
            headers={"api-key": value},
        ) as resp:
            assert resp.status == 200
    assert [ex.key_id for ex in keyed_proxy.recorder.exchanges] == [key_id, key_id]
    for received in upstream.received:  # the client's key never travels upstream
        assert value not in str(dict(received.headers)) + received.body.decode()


async def test_model_permissions_403_and_filtered_model_list(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    deployment = Deployment(base_url=upstream.url)
    models = [Model(name=n, deployments=[deployment]) for n in ("a", "b", "c")]
    value, key = declare(models=["a", "c"])
    config = resolve(cfg.Config(models=models, keys=[key]))
    proxy = await make_proxy(config, auth=True)
    assert await chat(proxy, value, model="a")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await chat(proxy, value, model="b")
    assert caught.value.status_code == 403
    assert proxy.recorder.exchanges[-1].key_id == key.id  # refusals are attributed too
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    async with sdk(proxy, value) as client:
        listed = await client.models.list()
    assert [m.id for m in listed.data] == ["a", "c"]
    assert len(upstream.received) == 1


async def test_revoked_key_stops_working_within_the_cache_ttl(keyed_proxy: Proxy) -> None:
    value, key_id = await issue(keyed_proxy)
    assert await chat(keyed_proxy, value)
    store = KeyStore(keyed_proxy.runner.app[STATE].db)
    assert await store.revoke(key_id)
    revoked = time.monotonic()
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        while True:  # cached for up to cache_ttl (0.2 s), then refused
            await chat(keyed_proxy, value)
            assert time.monotonic() - revoked < 5, "still accepted long after cache_ttl"


async def test_expired_key_is_refused(keyed_proxy: Proxy) -> None:
    value, _ = await issue(keyed_proxy, expires_at=time.time() - 1)
    with pytest.raises(openai.AuthenticationError, match="expired"):
        await chat(keyed_proxy, value)


async def test_floods_of_bad_keys_cannot_grow_the_cache(keyed_proxy: Proxy) -> None:
    value, _ = await issue(keyed_proxy)
    assert await chat(keyed_proxy, value)
    for _ in range(20):
        with pytest.raises(openai.AuthenticationError):
            await chat(keyed_proxy, secret.generate())
    cache = keyed_proxy.state.gate.lookup.cache  # type: ignore[attr-defined]
    assert len(cache.unknown) == 5  # auth.cache_size
    assert len(cache.known) == 1


async def test_store_outage_keeps_cached_keys_and_refuses_unknown_ones_with_503(
    tmp_path: Path,
) -> None:
    db = await Db.open(cfg.Database(sqlite_path=str(tmp_path / "k.db")))
    store = KeyStore(db)
    key, value = await store.create("app")
    SECRETS.add(value)
    cache = KeyCache(store, cfg.Auth(cache_ttl=0.01), timeout=1.0)
    assert await cache.find(secret.digest(value)) == key
    await db.close()  # the store is gone from here on
    await asyncio.sleep(0.02)  # let the entry go stale (past cache_ttl)
    assert await cache.find(secret.digest(value)) == key
    with pytest.raises(ServiceUnavailable):
        await cache.find(secret.digest(secret.generate()))


async def test_declared_key_from_the_environment_and_the_master_key(
    make_proxy: MakeProxy, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from_env, master = secret.generate(), secret.generate()
    SECRETS.update((from_env, master))
    monkeypatch.setenv("MORNGPT_TEST_APP_KEY", from_env)
    monkeypatch.setenv("MORNGPT_TEST_MASTER", master)
    config = keyed(
        upstream.url,
        cfg.DeclaredKey(id="app", key_env="MORNGPT_TEST_APP_KEY", rpm=100),
        auth=cfg.Auth(master_key_env="MORNGPT_TEST_MASTER"),
    )
    assert resolve(config) == config  # resolving again (CLI overrides) changes nothing
    assert from_env not in repr(config)
    assert master not in repr(config)
    proxy = await make_proxy(config, auth=True)
    assert await chat(proxy, from_env)
    async with sdk(proxy, master) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="anything", messages=MESSAGES
        )
    assert "x-ratelimit-limit-requests" not in raw.headers  # the master key has no limits
    assert [ex.key_id for ex in proxy.recorder.exchanges] == ["app", "master"]


@pytest.mark.parametrize(
    ("yaml", "env", "expected"),
    [
        ("auth: {enabled: false}", {}, "pass --no-auth"),
        ("auth: {master_key_env: M}", {"M": "short-master-key"}, "too weak"),
        ("auth: {master_key_env: M}", {"M": "ab" * 20}, "too weak"),
        ("keys: [{id: a}]", {}, "exactly one of sha256 and key_env"),
        ("keys: [{id: a, sha256: nothex}]", {}, "64 hex digits"),
        ("keys: [{id: 'a b', sha256: x}]", {}, "keys[0].id"),
    ],
)
def test_serve_refuses_unsafe_auth_settings_with_one_line(
    yaml: str,
    env: dict[str, str],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "proxy.yaml"
    path.write_text(f"{yaml}\nmodels: [{{name: a, deployments: [{{base_url: 'http://x'}}]}}]\n")
    assert main(["serve", "--config", str(path), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert expected in err
    assert err.count("\n") == 1
    for value in env.values():
        assert value not in err
