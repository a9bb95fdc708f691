"""Registry, Budget, spec resolution, the shapes world and the shipped proxy files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.core.budget import Budget, load_budgets
from bench.core.errors import ConfigError
from bench.core.registry import Registry, UnknownNameError
from bench.run.spec import apply_overrides, load_config, parse_overrides, resolve


def test_registry_did_you_mean_and_duplicates():
    reg: Registry = Registry("thing")
    reg.register("controlnet")(1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("controlnet")(2)
    with pytest.raises(UnknownNameError, match="did you mean 'controlnet'"):
        reg.get("contrlnet")
    assert reg.names() == ["controlnet"] and "controlnet" in reg


def test_registry_sets_the_name_once():
    from dataclasses import dataclass

    reg: Registry = Registry("thing")

    @reg.register("parent")
    class Parent:
        pass

    @reg.register("child")
    class Child(Parent):  # an inherited name is replaced, not an error
        pass

    @dataclass(frozen=True)
    class Extractor:
        version: str = "v1"

    named = reg.register("frozen")(Extractor())
    assert (Parent.name, Child.name, named.name) == ("parent", "child", "frozen")
    assert reg.register("same")(type("Same", (), {"name": "same"})).name == "same"
    with pytest.raises(ValueError, match="names itself 'other'"):
        reg.register("thing")(type("Other", (), {"name": "other"}))
    assert "thing" not in reg


def test_budget_key_hashes_numbers_not_name():
    b = load_budgets()["quick"]
    assert b.key() == Budget(**{**vars(b), "name": "renamed"}).key()
    assert b.key() != b.with_overrides({"train_steps": b.train_steps + 1}).key()
    assert b.key() != b.with_overrides({"guidance_scale": 5.0}).key()
    with pytest.raises(ConfigError, match="unknown budget field 'train_step'"):
        b.with_overrides({"train_step": 3})


def test_budgets_file_has_smoke_and_quick():
    budgets = load_budgets()
    assert {"smoke", "quick"} <= set(budgets)
    assert budgets["smoke"].train_steps < budgets["quick"].train_steps


def test_override_forms_are_equivalent():
    forms = [["budget=smoke", "seeds=0,1"], ["--budget=smoke", "--seeds=0,1"], ["--budget", "smoke", "--seeds", "0,1"]]
    parsed = [parse_overrides(f) for f in forms]
    assert parsed[0] == parsed[1] == parsed[2] == [("budget", "smoke"), ("seeds", "0,1")]
    cfg = apply_overrides(load_config(None), parsed[0])
    assert cfg["seeds"] == [0, 1] and cfg["budget"] == "smoke"


def test_run_id_is_stable_and_changes_with_the_spec():
    cfg = load_config(None)
    a, _ = resolve(apply_overrides(cfg, [("budget", "smoke")]))
    b, _ = resolve(apply_overrides(cfg, [("budget", "smoke")]))
    assert [s.run_id for s in a] == [s.run_id for s in b]
    assert len({s.run_id for s in a}) == len(a)
    c, _ = resolve(apply_overrides(cfg, [("budget", "smoke"), ("hparams.controlnet.conditioning_scale", 0.5)]))
    changed = {s.method for s, t in zip(a, c) if s.run_id != t.run_id}
    assert changed == {"controlnet"}
    spec = a[0]
    assert type(spec).from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_shapes_world_is_deterministic_with_disjoint_splits():
    from bench.datasets.shapes import ShapesWorld, image_digest

    train = ShapesWorld("train", 300, 32, seed=0, conditions=("canny", "seg"))
    again = ShapesWorld("train", 300, 32, seed=0)
    assert np.array_equal(train.scene(17).image, again.scene(17).image)
    evals = ShapesWorld("eval", 100, 32, seed=0)
    train_digests = {image_digest(train.scene(i).image) for i in range(300)}
    assert not train_digests & {image_digest(evals.scene(i).image) for i in range(100)}
    item = train[3]
    scene = train.scene(3)
    assert item.image.shape == (1, 3, 32, 32) and 0 <= item.image.min() and item.image.max() <= 1
    assert set(item.conditions) == {"canny", "seg"}
    # boxes are the exact extents of each visible instance mask
    for z, box in enumerate(scene.boxes):
        ys, xs = np.nonzero(scene.instance == z + 1)
        assert list(box) == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    for obj in scene.objects:
        assert f"{obj.color} {obj.shape}" in scene.prompt


def test_canny_condition_is_opencv_canny():
    import cv2
    from bench.datasets.conditions import Canny, to_uint8
    from bench.datasets.shapes import ShapesWorld

    b = ShapesWorld("eval", 1, 32, seed=0, conditions=("canny",))[0]
    gray = cv2.cvtColor(to_uint8(b.image)[0], cv2.COLOR_RGB2GRAY)
    ref = cv2.Canny(gray, Canny().low, Canny().high) > 0
    assert torch.equal(b.conditions["canny"][0, 0] > 0.5, torch.from_numpy(ref))
    assert ref.sum() > 10


def test_shipped_proxy_base_matches_code_config():
    from bench.core.bases import PROXY_BASE_DIR
    from bench.proxy.base import config_hash

    meta = json.loads((PROXY_BASE_DIR / "controlbench.json").read_text())
    assert meta["config_hash"] == config_hash(), "shipped proxy base is stale: run `bench pretrain`"
    size = sum(p.stat().st_size for p in PROXY_BASE_DIR.parent.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_shipped_tokenizer_files_are_what_the_code_writes(tmp_path):
    """bench.api.arch reads the shipped vocab/merges instead of importing the proxy package."""
    from bench.core.bases import PROXY_BASE_DIR
    from bench.proxy.base import write_tokenizer_files

    write_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (PROXY_BASE_DIR / "tokenizer" / name).read_bytes(), name


def test_package_namespacing(tmp_path):
    """Only `bench` is installed: no top-level datasets/metrics/methods to shadow other packages."""
    import subprocess
    import sys

    code = ("import importlib.util as u, bench.datasets, bench.methods, bench.metrics; "
            "print([m for m in ('methods', 'metrics') if u.find_spec(m)]); print(bench.datasets.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.split("\n")[:2] == ["[]", "bench.datasets"]
