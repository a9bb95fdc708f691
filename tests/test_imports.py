"""The import layering of bench/, datasets/, proxy, metrics/ and methods/, checked statically.

Bottom to top:
1. core `bench` modules (registry, types, budget, store, base_model, method, sampler, ...);
2. `bench.datasets` (datasets/): core only;
3. `bench.proxy` (bench/proxy/, the proxy world's trained models): core + datasets;
4. `bench.metrics` (metrics/) and `bench.methods` (methods/): core + datasets + proxy, never each other;
5. app modules (CLI, spec, runner, report, ...): anything.

Every `import` / `from ... import` counts, including those inside functions, and so does
`importlib.import_module("...")` with a literal name. Run this file as a script to print the
package-level import graph.
"""
from __future__ import annotations

import ast
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# bench/<name>.py (or bench/<name>/) modules that sit at the top: they wire everything together.
APP_MODULES = frozenset({"cli", "spec", "runner", "report", "report_html", "plots", "check", "claims", "sweep",
                         "profile", "estimate", "benchmarks", "wandb_mirror", "builtins", "preflight"})
LAYER_PACKAGES = ("datasets", "proxy", "metrics", "methods")  # bench.<these> are layers of their own
ALLOWED = {
    "core": {"core"},
    "datasets": {"core", "datasets"},
    "proxy": {"core", "datasets", "proxy"},
    "metrics": {"core", "datasets", "proxy", "metrics"},
    "methods": {"core", "datasets", "proxy", "methods"},
    "app": {"core", "datasets", "proxy", "metrics", "methods", "app"},
}


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """Source directory -> import name, from pyproject's setuptools package-dir (datasets/ is bench.datasets)."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {directory: package for package, directory in cfg.items() if "." not in directory and "/" not in directory}


def layer(module: str) -> str | None:
    """The layer of a dotted module name; None outside bench (stdlib, third party)."""
    parts = module.split(".")
    if parts[0] != "bench":
        return None
    if len(parts) == 1:
        return "core"  # bench/__init__.py
    if parts[1] in LAYER_PACKAGES:
        return parts[1]
    return "app" if parts[1] in APP_MODULES else "core"


def module_name(path: Path, root: Path, dirs: dict[str, str]) -> str:
    rel = path.relative_to(root).with_suffix("").parts
    parts = [dirs[rel[0]], *rel[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(node: ast.AST, module: str, is_package: bool) -> list[str]:
    """Dotted names an import node brings in; `from a import b` yields a.b (b may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([node.module] if node.module else []))
        return [f"{base}.{alias.name}" if alias.name != "*" else base for alias in node.names]
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


@dataclass(frozen=True)
class Edge:
    file: str
    line: int
    source: str  # layer of the importing file
    target: str  # layer of the imported module
    statement: str

    def __str__(self) -> str:
        return (f"{self.file}:{self.line}: {self.statement!r} makes {self.source} import {self.target}; "
                f"{self.source} may import only {', '.join(sorted(ALLOWED[self.source]))}")


def import_edges(root: Path = ROOT) -> list[Edge]:
    """Every import of a bench module from a file in the package directories, with both layers."""
    dirs = package_dirs(root)
    edges = []
    for directory in sorted(dirs):
        for path in sorted((root / directory).rglob("*.py")):
            module = module_name(path, root, dirs)
            source = layer(module)
            text = path.read_text()
            for node in ast.walk(ast.parse(text, filename=str(path))):
                targets = {layer(t) for t in imported_modules(node, module, path.name == "__init__.py")}
                for target_layer in sorted(targets - {None}):  # one edge per statement and layer
                    statement = " ".join((ast.get_source_segment(text, node) or "").split())
                    edges.append(Edge(str(path.relative_to(root)), node.lineno, source, target_layer, statement))
    return edges


def violations(root: Path = ROOT) -> list[Edge]:
    return [e for e in import_edges(root) if e.target not in ALLOWED[e.source]]


def package_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """layer -> the other layers it imports."""
    graph: dict[str, set[str]] = {}
    for e in import_edges(root):
        if e.target != e.source:
            graph.setdefault(e.source, set()).add(e.target)
    return graph


def format_graph(graph: dict[str, set[str]], every_layer: bool = False) -> str:
    order = ["core", "datasets", "proxy", "metrics", "methods", "app"]
    sources = order if every_layer else sorted(graph, key=order.index)
    return "\n".join(f"{src} -> {', '.join(sorted(graph.get(src, ()), key=order.index)) or '(nothing)'}"
                     for src in sources)


def test_every_import_respects_the_layering():
    bad = violations()
    assert not bad, "imports against the layering:\n" + "\n".join(map(str, bad))


def test_the_check_sees_every_package_file():
    edges = import_edges()
    files = {e.file for e in edges}
    for expected in ("datasets/layouts.py", "metrics/layout.py", "methods/controlnet_pp.py", "bench/proxy/rewards.py",
                     "bench/cli.py", "bench/base_model.py"):
        assert expected in files
    assert {e.source for e in edges} == set(ALLOWED)


def test_package_graph_has_no_cycles():
    graph = package_graph()
    seen: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in graph.get(node, ()):
            assert seen.get(nxt) != 1, f"import cycle: {' -> '.join(path + [nxt])}\n{format_graph(graph)}"
            if nxt not in seen:
                visit(nxt, path + [nxt])
        seen[node] = 2

    for node in list(graph):
        if node not in seen:
            visit(node, [node])


BAD = [  # (file, source, what the message must name)
    ("datasets/layouts.py", "def fit():\n    from bench.metrics.prompt_fidelity import parse_prompt\n",
     "datasets/layouts.py:2: 'from bench.metrics.prompt_fidelity import parse_prompt' makes datasets import metrics"),
    ("bench/registry.py", "def load_builtins():\n    import bench.datasets\n",
     "bench/registry.py:2: 'import bench.datasets' makes core import datasets"),
    ("bench/base_model.py", "from bench import proxy\n", "bench/base_model.py:1: 'from bench import proxy' makes core import proxy"),
    ("methods/instantid.py", "from bench.metrics.face import IDSim\n", "makes methods import metrics"),
    ("metrics/fd.py", "from ..methods import controlnet\n", "metrics/fd.py:1: 'from ..methods import controlnet' makes metrics import methods"),
    ("bench/proxy/rewards.py", "import importlib\nimportlib.import_module('bench.metrics.consistency')\n",
     "bench/proxy/rewards.py:2:"),
    ("bench/proxy/base.py", "from bench.runner import execute\n", "makes proxy import app"),
]


@pytest.mark.parametrize("file,source,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_edge_fails_and_names_file_line_and_import(tmp_path, file, source, message):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for directory in package_dirs():
        (tmp_path / directory).mkdir()
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(source)
    bad = violations(tmp_path)
    assert len(bad) == 1 and message in str(bad[0]), bad


def test_allowed_edges_pass(tmp_path):
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for directory in package_dirs():
        (tmp_path / directory).mkdir()
    (tmp_path / "bench" / "proxy").mkdir()
    (tmp_path / "bench/proxy/base.py").write_text("from bench.datasets.shapes import SHAPES\nfrom bench.types import Batch\n")
    (tmp_path / "methods/ip_adapter.py").write_text("def f():\n    from bench.proxy.recognizers import IMAGE_ENCODER\n")
    (tmp_path / "bench/cli.py").write_text("import bench.metrics, bench.methods\nfrom bench.proxy import base\n")
    assert violations(tmp_path) == []
    assert format_graph(package_graph(tmp_path)) == "proxy -> core, datasets\nmethods -> proxy\napp -> proxy, metrics, methods"


if __name__ == "__main__":  # print the package-level graph of a tree (default: this checkout)
    print(format_graph(package_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT), every_layer=True))
