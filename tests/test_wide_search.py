"""The wide random search (``-m slow``): every property test of the suite again, with
random seeds and twenty times the examples (``MORNGPT_HYPOTHESIS=wide``, see
tests/support/properties.py). The default run stays derandomized; a failure found here is kept as an
explicit ``@example`` on the test that found it, so the default run checks it forever."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.env import ROOT


def property_modules() -> list[str]:
    tests = ROOT / "tests"
    return sorted(
        str(path.relative_to(ROOT))
        for path in tests.rglob("test_*.py")
        if "@given(" in path.read_text() and path.name != "test_wide_search.py"
    )


def test_the_suite_has_property_tests() -> None:
    assert {
        "tests/http/test_sse.py",
        "tests/http/test_wire.py",
        "tests/adversity/test_fuzz.py",
    } <= set(property_modules())


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_wide_random_search() -> None:
    env = {**os.environ, "MORNGPT_HYPOTHESIS": "wide"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow"]
    run = subprocess.run([*command, *property_modules()], cwd=ROOT, env=env, check=False)
    assert run.returncode == 0
