"""The deploy files are what they claim: the Dockerfile, the compose stack and the
Kubernetes manifests are parsed and checked for the fields that matter, and the
configs they carry are run through ``check-config`` and served for real.

No Docker engine runs here, so images are never built; ``docker compose config`` and
``kubectl kustomize`` run only where those tools exist (otherwise the manifests are
assembled from kustomization.yaml in Python, the same way for what is checked).
"""

from __future__ import annotations

import math
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
import yaml

from bench.fake_upstream import FakeUpstream
from proxy.config import schema as cfg
from proxy.config.load import load
from tests.support.env import PYTHON, REDIS_URL, ROOT, free_port, proxy_env
from tests.support.inproc import MakeProxy, with_server
from tests.support.leaks import SECRETS

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE = DEPLOY / "compose.yaml"
Doc = dict[str, Any]


# --- helpers ------------------------------------------------------------------------


def env_names(node: object) -> Iterator[str]:
    """Every environment variable a raw config names (``*_env`` fields, any depth)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if isinstance(key, str) and key.endswith("_env") and isinstance(value, str):
                yield value
            else:
                yield from env_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from env_names(item)


def fake_env(text: str) -> dict[str, str]:
    """Plausible values for the variables a config names, so it can be loaded."""
    values = {}
    for name in env_names(yaml.safe_load(text)):
        if "DATABASE" in name or "PG" in name:
            values[name] = "postgresql://morngpt@127.0.0.1:5432/morngpt"
        elif "REDIS" in name:
            values[name] = "redis://127.0.0.1:6379/0"
        else:  # keys: random, so that no "weak key" check refuses them
            values[name] = "sk-" + secrets.token_urlsafe(32)
    return values


def check_config(text: str, tmp_path: Path, env: dict[str, str]) -> str:
    """Run ``python -m proxy check-config`` on ``text``; returns its output."""
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    done = subprocess.run(
        [PYTHON, "-m", "proxy", "check-config", str(path)],
        env={**proxy_env(), **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def kustomize_in_python(folder: Path) -> list[Doc]:
    """What ``kubectl kustomize`` yields for our kustomization, minus name hashes."""
    spec = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[Doc] = []
    for resource in spec["resources"]:
        docs.extend(d for d in yaml.safe_load_all((folder / resource).read_text()) if d)
    for generator in spec.get("configMapGenerator", []):
        data = {Path(f).name: (folder / f).read_text() for f in generator["files"]}
        meta = {"name": generator["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    return docs


def kubectl_kustomize(folder: Path) -> list[Doc] | None:
    if shutil.which("kubectl") is None:
        return None
    done = subprocess.run(
        ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def manifests() -> list[Doc]:
    """The objects ``kubectl apply -k deploy/k8s`` would send."""
    return kubectl_kustomize(K8S) or kustomize_in_python(K8S)


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(workload: Doc) -> Doc:
    [c] = workload["spec"]["template"]["spec"]["containers"]
    return c


def named_port(c: Doc, port: int | str) -> int:
    """A probe's or Service's port (a number or a container port name) as a number."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return int(number)


def mounted_config(workload: Doc, docs: list[Doc]) -> str:
    """The text of the config file the workload's container is started with."""
    c = container(workload)
    path = Path(c["args"][c["args"].index("--config") + 1])
    mount = next(m for m in c["volumeMounts"] if Path(m["mountPath"]) == path.parent)
    volume = next(
        v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    )
    config_map = one(docs, "ConfigMap", volume["configMap"]["name"])
    return str(config_map["data"][path.name])


def load_config(text: str, tmp_path: Path) -> cfg.Config:
    """``text`` loaded the way ``serve --config`` loads a file (env must be set)."""
    path = tmp_path / "loaded.yaml"
    path.write_text(text)
    return load(path)


@pytest.fixture
def k8s_config(manifests: list[Doc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> cfg.Config:
    """The config the Deployment's pods load, with placeholder secrets."""
    text = mounted_config(one(manifests, "Deployment"), manifests)
    for name, value in fake_env(text).items():
        monkeypatch.setenv(name, value)
    return load_config(text, tmp_path)


def seconds(value: str) -> float:
    """A compose duration (``40s``, ``1m30s``) in seconds."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


# --- Dockerfile ---------------------------------------------------------------------


def dockerfile() -> tuple[dict[str, str], list[list[tuple[str, str]]]]:
    """The Dockerfile as (global ARG defaults, stages of (INSTRUCTION, arguments)),
    comments dropped and continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    args: dict[str, str] = {}
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction, rest))
        elif instruction == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args, stages


def exec_form(args: str) -> list[str]:
    return list(yaml.safe_load(args)) if args.startswith("[") else shlex.split(args)


def test_dockerfile_is_multi_stage_on_a_slim_base() -> None:
    args, stages = dockerfile()
    assert len(stages) >= 2
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], stage[0][1].split()[0])
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base), base


def test_final_image_runs_the_proxy_as_a_non_root_user_and_drains_on_sigterm() -> None:
    final = dict(dockerfile()[1][-1])
    user = final["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert final["STOPSIGNAL"] == "SIGTERM"
    entrypoint = exec_form(final["ENTRYPOINT"]) + exec_form(final["CMD"])
    assert entrypoint[:4] == ["python", "-m", "proxy", "serve"]
    served_port = entrypoint[entrypoint.index("--port") + 1]
    assert final["EXPOSE"] == served_port
    healthcheck = final["HEALTHCHECK"]
    assert f"127.0.0.1:{served_port}/healthz" in healthcheck
    assert "CMD" in healthcheck


def test_final_image_holds_only_runtime_dependencies() -> None:
    *builders, final = dockerfile()[1]
    installs = [a for stage in builders for i, a in stage if i == "RUN" and "pip install" in a]
    assert installs, "the build stage installs the proxy"
    assert all("[dev]" not in a and "-e " not in a for a in installs)
    assert not any(i == "RUN" and "pip" in a for i, a in final), "nothing installed at run time"
    copied = [a for i, a in final if i == "COPY"]
    assert any(a.startswith("--from=") and "/opt/venv" in a for a in copied)
    sources = [a.split()[-2] for a in copied if not a.startswith("--from=")]
    assert sources == ["config/proxy.yaml"]  # the default config, nothing else


def test_default_image_config_is_accepted(tmp_path: Path) -> None:
    text = (ROOT / "config" / "proxy.yaml").read_text()
    assert check_config(text, tmp_path, fake_env(text)).startswith("ok:")


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "var", "tests"} <= ignored


# --- compose ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE.read_text())
    return doc


def test_compose_runs_two_proxies_after_migrations(compose: Doc) -> None:
    services = compose["services"]
    assert {"proxy", "migrate", "redis", "postgres", "prometheus", "grafana", "fake-upstream"} <= (
        services.keys()
    )
    proxy = services["proxy"]
    assert proxy["deploy"]["replicas"] == 2
    assert proxy["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert proxy["depends_on"]["redis"]["condition"] == "service_healthy"
    migrate = services["migrate"]
    assert migrate["command"][0] == "migrate"
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert migrate["restart"] == "no"
    assert migrate["image"] == proxy["image"] == services["fake-upstream"]["image"]


def test_compose_config_is_accepted_and_gives_streams_time_to_drain(
    compose: Doc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = compose["services"]["proxy"]
    [mount] = [v for v in proxy["volumes"] if v.split(":")[1] == "/etc/morngpt/proxy.yaml"]
    text = (DEPLOY / mount.split(":")[0]).read_text()
    environment = proxy["environment"]
    assert set(env_names(yaml.safe_load(text))) <= environment.keys()
    assert check_config(text, tmp_path, fake_env(text)).startswith("ok:")
    for name, value in fake_env(text).items():
        monkeypatch.setenv(name, value)
    config = load_config(text, tmp_path)
    # Drain, then the usage flush, both before Docker's SIGKILL.
    drain = config.server.grace_period + config.usage.shutdown_timeout
    assert seconds(proxy["stop_grace_period"]) > drain
    assert proxy["command"][proxy["command"].index("--config") + 1] == "/etc/morngpt/proxy.yaml"
    # The demo model is served by the fake upstream service of the stack.
    urls = [d["base_url"] for m in yaml.safe_load(text)["models"] for d in m["deployments"]]
    assert all(u.startswith("http://fake-upstream:9000/") for u in urls)


def compose_default(value: str) -> str:
    """The default of a compose ``${NAME:-default}`` value."""
    match = re.fullmatch(r"\$\{\w+:-(.+)\}", value)
    assert match, value
    return match[1]


async def test_the_compose_config_serves_the_demo_model_to_the_demo_key(
    compose: Doc,
    make_proxy: MakeProxy,
    upstream: FakeUpstream,
    migrated_pg: str,
    redis_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """compose/proxy.yaml as the stack runs it, with the stack's services swapped for
    loopback ones (the fake upstream, a test database, a test key prefix)."""
    environment = compose["services"]["proxy"]["environment"]
    demo_key = compose_default(environment["DEMO_API_KEY"])
    SECRETS.add(demo_key)
    monkeypatch.setenv("DEMO_API_KEY", demo_key)
    monkeypatch.setenv("DATABASE_URL", migrated_pg)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    config = load_config((DEPLOY / "compose" / "proxy.yaml").read_text(), tmp_path)
    models = [
        msgspec.structs.replace(
            m,
            deployments=[msgspec.structs.replace(d, base_url=upstream.url) for d in m.deployments],
        )
        for m in config.models
    ]
    redis = msgspec.structs.replace(config.redis, key_prefix=redis_prefix)
    proxy = await make_proxy(msgspec.structs.replace(config, models=models, redis=redis), auth=True)
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key=demo_key, max_retries=0) as client:
        reply = await client.chat.completions.create(
            model="demo-chat", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content
        embedding = await client.embeddings.create(model="demo-embed", input="hi")
        assert embedding.data
    async with openai.AsyncOpenAI(base_url=proxy.base, api_key="sk-wrong", max_retries=0) as other:
        with pytest.raises(openai.AuthenticationError):
            await other.models.list()


def test_compose_mounts_files_that_exist(compose: Doc) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source} does not exist"


def test_compose_prometheus_scrapes_every_replica_with_the_observability_rules(
    compose: Doc,
) -> None:
    volumes = dict(v.split(":")[:2] for v in compose["services"]["prometheus"]["volumes"])
    by_target = {target: source for source, target in volumes.items()}
    prometheus = yaml.safe_load((DEPLOY / by_target["/etc/prometheus/prometheus.yml"]).read_text())
    assert by_target["/etc/prometheus/rules/alerts.yml"] == "./prometheus/alerts.yml"
    assert prometheus["rule_files"] == ["/etc/prometheus/rules/alerts.yml"]
    [job] = prometheus["scrape_configs"]
    assert job["job_name"] == "morngpt-proxy"  # what the alert rules select on
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["proxy"]  # the service: every replica's address
    config = yaml.safe_load((DEPLOY / "compose" / "proxy.yaml").read_text())["server"]
    assert sd["port"] == config.get("ops_port", config["port"])


def test_compose_proxies_send_their_spans_to_the_stacks_jaeger(compose: Doc) -> None:
    services = compose["services"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert "127.0.0.1:16686:16686" in jaeger["ports"]  # the UI
    assert "jaeger" in services["proxy"]["depends_on"]
    tracing = yaml.safe_load((DEPLOY / "compose" / "proxy.yaml").read_text())["tracing"]
    assert tracing["endpoint"] == "http://jaeger:4318/v1/traces"  # OTLP/HTTP


def test_compose_logs_profile_ships_the_proxy_log_to_elasticsearch(compose: Doc) -> None:
    services = compose["services"]
    for name in ("elasticsearch", "vector", "kibana"):
        assert services[name]["profiles"] == ["logs"], name
    vector = services["vector"]
    [mount] = [v for v in vector["volumes"] if v.endswith(":/etc/vector/vector.yaml:ro")]
    pipeline = yaml.safe_load((DEPLOY / mount.split(":")[0]).read_text())
    [source] = pipeline["sources"].values()
    assert source["type"] == "docker_logs"
    assert source["include_labels"] == ["com.docker.compose.service=proxy"]  # the service
    [transform] = pipeline["transforms"].values()
    assert transform["inputs"] == list(pipeline["sources"])
    assert "parse_json(.message)" in transform["source"]
    [sink] = pipeline["sinks"].values()
    assert sink["type"] == "elasticsearch"
    assert sink["inputs"] == list(pipeline["transforms"])
    assert sink["endpoints"] == ["http://elasticsearch:9200"]
    assert "/var/run/docker.sock:/var/run/docker.sock:ro" in vector["volumes"]


def compose_command() -> list[str] | None:
    """``docker compose`` (the CLI plugin) or a standalone Compose v2 binary."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        version = subprocess.run([*command, "version"], capture_output=True, text=True, timeout=30)
        if version.returncode == 0 and "v2." in version.stdout:
            return command
    return None


def test_docker_compose_accepts_the_stack() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor a Compose v2 `docker-compose` is installed")
    done = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


# --- Kubernetes ---------------------------------------------------------------------


def test_every_manifest_parses_and_every_kind_is_there(manifests: list[Doc]) -> None:
    kinds = sorted(d["kind"] for d in manifests)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "Job",
            "PodDisruptionBudget",
            "Secret",
            "Service",
        ]
    )
    for doc in manifests:
        assert doc["apiVersion"]
        assert doc["metadata"]["name"]


def test_kustomize_renders_the_files_as_written() -> None:
    rendered = kubectl_kustomize(K8S)
    if rendered is None:
        pytest.skip("kubectl is not installed; the manifests were checked as files")

    def names(docs: list[Doc]) -> set[tuple[str, str]]:
        # The generated ConfigMap's name gains a content hash: compare its stem.
        return {(d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in docs}

    assert names(rendered) == names(kustomize_in_python(K8S))


def test_mounted_config_is_accepted_by_check_config(manifests: list[Doc], tmp_path: Path) -> None:
    for workload in (one(manifests, "Deployment"), one(manifests, "Job")):
        text = mounted_config(workload, manifests)
        assert check_config(text, tmp_path, fake_env(text)).startswith("ok:")


def test_every_variable_the_config_names_comes_from_the_secret(manifests: list[Doc]) -> None:
    secret = one(manifests, "Secret")
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for workload in (one(manifests, "Deployment"), one(manifests, "Job")):
        text = mounted_config(workload, manifests)
        env = {e["name"]: e for e in container(workload)["env"]}
        for name in env_names(yaml.safe_load(text)):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"]
            assert ref["key"] in keys


def test_probes_point_at_the_health_endpoints_on_the_served_port(
    manifests: list[Doc], k8s_config: cfg.Config
) -> None:
    deployment = one(manifests, "Deployment")
    c = container(deployment)
    config = k8s_config
    assert not {"--port", "--host"} & set(c["args"])  # the config decides
    assert config.server.host == "0.0.0.0"
    readiness, liveness = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert readiness["path"] == "/readyz"
    assert liveness["path"] == "/healthz"
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in (readiness, liveness, c["startupProbe"]["httpGet"]):
        assert named_port(c, probe["port"]) == config.server.port


def test_pods_outlive_their_streams_on_shutdown(
    manifests: list[Doc], k8s_config: cfg.Config
) -> None:
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    command = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    assert pause >= 5  # endpoints and load balancers need a moment to forget the pod
    # preStop counts against the termination grace period; then the drain, then the
    # usage flush, and a little room to exit.
    drain = k8s_config.server.grace_period + k8s_config.usage.shutdown_timeout
    assert pod["terminationGracePeriodSeconds"] >= pause + drain + 5
    rollout = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rollout["maxUnavailable"] == 0


def test_resources_match_the_worker_count(manifests: list[Doc], k8s_config: cfg.Config) -> None:
    resources = container(one(manifests, "Deployment"))["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert "memory" in resources["limits"]
    cpu = str(resources["requests"]["cpu"])
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    workers = k8s_config.server.workers
    assert workers >= 1, "0 (one per core) would count the node's cores"
    assert workers == max(1, math.floor(cores))
    job = container(one(manifests, "Job"))
    assert job["resources"]["requests"]
    assert job["image"] == container(one(manifests, "Deployment"))["image"]


def test_service_hpa_and_pdb_select_the_proxy_pods(
    manifests: list[Doc], k8s_config: cfg.Config
) -> None:
    deployment = one(manifests, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    def selects(selector: dict[str, str]) -> bool:
        return selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    service = one(manifests, "Service")
    assert selects(service["spec"]["selector"])
    c = container(deployment)
    [port] = service["spec"]["ports"]
    assert named_port(c, port["targetPort"]) == k8s_config.server.port
    pdb = one(manifests, "PodDisruptionBudget")
    assert selects(pdb["spec"]["selector"]["matchLabels"])
    hpa = one(manifests, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # The budget never blocks every eviction, and never allows all replicas down.
    assert pdb["spec"].get("maxUnavailable", 1) < hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_prometheus_scrapes_the_ops_port(manifests: list[Doc], k8s_config: cfg.Config) -> None:
    deployment = one(manifests, "Deployment")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    server = k8s_config.server
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == (server.ops_port or server.port)
    declared = {p["containerPort"] for p in container(deployment)["ports"]}
    assert int(annotations["prometheus.io/port"]) in declared


def test_pods_run_unprivileged(manifests: list[Doc]) -> None:
    for workload in (one(manifests, "Deployment"), one(manifests, "Job")):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        security = container(workload)["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]


async def test_the_k8s_config_serves_its_probes_and_metrics(
    manifests: list[Doc],
    make_proxy: MakeProxy,
    migrated_pg: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe and scrape paths of the manifests, asked of a proxy run from the
    ConfigMap's config with a real database and Redis (on loopback ports instead of
    8080/9090)."""
    deployment = one(manifests, "Deployment")
    c = container(deployment)
    text = mounted_config(deployment, manifests)
    for name, value in fake_env(text).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", migrated_pg)
    monkeypatch.setenv("REDIS_URL", REDIS_URL)
    config = load_config(text, tmp_path)
    assert config.server.ops_port is not None
    ops_port = free_port()
    proxy = await make_proxy(with_server(config, ops_port=ops_port), auth=True)
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    async with aiohttp.ClientSession() as http:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            async with http.get(proxy.url + c[probe]["httpGet"]["path"]) as resp:
                assert resp.status == 200, probe
        scrape = f"http://127.0.0.1:{ops_port}{annotations['prometheus.io/path']}"
        async with http.get(scrape) as resp:
            assert resp.status == 200
            assert "morngpt_" in await resp.text()
