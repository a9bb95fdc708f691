"""The import layering of bench/ and its sub-packages, checked statically (README "Layout" tells the same story).

A module's layer is the second part of its dotted name (`bench.run.spec` is in `run`); bottom to top:

    core                  -> nothing
    api, faces            -> core
    datasets              -> core, api, faces
    proxy                 -> core, api, datasets
    metrics | methods     -> core, api, faces, datasets, proxy (never each other)
    analysis              -> core
    report                -> core, analysis
    run                   -> core, api, faces, datasets, proxy, metrics, methods, analysis, report
    profile               -> core, api, datasets, run
    cli                   -> anything
    entry                 -> core, api, run, profile

`entry` is the package itself (`bench/__init__.py`, the library entry point) and the one-file modules at
bench/'s top, which are one-release re-export shims (`bench.registry`, `bench.types`, `bench.benchmarks`).
Every `import` / `from ... import` counts, including those inside functions, and so does
`importlib.import_module("...")` with a literal name. Run this file as a script to print the
package-level import graph.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]

BELOW_MODELS = {"core", "api", "faces", "datasets", "proxy"}
ALLOWED = {
    "core": {"core"},
    "api": {"core", "api"},
    "faces": {"core", "faces"},
    "datasets": {"core", "api", "faces", "datasets"},
    "proxy": {"core", "api", "datasets", "proxy"},
    "metrics": BELOW_MODELS | {"metrics"},
    "methods": BELOW_MODELS | {"methods"},
    "analysis": {"core", "analysis"},
    "report": {"core", "analysis", "report"},
    # run's entry point (bench.run.session) ends with the report of the store it wrote
    "run": BELOW_MODELS | {"metrics", "methods", "analysis", "report", "run"},
    "profile": {"core", "api", "datasets", "run", "profile"},
    "cli": {"core", "api", "faces", "datasets", "proxy", "metrics", "methods", "analysis", "report", "run",
            "profile", "cli", "entry"},
    "entry": {"core", "api", "run", "profile", "entry"},
}
TORCH_FREE = ("analysis", "report")  # no torch-stack import anywhere: `bench report` and `bench check`


def package_dirs(root: Path = ROOT) -> dict[str, str]:
    """Source directory -> import name, from pyproject's setuptools package-dir (datasets/ is bench.datasets)."""
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {directory: package for package, directory in cfg.items() if "." not in directory and "/" not in directory}


def layer(module: str) -> str | None:
    """The layer of a dotted module name; None outside bench (stdlib, third party)."""
    parts = module.split(".")
    if parts[0] != "bench":
        return None
    if len(parts) == 1 or parts[1] not in ALLOWED:
        return "entry"  # bench itself, or a one-file module at its top (a shim)
    return parts[1]


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
    order = list(ALLOWED)
    sources = order if every_layer else sorted(graph, key=order.index)
    return "\n".join(f"{src} -> {', '.join(sorted(graph.get(src, ()), key=order.index)) or '(nothing)'}"
                     for src in sources)


def module_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """bench module -> the bench modules it imports (function-level imports too). `from a import b`
    is an edge to a.b when a.b is a module, else to a."""
    dirs = package_dirs(root)
    files = {module_name(path, root, dirs): path for d in sorted(dirs) for path in sorted((root / d).rglob("*.py"))}
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in imported_modules(node, module, path.name == "__init__.py"):
                while target not in files and "." in target:
                    target = target.rsplit(".", 1)[0]  # a name imported from a module, not a submodule
                if target in files and target != module:
                    graph.setdefault(module, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    seen: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if seen.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in seen and (found := visit(nxt, path + [nxt])):
                return found
        seen[node] = 2
        return None

    for node in sorted(graph):
        if node not in seen and (found := visit(node, [node])):
            return found
    return None


TORCH_STACK = ("torch", "torchvision", "diffusers", "transformers", "lightning", "torchmetrics", "kornia")


def torch_imports(root: Path = ROOT) -> list[str]:
    """Imports of the torch stack anywhere (functions too) in the torch-free layers' files."""
    dirs = package_dirs(root)
    found = []
    for path in sorted((root / "bench").rglob("*.py")):
        module = module_name(path, root, dirs)
        if layer(module) not in TORCH_FREE:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            for target in imported_modules(node, module, path.name == "__init__.py"):
                if target.split(".")[0] in TORCH_STACK:
                    found.append(f"{path.relative_to(root)}:{node.lineno}: imports {target}")
    return found


def test_every_import_respects_the_layering():
    bad = violations()
    assert not bad, "imports against the layering:\n" + "\n".join(map(str, bad))


def test_the_check_sees_every_package_file():
    edges = import_edges()
    files = {e.file for e in edges}
    for expected in ("datasets/layouts.py", "metrics/layout.py", "methods/controlnet_pp.py", "bench/proxy/rewards.py",
                     "bench/cli/main.py", "bench/api/base_model.py"):
        assert expected in files
    assert {e.source for e in edges} == set(ALLOWED)


def _empty_tree(tmp_path: Path) -> None:
    """This checkout's pyproject and empty package directories: a tree to add one bad file to."""
    (tmp_path / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    for directory in package_dirs():
        (tmp_path / directory).mkdir()


def test_module_graph_has_no_cycles():
    cycle = find_cycle(module_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_module_cycle_is_found(tmp_path):
    _empty_tree(tmp_path)
    (tmp_path / "bench/report").mkdir(parents=True)
    (tmp_path / "bench/report/plots.py").write_text("def f():\n    from bench.report.tables import Table\n")
    (tmp_path / "bench/report/tables.py").write_text("from bench.report import plots\n")
    assert find_cycle(module_graph(tmp_path)) == ["bench.report.plots", "bench.report.tables", "bench.report.plots"]


@pytest.mark.parametrize("torch_free", ["analysis", "report"])
def test_report_and_analysis_import_no_torch(torch_free):
    assert torch_free in TORCH_FREE
    assert torch_imports() == []


def test_core_modules_import_without_torch():
    """core may import torch inside a function that needs it (provenance reads the GPU), never at import."""
    import subprocess

    modules = sorted(m for m in module_graph() if layer(m) == "core" and m != "bench")
    code = f"import sys; [__import__(m) for m in {modules!r}]; print(sorted(set(sys.modules) & {set(TORCH_STACK)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr + out.stdout


def test_a_torch_import_in_the_report_layer_fails(tmp_path):
    _empty_tree(tmp_path)
    (tmp_path / "bench/report").mkdir(parents=True)
    (tmp_path / "bench/report/plots.py").write_text("def f():\n    import torch.nn.functional as F\n")
    assert torch_imports(tmp_path) == ["bench/report/plots.py:2: imports torch.nn.functional"]


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
    ("bench/core/registry.py", "def load_builtins():\n    import bench.datasets\n",
     "bench/core/registry.py:2: 'import bench.datasets' makes core import datasets"),
    ("bench/api/base_model.py", "from bench import proxy\n", "bench/api/base_model.py:1: 'from bench import proxy' makes api import proxy"),
    # the three edges the layout move removed: each must fail again if it came back
    ("bench/analysis/check.py", "def f():\n    from bench.run.builtins import load_builtins\n", "makes analysis import run"),
    ("bench/core/weights.py", "from bench.api.base_model import BaseModel\n", "makes core import api"),
    ("bench/report/html.py", "from bench.profile.estimate import estimate\n", "makes report import profile"),
    ("methods/instantid.py", "from bench.metrics.face import IDSim\n", "makes methods import metrics"),
    ("metrics/fd.py", "from ..methods import controlnet\n", "metrics/fd.py:1: 'from ..methods import controlnet' makes metrics import methods"),
    ("bench/proxy/rewards.py", "import importlib\nimportlib.import_module('bench.metrics.consistency')\n",
     "bench/proxy/rewards.py:2:"),
    ("bench/proxy/base.py", "from bench.run.execute import execute\n", "makes proxy import run"),
]


@pytest.mark.parametrize("file,source,message", BAD, ids=[b[0] for b in BAD])
def test_a_bad_edge_fails_and_names_file_line_and_import(tmp_path, file, source, message):
    _empty_tree(tmp_path)
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(source)
    bad = violations(tmp_path)
    assert len(bad) == 1 and message in str(bad[0]), bad


def test_allowed_edges_pass(tmp_path):
    _empty_tree(tmp_path)
    (tmp_path / "bench" / "proxy").mkdir()
    (tmp_path / "bench/proxy/base.py").write_text("from bench.datasets.shapes import SHAPES\nfrom bench.api.types import Batch\n")
    (tmp_path / "methods/ip_adapter.py").write_text("def f():\n    from bench.proxy.recognizers import IMAGE_ENCODER\n")
    (tmp_path / "bench/cli").mkdir()
    (tmp_path / "bench/cli/main.py").write_text("import bench.metrics, bench.methods\nfrom bench.proxy import base\n")
    (tmp_path / "bench/report").mkdir()
    (tmp_path / "bench/report/write.py").write_text("from bench.analysis.claims import evaluate_all\n")
    assert violations(tmp_path) == []
    assert format_graph(package_graph(tmp_path)) == ("proxy -> api, datasets\nmethods -> proxy\nreport -> analysis\n"
                                                     "cli -> proxy, metrics, methods")


if __name__ == "__main__":  # print the package-level graph of a tree (default: this checkout)
    print(format_graph(package_graph(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT), every_layer=True))
