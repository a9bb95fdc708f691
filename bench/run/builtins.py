"""Loading every built-in dataset, method and metric, with the plugins, and writing the catalog.

The registries (bench/core/registry.py) resolve a built-in name lazily from the catalog
(bench/core/catalog.py), so looking one name up needs no call here. `load_builtins()` is for
commands that need every object at once (preflight across the registry, contract tests) and
for plugins: entry points of installed distributions and `--plugin` modules (CONTROLBENCH_PLUGINS).

    python -m bench.run.builtins --write-catalog    # after adding or re-versioning a built-in
"""
from __future__ import annotations

import importlib
import json
import sys

# The packages whose modules register the built-ins (each imports nothing on its own).
BUILTIN_PACKAGES = ("bench.datasets", "bench.methods", "bench.metrics")


def builtin_modules() -> list[str]:
    """Every module of the built-in packages, found on disk (not from the catalog, which they generate)."""
    import pkgutil

    out = []
    for package in BUILTIN_PACKAGES:
        pkg = importlib.import_module(package)
        out += [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")]
    return sorted(out)


def load_builtins() -> None:
    """Import every built-in module (their decorators register), the installed entry-point plugins
    and the `--plugin` modules."""
    from bench.core.registry import ENTRY_POINT_GROUPS, load_entry_points, load_plugin_modules

    for module in builtin_modules():
        importlib.import_module(module)
    for group in ENTRY_POINT_GROUPS:
        load_entry_points(group)
    load_plugin_modules()


def live_catalog() -> dict[str, dict[str, dict]]:
    """The catalog as the built-in modules register it now (plugins left out)."""
    from bench.core.catalog import KINDS, describe
    from bench.core.registry import CONDITIONS, DATASETS, METHODS, METRICS

    for module in builtin_modules():
        importlib.import_module(module)
    out: dict[str, dict[str, dict]] = {}
    for kind, registry in zip(KINDS, (METHODS, METRICS, DATASETS, CONDITIONS)):
        out[kind] = {name: {"module": registry.module(name), "details": describe(kind, obj)}
                     for name, obj in sorted(registry.loaded().items()) if registry.origin(name) == "builtin"}
    return out


def write_catalog() -> str:
    from bench.core.catalog import CATALOG_FILE
    from bench.core.files import atomic_write

    atomic_write(CATALOG_FILE, json.dumps(live_catalog(), indent=1, sort_keys=True) + "\n")
    return str(CATALOG_FILE)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-catalog"]:
        sys.exit("usage: python -m bench.run.builtins --write-catalog")
    print(write_catalog())
