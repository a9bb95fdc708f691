"""The lazy registry: built-in names resolve from bench/configs/catalog.json until used, so `bench list`,
`bench report` and `bench check` never import torch; the catalog is what the modules register."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.core.catalog import CATALOG_FILE, KINDS
from bench.core.registry import METHODS, METRICS, Registry

TORCH_STACK = ("torch", "diffusers", "lightning", "transformers")


def test_the_catalog_is_what_the_builtin_modules_register():
    """Run `python -m bench.run.builtins --write-catalog` after adding, renaming or re-versioning a built-in."""
    from bench.run.builtins import live_catalog

    assert json.loads(CATALOG_FILE.read_text()) == json.loads(json.dumps(live_catalog())), \
        "bench/configs/catalog.json is stale: run python -m bench.run.builtins --write-catalog"


@pytest.mark.parametrize("argv", [["list"], ["check", "--baseline", "sweeps/regression/baseline.json", "--store", "{store}"],
                                  ["report", "--store", "{store}", "--out", "{out}", "--html"]])
def test_list_report_and_check_import_no_torch(argv, tmp_path):
    from bench.core.store import RunRecord, Store

    store = tmp_path / "store.sqlite"
    with Store(store) as s:  # one finished record, so report and check have something to read
        s.put(RunRecord(run_id="r1", spec={"method": "baseline", "dataset": "shapes", "budget_key": "k", "seed": 0,
                                           "condition": "canny", "metric_versions": {"canny_f1": "1"}},
                        status="FINISHED", metrics={"canny_f1": 0.5},
                        metric_meta={"canny_f1": {"version": "1", "higher_is_better": True}}))
    args = [a.format(store=store, out=tmp_path / "report") for a in argv]
    code = (f"import sys; from bench.cli.main import main; code = main({args!r}); "
            f"print(sorted(set(sys.modules) & {set(TORCH_STACK)!r})); sys.exit(0 if code in (0, 1) else code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_a_builtin_resolves_on_first_use_and_lists_without_import():
    code = ("import sys; from bench.core.registry import METHODS; "
            "assert 'controlnet' in METHODS.names() and METHODS.origin('controlnet') == 'builtin'; "
            "v = METHODS.details('controlnet')['version']; assert 'torch' not in sys.modules; "
            "cls = METHODS.get('controlnet'); assert 'torch' in sys.modules and cls.version == v; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.stdout.strip() == "ok", out.stderr


def test_unknown_names_suggest_catalog_entries_too():
    with pytest.raises(KeyError, match="did you mean 'controlnet'"):
        Registry("method", catalog="method").get("controlnett")


@pytest.mark.parametrize("kind", KINDS)
def test_every_catalog_entry_names_the_module_that_registers_it(kind):
    from bench.core.catalog import builtin_entries

    registry = {"method": METHODS, "metric": METRICS}.get(kind)
    for name, entry in builtin_entries(kind).items():
        assert entry["module"].startswith("bench.") and "." in entry["module"][6:], (name, entry)
        if registry is not None:
            assert registry.module(name) == entry["module"]
