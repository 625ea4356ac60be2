"""deploy/: the Prometheus config, alert rules and Grafana dashboard only query metrics
the proxy really exports (checked against a live proxy's /metrics)."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import aiohttp
import openai
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.env import ROOT
from tests.support.inproc import Proxy

PROMETHEUS = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "morngpt-proxy.json"
# Series Prometheus makes itself for every target; the proxy does not export them.
FROM_PROMETHEUS = frozenset({"up"})
# Grafana's built-in variables, replaced as Grafana would before the query runs.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
REQUIRED_ALERTS = {
    "MorngptLatencyP95High",
    "MorngptErrorRateHigh",
    "MorngptAvailabilityBudgetBurnFast",
    "MorngptUsageSpoolGrowing",
    "MorngptDeploymentDown",
    "MorngptLimiterOnLocalFallback",
}
REQUIRED_PANELS = (
    "Requests per second",
    "Latency",
    "Time to first token",
    "Proxy overhead",
    "Error rate",
    "Tokens per second",
    "Rate-limited",
    "Deployment health",
    "Usage records",
)


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects (parsed, not pattern-matched)."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def load_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard_queries() -> list[str]:
    """The PromQL of every panel target, with Grafana's variables filled in."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":  # label_values(metric, label) → the metric
            inner = variable["definition"].removeprefix("label_values(").rstrip(")")
            exprs.append(inner.split(",")[0])
    filled = []
    for expr in exprs:
        for name, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(name, value)
        filled.append(expr)
    return filled


async def scrape(url: str) -> set[str]:
    """Names of every sample the proxy exports (with _total/_bucket/... suffixes)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_prometheus_config_scrapes_the_proxy_and_loads_the_rules() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file(), rule_file
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "morngpt-proxy"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"]


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed"
)
def test_promtool_accepts_the_config_and_the_alert_unit_tests() -> None:
    """Prometheus' own checker, and the alert behaviour tests in alerts_test.yml."""
    for args in (("check", "config", "prometheus.yml"), ("test", "rules", "alerts_test.yml")):
        done = subprocess.run(
            ["promtool", *args], cwd=PROMETHEUS, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_are_well_formed_and_cover_the_targets() -> None:
    rules = load_rules()
    alerts = {r["alert"]: r for r in rules if "alert" in r}
    assert alerts.keys() >= REQUIRED_ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert rule["annotations"]["summary"], name
        if "for" in rule:
            promql_parser.parse_duration(rule["for"])
    # The thresholds are the promised ones.
    assert alerts["MorngptLatencyP95High"]["expr"].rstrip().endswith("> 2")
    assert "> 0.01" in alerts["MorngptErrorRateHigh"]["expr"]
    assert "0.001" in alerts["MorngptAvailabilityBudgetBurnFast"]["expr"]


def test_dashboard_has_the_panels_operators_need() -> None:
    board = json.loads(DASHBOARD.read_text())
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    for wanted in REQUIRED_PANELS:
        assert any(wanted in title for title in titles), wanted
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


async def test_every_queried_metric_is_exported(client: openai.AsyncOpenAI, proxy: Proxy) -> None:
    # Traffic that makes every request-path series appear: answers, a stream, tokens,
    # an upstream that breaks mid-stream. The rest is declared at start.
    await client.chat.completions.create(model="m1", messages=[{"role": "user", "content": "hi"}])
    stream = await client.chat.completions.create(model="m1", messages=[], stream=True)
    async for _ in stream:
        pass
    broken = await client.chat.completions.create(
        model="m1", messages=[], stream=True, extra_headers={"x-fake-cut": "2"}
    )
    with pytest.raises(openai.APIError):
        async for _ in broken:
            pass
    exported = await scrape(proxy.url)

    rules = load_rules()
    recorded = {r["record"] for r in rules if "record" in r}
    queried: dict[str, set[str]] = {}
    for source, exprs in (
        ("alerts.yml", [r["expr"] for r in rules]),
        ("dashboard", dashboard_queries()),
    ):
        for expr in exprs:
            for name in metric_names(expr):
                queried.setdefault(name, set()).add(source)
    assert len(queried) > 10  # the extraction found the queries at all
    missing = {
        name: sources
        for name, sources in queried.items()
        if name not in exported and name not in recorded and name not in FROM_PROMETHEUS
    }
    assert not missing, f"queried but not exported: {missing}"
    # Every recording rule is defined from exported metrics too (checked above) and
    # every recording rule name follows the level:metric:operations convention.
    assert all(name.count(":") == 2 for name in recorded)
