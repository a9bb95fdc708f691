"""The built-in catalog: every built-in method, metric, dataset and condition by name, with the module
that registers it and what `bench list` shows of it, so names resolve without importing torch.

The registries (bench.core.registry) read it to stay lazy: a name maps to its module until it is
used, then that module is imported and its decorator registers the object (lm-evaluation-harness's
lazy registry, timm's one-decorator registration). The file is generated from the live registries
(`python -m bench.run.builtins --write-catalog`); a test fails when it is stale.
"""
from __future__ import annotations

import functools
import json
from typing import Any

from bench.core.paths import CONFIGS_DIR

CATALOG_FILE = CONFIGS_DIR / "catalog.json"
KINDS = ("method", "metric", "dataset", "condition")


@functools.lru_cache(maxsize=1)
def _catalog() -> dict[str, dict[str, dict[str, Any]]]:
    try:
        data = json.loads(CATALOG_FILE.read_text())
    except (OSError, ValueError):  # a broken install: names then resolve only once their modules are imported
        return {}
    return {kind: dict(data.get(kind, {})) for kind in KINDS}


def builtin_entries(kind: str) -> dict[str, dict[str, Any]]:
    """name -> {"module": dotted module that registers it, "details": what `bench list` shows}."""
    return _catalog().get(kind, {})


def describe(kind: str, obj: Any) -> dict[str, Any]:
    """What `bench list` shows of a registered object (also what the catalog stores for it)."""
    if kind == "method":
        out = {"conditions": list(getattr(obj, "conditions", ()) or ()), "version": str(getattr(obj, "version", ""))}
        if getattr(obj, "recipe_built_on", ""):
            out["recipe_built_on"] = str(obj.recipe_built_on)
        return out
    if kind == "metric":
        return {"higher_is_better": bool(getattr(obj, "higher_is_better", True)),
                "version": str(getattr(obj, "version", ""))}
    return {}
