"""What a Python file imports, read from its syntax tree (the layout checks of
tests/test_house.py and tests/test_layout.py)."""

from __future__ import annotations

import ast
from pathlib import Path


def module_name(path: Path, root: Path) -> str:
    """The dotted name of the module at ``path``; ``root`` holds its top package."""
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def imports(path: Path, root: Path) -> set[tuple[str, str]]:
    """``(module, name)`` for every import anywhere in ``path`` (in functions and under
    ``TYPE_CHECKING`` too), relative ones made absolute: ``import a.b`` gives
    ``("a.b", "")``, ``from . import x`` in ``pkg/m.py`` gives ``("pkg", "x")``."""
    package = module_name(path, root)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[tuple[str, str]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name, "") for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{base}.{module}" if module else base
            found.update((module, alias.name) for alias in node.names)
    return found
