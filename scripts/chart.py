"""The Helm chart in deploy/helm/morngpt-proxy, with Helm's own Go SDK in-process
(helm-python-sdk, from the [dev] extra: no `helm` binary is needed).

    python scripts/chart.py template [-f values.yaml ...] [--name NAME]   # = helm template
    python scripts/chart.py lint                                         # = helm lint --strict
    python scripts/chart.py k8s [--check]    # render deploy/k8s from the chart's defaults

deploy/k8s is generated: one file per template, the config as proxy.yaml (kustomize's
configMapGenerator turns it back into the ConfigMap, named with a content hash).
`--check` writes nothing and exits 1 when a file differs from what the chart renders.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "morngpt-proxy"
K8S = ROOT / "deploy" / "k8s"
RELEASE = "morngpt-proxy"
GENERATED = (
    "# Generated from deploy/helm/morngpt-proxy by `python scripts/chart.py k8s`:\n"
    "# change the chart (templates, values.yaml), then run that; never edit this file.\n"
)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``, maps merged key by key (as ``helm -f`` does)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def render(values: dict[str, Any] | None = None, name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, the empty ones (disabled parts) left out."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values or {}, name=name, is_install=True, revision=1)
    return {path: text for path, text in sorted(rendered.items()) if yaml.safe_load(text)}


def k8s_files() -> dict[str, str]:
    """deploy/k8s as the chart renders it: file name -> text."""
    files = {}
    for path, text in render().items():
        doc = yaml.safe_load(text)
        if doc["kind"] == "ConfigMap":
            files["proxy.yaml"] = GENERATED + doc["data"]["proxy.yaml"]
        else:
            files[Path(path).name] = GENERATED + text.lstrip("\n")
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/chart.py", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    template = sub.add_parser("template", help="render the chart (helm template)")
    template.add_argument("-f", "--values", action="append", default=[], help="values file")
    template.add_argument("--name", default=RELEASE, help="release name")
    sub.add_parser("lint", help="helm lint --strict")
    k8s = sub.add_parser("k8s", help="render deploy/k8s from the chart's defaults")
    k8s.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    k8s.add_argument("--dir", type=Path, default=K8S, help="instead of deploy/k8s")
    args = parser.parse_args(argv)

    if args.command == "template":
        values: dict[str, Any] = {}
        for file in args.values:
            values = merge(values, yaml.safe_load(Path(file).read_text()) or {})
        for path, text in render(values, args.name).items():
            sys.stdout.write(f"---\n# Source: {path}\n{text.strip(chr(10))}\n")
        return 0
    if args.command == "lint":
        report = helm.lint(CHART, strict=True)
        for message in report["messages"]:
            print(f"{message['path']}: {message['error']}")
        # Severity 1 is information (e.g. "icon is recommended"); 2 warning, 3 error.
        return 1 if report["errors"] or any(m["severity"] >= 2 for m in report["messages"]) else 0
    stale = []
    for name, text in k8s_files().items():
        path = args.dir / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
            if not args.check:
                path.write_text(text)
    if args.check and stale:
        print(f"deploy/k8s differs from the chart in {stale}: run `python scripts/chart.py k8s`")
        return 1
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except helm.HelmError as error:  # bad values or a template error: Helm's message
        raise SystemExit(f"chart.py: {error}") from None
