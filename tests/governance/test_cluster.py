"""Rate limits on a real Redis Cluster: three ``redis-server --cluster-enabled yes``
processes on free loopback ports, joined by ``redis-cli --cluster create``. The
limiter's case table (tests/governance/test_bucket.py) runs against bucket.lua on the cluster,
and a proxy configured with ``redis.cluster`` limits exactly as on one Redis.

The cluster is this module's own throwaway (never the shared Redis), started once for
the module and removed afterwards.
"""

from __future__ import annotations

import random
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import msgspec
import openai
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.base import ConfigError
from proxy.config.load import load
from proxy.governance.ratelimit.bucket import KeyState, check, check_all
from proxy.governance.ratelimit.shared import RedisBuckets, connect
from proxy.governance.ratelimit.ticket import team_scope
from tests.support.bucket_cases import CASES, TEAM_CASES, Step, TeamStep
from tests.support.env import REDIS_URL, free_port
from tests.support.inproc import MakeProxy
from tests.support.keys import declare, keyed, limiter

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
    reason="needs redis-server and redis-cli",
)
NODES = 3
READY_WITHIN = 30.0  # seconds, for starting and for joining the cluster


def wait_until(ready: Callable[[], object], what: str, timeout: float = READY_WITHIN) -> None:
    """Poll ``ready()`` until it is true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (redis.ConnectionError, redis.ResponseError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh three-node Redis Cluster (no replicas); yields a URL of one node."""
    folder = tmp_path_factory.mktemp("redis-cluster")
    ports = [free_port() for _ in range(NODES)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for port in ports:
            procs.append(start_node(folder, port))
        for port in ports:
            node = redis.Redis(host="127.0.0.1", port=port)
            wait_until(node.ping, f"redis-server on {port}")
            node.close()
        nodes = [f"127.0.0.1:{p}" for p in ports]
        done = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *nodes,
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=READY_WITHIN,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        for port in ports:
            node = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
            wait_until(lambda n=node: n.cluster("info")["cluster_state"] == "ok", "cluster ok")
            node.close()
        yield f"redis://127.0.0.1:{ports[0]}/0"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_node(folder: Path, port: int) -> subprocess.Popen[bytes]:
    # The cluster bus port is chosen too: port + 10000 (the default) may not be free,
    # or may not even exist.
    return subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
            *("--cluster-enabled", "yes", "--cluster-port", str(free_port())),
            *("--cluster-config-file", f"nodes-{port}.conf", "--dir", str(folder)),
            *("--save", "", "--appendonly", "no", "--logfile", f"redis-{port}.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@pytest.fixture
async def cluster_client(redis_cluster: str) -> AsyncIterator[RedisCluster]:
    """The proxy's own Redis client factory, in cluster mode (a generous timeout: the
    machine is small and busy)."""
    client = connect(cfg.Redis(url=redis_cluster, cluster=True, timeout=5.0))
    assert isinstance(client, RedisCluster)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.mark.parametrize("steps", list(CASES.values()), ids=list(CASES))
async def test_the_limit_table_holds_on_a_cluster(
    cluster_client: RedisCluster, steps: list[Step]
) -> None:
    buckets = RedisBuckets(cluster_client, f"cl-{secrets.token_hex(4)}", timeout=5.0)
    state = KeyState()
    key_id = f"case-{random.randrange(1 << 30)}"
    for i, (step, expected) in enumerate(steps):
        assert check(state, step) == expected, f"python, step {i}"
        assert await buckets.check(key_id, step) == expected, f"cluster, step {i}"


@pytest.mark.parametrize("steps", list(TEAM_CASES.values()), ids=list(TEAM_CASES))
async def test_a_key_and_its_team_are_checked_in_one_call_on_a_cluster(
    cluster_client: RedisCluster, steps: list[TeamStep]
) -> None:
    """One call reaches a key's keys and its team's: they share the team's slot."""
    buckets = RedisBuckets(cluster_client, f"cl-{secrets.token_hex(4)}", timeout=5.0)
    team = team_scope(f"t{random.randrange(1 << 30)}")
    named = {"t": team, "a": f"{team}:a", "b": f"{team}:b"}
    states: dict[str, KeyState] = {}
    for i, (scopes, expected) in enumerate(steps):
        python = check_all([states.setdefault(n, KeyState()) for n, _ in scopes],
                           [c for _, c in scopes])  # fmt: skip
        assert python == expected, f"python, step {i}"
        cluster = await buckets.check_all([(named[n], c) for n, c in scopes])
        assert cluster == expected, f"cluster, step {i}"


async def test_a_keys_buckets_share_a_slot_and_keys_spread_over_the_nodes(
    cluster_client: RedisCluster,
) -> None:
    prefix = f"cl-{secrets.token_hex(4)}"
    buckets = RedisBuckets(cluster_client, prefix, timeout=5.0)
    step = CASES["parallel slots: refused when all are taken, free again on release"][0][0]
    ids = [f"key-{i}" for i in range(24)]
    for key_id in ids:
        await buckets.check(key_id, step._replace(rpm=5, tpm=100, cost=1, slot=f"s-{key_id}"))
    homes: dict[str, str] = {}  # node name → a key id living there
    for key_id in ids:
        names = buckets.names(key_id)
        slots = {await cluster_client.cluster_keyslot(name) for name in names}
        assert len(slots) == 1, f"{key_id}'s keys span slots {slots}"
        node = cluster_client.get_node_from_key(names[0])
        assert node is not None
        homes[node.name] = key_id
        assert await cluster_client.exists(*names) == 3
    assert len(homes) > 1, "every key landed on one node: the test would prove nothing"
    # Live slots of keys on different nodes are renewed in one (cluster) pipeline.
    held = {f"s-{key_id}": key_id for key_id in homes.values()}
    await buckets.renew(held, 10**13, 60_000)
    for slot, key_id in held.items():
        assert await cluster_client.zscore(buckets.names(key_id)[2], slot) == 10**13


async def ask(client: openai.AsyncOpenAI) -> tuple[int, dict[str, str]]:
    """One request's HTTP status and headers, admitted or refused."""
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="m1", messages=[{"role": "user", "content": "hi"}]
        )
    except openai.RateLimitError as refused:
        return refused.status_code, dict(refused.response.headers)
    return raw.status_code, dict(raw.headers)


@pytest.mark.parametrize("backend", ["one redis", "cluster"])
async def test_a_proxy_on_a_cluster_limits_as_on_one_redis(
    backend: str,
    redis_cluster: str,
    redis_prefix: str,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
) -> None:
    """The same key limit, the same traffic, the same answers: 5 admitted, then 429s
    with the same headers; and the state is in the cluster, not in the process."""
    value, key = declare(rpm=5)
    url = redis_cluster if backend == "cluster" else REDIS_URL
    config = keyed(upstream.url, key, redis=url, prefix=redis_prefix)
    redis_config = msgspec.structs.replace(config.redis, cluster=backend == "cluster", timeout=5.0)
    proxy = await make_proxy(msgspec.structs.replace(config, redis=redis_config), auth=True)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=value, max_retries=0) as client:
        responses = [await ask(client) for _ in range(7)]
    remaining = [(status, h["x-ratelimit-remaining-requests"]) for status, h in responses]
    assert (
        remaining == [(200, "4"), (200, "3"), (200, "2"), (200, "1"), (200, "0")] + [(429, "0")] * 2
    )
    assert all(float(h["retry-after-ms"]) > 0 for _, h in responses[5:])
    assert limiter(proxy).backend == "redis"  # never fell back to in-process buckets
    if backend == "cluster":
        async with RedisCluster.from_url(redis_cluster) as client:
            names = [f"{redis_prefix}:{{{key.id}}}:rq"]
            assert await client.exists(*names) == 1


async def test_cluster_mode_needs_a_redis_url(tmp_path: Path) -> None:
    path = tmp_path / "proxy.yaml"
    path.write_text(
        "redis: {url: 'unix:///tmp/redis.sock', cluster: true}\n"
        "models: [{name: a, deployments: [{base_url: 'http://x'}]}]\n"
    )
    with pytest.raises(ConfigError, match=r"redis\.cluster"):
        load(path)
