"""bench.core.optional: one table of optional dependencies, one message form when one is missing."""
from __future__ import annotations

import importlib

import pytest

from bench.core.errors import ConfigError
from bench.core.optional import OPTIONAL, available, require


@pytest.mark.parametrize("module", sorted(OPTIONAL))
def test_a_missing_optional_dependency_is_one_line_naming_its_install(module, monkeypatch):
    real_import = importlib.import_module

    def absent(name, *args, **kwargs):
        if name == module:
            raise ModuleNotFoundError(f"No module named {name!r}", name=module.split(".")[0])
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", absent)
    with pytest.raises(ConfigError) as e:
        require(module)
    d = OPTIONAL[module]
    assert str(e.value) == f"{d.feature} needs {d.package}: {d.install}" and "\n" not in str(e.value)


def test_available_looks_without_importing():
    assert available("json") and not available("no_such_module_xyz") and not available("no_such_pkg.sub")
    assert require("json") is importlib.import_module("json")


def test_every_optional_import_goes_through_the_table():
    """No module of bench/, methods/, metrics/ or datasets/ imports a table entry by hand."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = []
    for d in ("bench", "methods", "metrics", "datasets"):
        for path in (root / d).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                found += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in {m.split(".")[0] for m in OPTIONAL} and n.split(".")[0] != "pytest"]
    assert found == []


