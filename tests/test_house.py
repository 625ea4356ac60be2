"""The house rules of ``proxy/`` (#16): no import cycle between its modules, and no
module over 500 lines.

Every import counts: at module level, inside functions, and under ``TYPE_CHECKING``
(a cycle that only the type checker sees is still a knot in the design). ``from . import
x`` and ``from .pkg import x`` name the module ``x`` when it is one, else ``pkg``. A
package's ``__init__`` is a module like any other; importing ``proxy.a.b`` does not
count as importing the package ``proxy.a``."""

from __future__ import annotations

from pathlib import Path

import proxy
from tests.support.imports import imports, module_name

ROOT = Path(proxy.__file__).parent
MAX_LINES = 500


def _modules() -> dict[str, Path]:
    return {module_name(path, ROOT.parent): path for path in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``proxy`` that module ``name`` imports, anywhere in it."""
    found = {
        f"{module}.{alias}" if f"{module}.{alias}" in known else module
        for module, alias in imports(path, ROOT.parent)
    }
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), and
    modules that import themselves."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_the_imports() -> None:
    graph = _graph()
    assert "proxy.state" in graph["proxy.app"]
    assert "proxy.http.relay" in graph["proxy.app"]


def test_no_import_cycle_inside_proxy() -> None:
    cycles = _cycles(_graph())
    assert cycles == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_over_500_lines() -> None:
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"modules over {MAX_LINES} lines: {long}"
