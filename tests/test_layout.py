"""The suite's own layout: shared helpers live in tests/support/ (resources are
fixtures in the conftest.py files), a test module never imports another test module,
and nothing imports a conftest.py (pytest loads those; importing one runs it twice)."""

from __future__ import annotations

from pathlib import Path

from tests.support.env import ROOT
from tests.support.imports import imports

TESTS = ROOT / "tests"


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (``from . import x`` gives ``pkg.x``)."""
    pairs = imports(path, ROOT)
    return {module for module, _ in pairs} | {f"{m}.{name}" for m, name in pairs if name}


def sources() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def test_no_module_imports_a_test_module() -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(name for name in imported(path) if is_test(name))
        for path in sources()
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def is_test(name: str) -> bool:
    return name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")


def test_no_module_imports_a_conftest() -> None:
    wrong = {
        str(path.relative_to(ROOT)): sorted(
            name for name in imported(path) if name.rsplit(".", 1)[-1] == "conftest"
        )
        for path in sources()
    }
    assert {path: names for path, names in wrong.items() if names} == {}


def test_shared_helpers_live_in_support() -> None:
    """Outside tests/support/, a module under tests/ is a test module, a conftest.py or
    a package's __init__.py."""
    helpers = [
        str(path.relative_to(ROOT))
        for path in sources()
        if "support" not in path.relative_to(TESTS).parts
        and not path.name.startswith("test_")
        and path.name not in ("conftest.py", "__init__.py")
    ]
    assert helpers == []


def test_every_folder_is_a_package() -> None:
    """So that modules of the same name in two folders cannot clash (pytest imports
    them by their dotted package path)."""
    folders = {path.parent for path in sources()}
    bare = [str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()]
    assert sorted(bare) == []


# Folders of tests that are not about one package of proxy/: the suites that cross
# every package (hostile clients, faults), the benchmarks, the deployment artefacts.
CROSS_CUTTING = {"support", "adversity", "bench", "deploy"}
# Packages without a folder of their own, and why.
NO_FOLDER = {"config": "each setting is tested with the feature it configures"}


def test_folders_mirror_the_packages() -> None:
    """Each folder under tests/ is named after a package of proxy/ (tests/http/ holds the
    tests of proxy/http/), or is one of the cross-cutting suites above; and every
    package of proxy/ has its folder."""
    packages = {p.parent.name for p in (ROOT / "proxy").glob("*/__init__.py")} - {"migrations"}
    folders = {p.name for p in TESTS.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert sorted(folders - packages - CROSS_CUTTING) == []
    assert sorted(packages - folders - NO_FOLDER.keys()) == []


def test_the_checks_see_imports() -> None:
    """The checks above are not vacuous: they see relative and absolute imports."""
    tree = TESTS / "test_layout.py"
    assert "tests.support.env.ROOT" in imported(tree)
    assert is_test("tests.adversity.test_fuzz")
    assert not is_test("tests.support.load")
