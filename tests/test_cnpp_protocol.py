"""ControlNet++'s protocol: the canny the model is fed under `canny_f1_cnpp` is the kornia map the metric
re-extracts (its name and version say so), the reward phase feeds the thresholded magnitude, and ControlNet++
fine-tunes the same seed's finished controlnet run, which its record names."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import bench.datasets  # noqa: F401
import bench.methods  # noqa: F401
import bench.metrics  # noqa: F401
from bench.core.paths import CONFIGS_DIR
from bench.core.registry import CONDITIONS, DATASETS, METHODS, METRICS
from bench.datasets.conditions import KORNIA_CANNY, KorniaCanny
from bench.run.spec import apply_overrides, load_config, resolve
from tests.test_folders import make_multigen


def test_the_protocol_config_feeds_the_condition_its_metric_scores():
    cfg = load_config(CONFIGS_DIR / "controlnet_pp_eval.yaml")
    metric = METRICS.get("canny_f1_cnpp")
    assert "canny_f1_cnpp" in cfg["metrics"] and cfg["condition"] == metric.condition == "canny_kornia"
    assert CONDITIONS.get("canny_kornia") is KORNIA_CANNY and metric().extractor is KORNIA_CANNY


def test_the_model_input_is_bit_equal_to_the_kornia_map_the_metric_reextracts(tmp_path, monkeypatch):
    """On the protocol's dataset (a MultiGen-layout shard; canny_kornia has no stored column, so it is
    extracted from the real image the sample carries) and on the shapes world: the condition a method
    reads equals, bit for bit, the map canny_f1_cnpp computes from the real image as its target."""
    pytest.importorskip("pyarrow")
    make_multigen(tmp_path / "mg")
    monkeypatch.setenv("CONTROLBENCH_DATA_MULTIGEN", str(tmp_path / "mg"))
    metric = METRICS.get("canny_f1_cnpp")()
    for dataset in (DATASETS.get("multigen")(split="eval", size=3, resolution=32, conditions=("canny_kornia",)),
                    DATASETS.get("shapes")("eval", 4, 32, ("canny_kornia",), seed=0)):
        for i in range(len(dataset)):
            sample = dataset[i]
            fed = sample.conditions["canny_kornia"]
            target = metric.extractor.edges(sample.image)
            assert torch.equal(fed, target.float()[:, None].expand(-1, 3, -1, -1))
            assert torch.equal(fed, metric.reextract(sample.image, sample))
        assert any(dataset[i].conditions["canny_kornia"].any() for i in range(len(dataset)))  # not all blank
    cv2_map = DATASETS.get("shapes")("eval", 1, 32, ("canny",), seed=0)[0].conditions["canny"]
    assert not torch.equal(cv2_map, DATASETS.get("shapes")("eval", 1, 32, ("canny_kornia",), seed=0)[0]
                           .conditions["canny_kornia"])  # the harness's cv2 canny is another map


def test_the_canny_versions_are_built_from_the_thresholds():
    """Changing a threshold changes the edges and every version naming them; the metric's version and
    evaluator id carry the thresholds the operator actually uses."""
    metric = METRICS.get("canny_f1_cnpp")
    low, high = KORNIA_CANNY.low, KORNIA_CANNY.high
    assert f"-{low}-{high}-" in KORNIA_CANNY.version and KORNIA_CANNY.version in metric.version
    assert metric.evaluator_ids == (f"kornia-canny-{low}-{high}",)
    assert (low, high) == (0.1, 0.2)  # ControlNet++ eval/eval.py L176-177
    other = dataclasses.replace(KORNIA_CANNY, high=0.6)
    assert other.version != KORNIA_CANNY.version
    step = torch.full((1, 3, 32, 32), 0.3)
    step[..., 16:] += 0.15  # a faint edge: above 0.2's hysteresis, below 0.6's
    assert KORNIA_CANNY.edges(step).any() and not other.edges(step).any()
    assert KorniaCanny().version == KORNIA_CANNY.version


def test_canny_f1_cnpp_scores_both_canny_inputs_and_names_each():
    metric = METRICS.get("canny_f1_cnpp")
    assert metric.scores("canny_kornia") and metric.scores("canny") and not metric.scores("seg")
    assert not METRICS.get("canny_f1").scores("canny_kornia")  # cv2 re-extraction: only its own input


def test_the_reward_phase_feeds_the_thresholded_magnitude(proxy, smoke_budget):
    """reward_control.py L1370: the ControlNet's input is canny_tools.canny(image, 0.1, 0.2)[1], the NMS'd
    magnitude where it exceeds 0.1 (canny_tools.py L119), on 3 channels; reward_input "condition" keeps the batch."""
    from bench.api.types import collate
    from bench.proxy.rewards import canny_magnitude

    world = DATASETS.get("shapes")("train", 2, 32, ("canny_kornia",), seed=0)
    batch = collate([world[i] for i in range(2)])
    method = METHODS.get("controlnet_pp")(proxy, "canny_kornia", smoke_budget, {})
    fed = method.reward_phase_input(batch).conditions["canny_kornia"]
    magnitude = canny_magnitude(batch.image)
    assert fed.shape == batch.image.shape and torch.equal(fed[:, 0], fed[:, 2])
    kept = magnitude[:, 0] > 0.1
    assert kept.any() and torch.equal(fed[:, 0][kept], magnitude[:, 0][kept]) and not fed[:, 0][~kept].any()
    assert fed.max() > 1  # magnitudes, not a binary map
    same = METHODS.get("controlnet_pp")(proxy, "canny_kornia", smoke_budget, {"reward_input": "condition"})
    assert same.reward_phase_input(batch) is batch


def _specs(base_dir, tmp_path, **over):
    pairs = [("budget", "smoke"), ("base_model", str(base_dir)), ("out_dir", str(tmp_path / "out")), ("seeds", [0]),
             ("metrics", ["canny_f1"])]
    return resolve(apply_overrides(load_config(None), pairs + list(over.items())))


def test_controlnet_pp_starts_from_the_same_seeds_controlnet_run(proxy_arch_dir, tmp_path):
    """The init run is planned first (once, whether or not the config lists controlnet); the control row
    (controlnet with init_from) starts from the same run."""
    specs, _ = _specs(proxy_arch_dir, tmp_path, methods=["controlnet_pp"])
    assert [s.method for s in specs] == ["controlnet", "controlnet_pp"]
    plain, pp = specs
    assert pp.init_run == plain.run_id and not plain.init_run and dict(plain.recipe)["init_from"] == ""
    assert (plain.seed, plain.budget, plain.condition, plain.dataset) == (pp.seed, pp.budget, pp.condition, pp.dataset)
    both, _ = _specs(proxy_arch_dir, tmp_path, methods=["controlnet_pp", "controlnet"],
                     hparams={"controlnet": {"init_from": "controlnet"}})
    assert [s.method for s in both] == ["controlnet", "controlnet_pp", "controlnet"]
    assert both[0] == plain and both[1] == pp and both[2].init_run == plain.run_id
    released, _ = _specs(proxy_arch_dir, tmp_path, methods=["controlnet_pp"], budget={"name": "smoke", "train_steps": 0})
    assert [s.method for s in released] == ["controlnet_pp"] and not released[0].init_run


def test_a_controlnet_pp_record_names_the_controlnet_run_it_started_from(proxy_arch_dir, tmp_path):
    from diffusers import ControlNetModel

    from bench.core.errors import ConfigError
    from bench.core.store import Store
    from bench.run.execute import build
    from bench.run.runner import run_specs

    (plain, pp), out = _specs(proxy_arch_dir, tmp_path, methods=["controlnet_pp"])
    with pytest.raises(ConfigError, match=f"starts from run {plain.run_id}.*runs that run first"):
        build(pp, out)  # not run yet: one line, before any training
    with Store(tmp_path / "store.sqlite") as store:
        records = run_specs([plain, pp], store, out, progress=False)
    assert [r.status for r in records] == ["FINISHED", "FINISHED"], [r.reason for r in records]
    assert records[1].spec["init_run"] == records[0].run_id == plain.run_id
    started = build(pp, out).method.controlnet  # what the ControlNet++ run trained from
    trained = ControlNetModel.from_pretrained(records[0].artifacts["checkpoint"])
    assert all(torch.equal(a, b) for a, b in zip(started.state_dict().values(), trained.state_dict().values()))
