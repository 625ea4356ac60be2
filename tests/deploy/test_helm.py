"""The Helm chart (deploy/helm/morngpt-proxy): it lints clean, deploy/k8s is exactly its
default rendering (one source of truth), every object it renders fits the Kubernetes
API schemas (kubernetes-validate: kubeconform's job, from PyPI), and each value does
what values.yaml says. What the rendered manifests mean (probes, shutdown timeline,
secrets, the config) is checked on deploy/k8s by tests/deploy/test_deploy.py.

Rendering is Helm's own Go SDK (helm-python-sdk), run as ``scripts/chart.py`` in a
subprocess so that the Go runtime stays out of the test process.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.support.env import PYTHON, ROOT

CHART_PY = ROOT / "scripts" / "chart.py"
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the chart allows (Chart.yaml kubeVersion) and the newest the
# schemas know.
KUBE_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())
Doc = dict[str, Any]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("helm_python") is None,
    reason="helm-python-sdk is installed on x86-64 Linux only (the [dev] extra)",
)


def chart(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, str(CHART_PY), *args], capture_output=True, text=True, timeout=120
    )


def template(tmp_path: Path, values: Doc | None = None, name: str = "morngpt-proxy") -> list[Doc]:
    """``helm template`` with ``values`` on top of the defaults."""
    args = ["template", "--name", name]
    if values is not None:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["-f", str(path)]
    done = chart(*args)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def kinds(docs: list[Doc]) -> dict[str, Doc]:
    found = {d["kind"]: d for d in docs}
    assert len(found) == len(docs), "one object of each kind"
    return found


def container(workload: Doc) -> Doc:
    [c] = workload["spec"]["template"]["spec"]["containers"]
    return c


def test_the_chart_lints_clean() -> None:
    done = chart("lint")
    assert done.returncode == 0, done.stdout + done.stderr


def test_deploy_k8s_is_the_chart_rendered_with_its_defaults() -> None:
    done = chart("k8s", "--check")
    assert done.returncode == 0, done.stdout + done.stderr
    generated = {p.name for p in K8S.iterdir()} - {"kustomization.yaml"}
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert generated == {*resources, "proxy.yaml"}, "every rendered file is applied"


def test_the_check_sees_a_hand_edit(tmp_path: Path) -> None:
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    service = copy / "service.yaml"
    service.write_text(service.read_text().replace("port: 80", "port: 81"))
    done = chart("k8s", "--check", "--dir", str(copy))
    assert done.returncode == 1
    assert "['service.yaml']" in done.stdout
    assert chart("k8s", "--dir", str(copy)).returncode == 0  # re-rendered
    assert chart("k8s", "--check", "--dir", str(copy)).returncode == 0


def kustomized() -> list[Doc]:
    """deploy/k8s as kubectl applies it (kustomize), where kubectl is installed."""
    if shutil.which("kubectl") is None:
        return []
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


VARIANT: Doc = {
    "image": {"repository": "registry.example.com/morngpt-proxy", "tag": "9.9.9"},
    "replicaCount": 5,
    "autoscaling": {"enabled": False},
    "podDisruptionBudget": {"enabled": False},
    "migrate": {"enabled": False},
    "secret": {"create": False, "name": "from-vault"},
    "resources": {"requests": {"cpu": "4", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    "probes": {"readiness": {"periodSeconds": 7}},
    "terminationGracePeriodSeconds": 300,
    "metrics": {"podAnnotations": False},
    "nodeSelector": {"pool": "proxy"},
    "config": "server:\n  port: 8181\n  workers: 4\nmodels: []\n",
}


@pytest.mark.parametrize("variant", ["defaults", "variant", "kustomize"])
def test_every_rendered_object_fits_the_kubernetes_schemas(tmp_path: Path, variant: str) -> None:
    if variant == "kustomize":
        docs = kustomized()
        if not docs:
            pytest.skip("kubectl is not installed")
    else:
        docs = template(tmp_path, VARIANT if variant == "variant" else None)
    assert docs
    for version in KUBE_VERSIONS:
        for doc in docs:
            # strict: an unknown field (a typo in a template) is an error too.
            kubernetes_validate.validate(doc, version, strict=True)


def test_the_defaults_name_the_objects_as_the_docs_do(tmp_path: Path) -> None:
    """(Every kind is there: tests/deploy/test_deploy.py, on deploy/k8s, which is this.)"""
    found = kinds(template(tmp_path))
    deployment = found["Deployment"]
    assert deployment["metadata"]["name"] == "morngpt-proxy"
    assert container(deployment)["image"] == "morngpt-proxy:0.1.0"  # appVersion
    assert found["Job"]["metadata"]["name"] == "morngpt-proxy-migrate-1"  # the revision
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": "morngpt-proxy-config"}} in volumes
    assert found["ConfigMap"]["metadata"]["name"] == "morngpt-proxy-config"


def test_each_value_does_what_it_says(tmp_path: Path) -> None:
    found = kinds(template(tmp_path, VARIANT, name="prod"))
    assert set(found) == {"ConfigMap", "Deployment", "Service"}  # HPA, PDB, Job, Secret off
    deployment = found["Deployment"]
    assert deployment["metadata"]["name"] == "prod-morngpt-proxy"
    spec, pod = deployment["spec"], deployment["spec"]["template"]["spec"]
    c = container(deployment)
    assert spec["replicas"] == 5
    assert c["image"] == "registry.example.com/morngpt-proxy:9.9.9"
    assert c["resources"] == VARIANT["resources"]
    assert c["readinessProbe"]["periodSeconds"] == 7
    assert c["readinessProbe"]["failureThreshold"] == 2  # the default, kept
    assert pod["terminationGracePeriodSeconds"] == 300
    assert pod["nodeSelector"] == {"pool": "proxy"}
    # The ports come from the config: no ops_port, no ops port.
    assert c["ports"] == [{"name": "http", "containerPort": 8181, "protocol": "TCP"}]
    assert "prometheus.io/scrape" not in deployment["spec"]["template"]["metadata"]["annotations"]
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"]}
    assert refs == {"from-vault"}
    assert found["ConfigMap"]["data"]["proxy.yaml"] == VARIANT["config"]


def test_a_misspelt_value_is_refused_by_the_schema(tmp_path: Path) -> None:
    """values.schema.json: a typo would otherwise be ignored silently."""
    path = tmp_path / "typo.yaml"
    path.write_text("autoscaling:\n  enable: false\n")
    done = chart("template", "-f", str(path))
    assert done.returncode == 1
    assert "additional properties 'enable' not allowed" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_config_change_rolls_the_pods(tmp_path: Path) -> None:
    def checksum(config: str | None) -> str:
        values = None if config is None else {"config": config}
        deployment = kinds(template(tmp_path, values))["Deployment"]
        return str(deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"])

    assert checksum(None) != checksum("server:\n  port: 8080\nmodels: []\n")
