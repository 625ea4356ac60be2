"""Known vulnerabilities in the locked dependencies: ``python scripts/audit.py``.

Runs pip-audit over requirements-dev.lock (a superset of requirements.lock, the image's)
against PyPI's vulnerability data, and ``npm audit`` over the console's
package-lock.json against the npm registry's, and fails (exit 1) on any vulnerability
that is not accepted in .ci/audit-accept.txt. To accept one, add a line there:

    GHSA-xxxx-xxxx-xxxx  why it does not affect us, and until when (e.g. a fix date)

(the ID pip-audit or npm audit prints, or any of its aliases such as a CVE or PYSEC ID).

When the vulnerability data cannot be reached (no network, or a registry mirror that
does not serve it), the packages it could not check are listed and the run says
DEGRADED and exits 0: CI does not fail at random on the network, and does not claim
an audit it did not make. ``--strict`` makes that an error (exit 2) too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ACCEPT = ROOT / ".ci" / "audit-accept.txt"
CONSOLE = ROOT / "console"


def accepted(path: Path) -> dict[str, str]:
    """Accepted vulnerability ID -> the reason given for it."""
    found = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        vuln_id, _, reason = line.split("#")[0].strip().partition(" ")
        if vuln_id:
            if not reason.strip():
                raise SystemExit(f"{path}: {vuln_id} has no reason; say why it is accepted")
            found[vuln_id] = reason.strip()
    return found


def judge(report: dict[str, Any], accept: dict[str, str], strict: bool) -> tuple[int, list[str]]:
    """pip-audit's JSON report -> (exit code, lines to print)."""
    lines, failing, skipped, seen = [], [], [], set()
    dependencies = report.get("dependencies", [])
    for dep in dependencies:
        if "skip_reason" in dep:
            skipped.append(f"{dep['name']}: {dep['skip_reason']}")
            continue
        for vuln in dep.get("vulns", []):
            ids = {vuln["id"], *vuln.get("aliases", [])}
            seen |= ids
            what = f"{dep['name']} {dep['version']}: {vuln['id']} (fixed in {vuln['fix_versions']})"
            if ids & accept.keys():
                lines.append(f"accepted  {what}: {accept[sorted(ids & accept.keys())[0]]}")
            else:
                failing.append(what)
    audited = len(dependencies) - len(skipped)
    lines += [f"VULNERABLE  {what}" for what in failing]
    if skipped:
        lines.append(
            f"DEGRADED: {len(skipped)} of {len(dependencies)} locked packages were NOT "
            "audited (the vulnerability data did not answer for them):"
        )
        lines += [f"  {s}" for s in skipped]
    if not skipped:
        lines += [f"accepted but no longer reported: {i}" for i in sorted(accept.keys() - seen)]
    lines.append(
        f"audited {audited} of {len(dependencies)} locked packages: "
        f"{len(failing)} known vulnerabilities not accepted ({ACCEPT.relative_to(ROOT)})"
    )
    if failing:
        return 1, lines
    return (2 if strict and skipped else 0), lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python scripts/audit.py", description=__doc__)
    parser.add_argument("--lock", default=str(ROOT / "requirements-dev.lock"))
    parser.add_argument("--strict", action="store_true", help="exit 2 when not all was audited")
    parser.add_argument("--deadline", type=float, default=600, help="seconds for the whole audit")
    args = parser.parse_args(argv)
    accept = accepted(ACCEPT)
    command = [sys.executable, "-m", "pip_audit", "-r", args.lock, "--require-hashes"]
    command += ["--disable-pip", "--progress-spinner", "off", "--format", "json", "--timeout", "10"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.deadline)
    except subprocess.TimeoutExpired:
        print(f"DEGRADED: pip-audit did not finish in {args.deadline:g} s; nothing was audited")
        return 2 if args.strict else 0
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        print("DEGRADED: pip-audit gave no report; nothing was audited. It said:")
        print("\n".join(done.stderr.strip().splitlines()[-5:]))
        return 2 if args.strict else 0
    report["dependencies"] += npm_dependencies(CONSOLE, args.deadline)
    code, lines = judge(report, accept, args.strict)
    print("\n".join(lines))
    return code


def npm_dependencies(folder: Path, deadline: float) -> list[dict[str, Any]]:
    """The console's locked npm packages as pip-audit reports dependencies: those
    ``npm audit`` finds vulnerable with their advisories; when it cannot answer, one
    entry with a ``skip_reason`` (judged DEGRADED, never passed)."""
    if not (folder / "package-lock.json").exists():
        return []
    command = ["npm", "audit", "--json", "--package-lock-only"]
    try:
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=deadline)
        report = json.loads(done.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return [{"name": "console (npm)", "skip_reason": f"npm audit failed: {exc}"}]
    return npm_judged(report)


def npm_judged(report: dict[str, Any]) -> list[dict[str, Any]]:
    """``npm audit --json`` (v2 report) -> pip-audit's dependency entries."""
    if "vulnerabilities" not in report:
        reason = report.get("message") or report.get("error", {}).get("summary") or "no report"
        return [{"name": "console (npm)", "skip_reason": f"npm audit: {reason}"}]
    found = []
    for name, entry in sorted(report["vulnerabilities"].items()):
        advisories = [via for via in entry.get("via", []) if isinstance(via, dict)]
        vulns = [
            {
                "id": via.get("url", "").rsplit("/", 1)[-1] or str(via.get("source")),
                "aliases": [str(via.get("source"))],
                "fix_versions": [str(entry.get("fixAvailable"))],
            }
            for via in advisories
        ]
        if vulns:  # (an entry only "via" another package is that package's advisory)
            found.append(
                {"name": f"{name} (npm)", "version": entry.get("range", ""), "vulns": vulns}
            )
    return found


if __name__ == "__main__":
    raise SystemExit(main())
