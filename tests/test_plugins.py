"""Methods from outside this repo: a tiny plugin distribution (its own pyproject.toml, one method
file, an entry point) installed into a temporary directory, and a plain module passed with --plugin."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.core.store import Store

BENCH = [sys.executable, "-m", "bench.cli"]

# Written against the method contract only (bench.api.method.Method), as a researcher's own package would.
METHOD_FILE = '''
"""A method outside controlbench: one trainable gain on the UNet's input (a minimal control branch)."""
from pathlib import Path

import torch
from torch import nn

from bench.api.method import Method


class DemoGain(Method):
    version = "demo_gain-v1"
    weights_layout = "a directory with gain.safetensors (the trained gain)"

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.gain = nn.Parameter(torch.ones(()))

    def denoise(self, x, t, embeds, state):
        return super().denoise(x * self.gain, t, embeds, state)

    def save_weights(self, directory):
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file({"gain": self.gain.detach().clone()}, str(Path(directory) / "gain.safetensors"))

    def load_weights(self, path):
        from safetensors.torch import load_file

        with torch.no_grad():
            self.gain.copy_(load_file(str(Path(path) / "gain.safetensors"))["gain"])
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "cb-plugin-demo"
version = "0.1.0"

[project.entry-points."controlbench.methods"]
demo_gain = "cb_plugin_demo.methods:DemoGain"

[project.entry-points."controlbench.metrics"]
demo_fidelity = "cb_plugin_demo.metrics:DemoFidelity"

[tool.setuptools]
packages = ["cb_plugin_demo"]
'''


def install_flat(src: Path, site: Path) -> None:
    """What `pip install --no-deps --target SITE SRC` leaves for a pure-Python package: its package
    directories and a .dist-info with METADATA and entry_points.txt, written here from SRC's
    pyproject.toml (pip would need the `wheel` package to build it, and no index is reachable in CI)."""
    import shutil

    import tomllib

    meta = tomllib.loads((src / "pyproject.toml").read_text())
    project = meta["project"]
    for pkg in meta["tool"]["setuptools"]["packages"]:
        shutil.copytree(src / pkg, site / pkg)
    info = site / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) + "\n"
        for group, eps in project.get("entry-points", {}).items()))


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The plugin distribution (pyproject.toml, one method file, an entry point), installed into a
    directory of its own, dist-info and all."""
    src, site = tmp_path_factory.mktemp("plugin_src"), tmp_path_factory.mktemp("plugin_site")
    (src / "pyproject.toml").write_text(PYPROJECT)
    (src / "cb_plugin_demo").mkdir()
    (src / "cb_plugin_demo" / "__init__.py").write_text("")
    (src / "cb_plugin_demo" / "methods.py").write_text(METHOD_FILE)
    (src / "cb_plugin_demo" / "metrics.py").write_text(
        "from bench.metrics.prompt_fidelity import PromptFidelity\n\n\n"
        "class DemoFidelity(PromptFidelity):  # a metric from outside the repo (a builtin's variant)\n"
        "    version = 'demo_fidelity-v1'\n")
    install_flat(src, site)
    return site


def _env(tmp_path: Path, *paths: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths), "WANDB_MODE": "disabled",
            "CONTROLBENCH_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _bench(args: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(BENCH + args, env=env, capture_output=True, text=True, timeout=timeout)


def test_entry_point_plugin_lists_runs_and_passes_the_contract(plugin_site, tmp_path) -> None:
    env = _env(tmp_path, plugin_site)
    listing = _bench(["list"], env)
    assert listing.returncode == 0, listing.stderr
    line = next(ln for ln in listing.stdout.splitlines() if ln.strip().startswith("demo_gain "))
    assert "from=entry point cb-plugin-demo 0.1.0" in line
    assert "from=builtin" in next(ln for ln in listing.stdout.splitlines() if ln.strip().startswith("baseline "))
    metric = next(ln for ln in listing.stdout.splitlines() if ln.strip().startswith("demo_fidelity "))
    assert "version=demo_fidelity-v1" in metric and "from=entry point cb-plugin-demo 0.1.0" in metric

    out = tmp_path / "run"
    run = _bench(["run", "methods=demo_gain,baseline", "budget=smoke", "seeds=0", "metrics=canny_f1,demo_fidelity",
                  "--quiet", "--out", str(out)], env)
    assert run.returncode == 0, run.stderr[-3000:]
    with Store(out / "store.sqlite", read_only=True) as store:
        records = {r.method: r for r in store.records()}
    assert set(records) == {"demo_gain", "baseline"} and all(r.finished for r in records.values())
    demo = records["demo_gain"]
    assert demo.spec["method_version"] == "demo_gain-v1" and demo.compute["params_trainable"] == 1
    assert demo.metric_meta["demo_fidelity"]["version"] == "demo_fidelity-v1" and "demo_fidelity" in demo.metrics
    assert demo.versions["plugin:cb-plugin-demo"] == "0.1.0"  # the record names the plugin code
    assert demo.machine["torch"]  # and the machine it ran on

    contract = _bench(["test-method", "demo_gain", "-x"], env)
    assert contract.returncode == 0, contract.stdout[-3000:] + contract.stderr[-2000:]
    assert " passed" in contract.stdout and "failed" not in contract.stdout


def test_plugin_module_flag(tmp_path) -> None:
    mod_dir = tmp_path / "mods"
    (mod_dir / "my_methods").mkdir(parents=True)
    (mod_dir / "my_methods" / "__init__.py").write_text("")
    (mod_dir / "my_methods" / "gain.py").write_text(METHOD_FILE + textwrap.dedent('''
        from bench.core.registry import METHODS

        METHODS.register("flag_gain")(type("FlagGain", (DemoGain,), {"version": "flag_gain-v1"}))
    '''))
    env = _env(tmp_path, mod_dir)
    listing = _bench(["list", "--plugin", "my_methods.gain"], env)
    assert listing.returncode == 0, listing.stderr
    assert any(ln.strip().startswith("flag_gain ") and "from=--plugin my_methods.gain" in ln
               for ln in listing.stdout.splitlines())
    # the flag reaches the isolated run process (through CONTROLBENCH_PLUGINS), which resolves the method again
    out = tmp_path / "run"
    run = _bench(["run", "methods=flag_gain", "budget=smoke", "seeds=0", "budget.eval_samples=4", "metrics=canny_f1", "--quiet",
                  "--out", str(out), "--plugin=my_methods.gain"], env)
    assert run.returncode == 0, run.stderr[-3000:]
    with Store(out / "store.sqlite", read_only=True) as store:
        (rec,) = store.records()
    assert rec.finished and rec.versions["plugin:my_methods.gain"] == "unpackaged"


@pytest.mark.parametrize("argv", [["list", "--plugin", "no_such_pkg.methods"],
                                  ["run", "budget=smoke", "--plugin=no_such_pkg.methods"]])
def test_unknown_plugin_module_is_one_line(argv, tmp_path) -> None:
    res = _bench(argv, _env(tmp_path))
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1, err
    assert "--plugin no_such_pkg.methods: cannot import it" in err and "PYTHONPATH" in err


def test_broken_entry_point_is_one_line(tmp_path) -> None:
    """A hand-written dist-info (no build step) whose entry point names a missing module."""
    site = tmp_path / "site"
    info = site / "cb_broken-0.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: cb-broken\nVersion: 0.2\n")
    (info / "entry_points.txt").write_text("[controlbench.methods]\nbroken = cb_broken_missing.methods\n")
    res = _bench(["list"], _env(tmp_path, site))
    err = res.stderr.strip()
    assert res.returncode == 2 and len(err.splitlines()) == 1, err
    assert "plugin 'broken'" in err and "cb-broken 0.2" in err and "uninstall" in err
    assert json.dumps(err)  # plain text
