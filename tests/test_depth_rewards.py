"""Depth condition, depth_rmse, evaluator identities and the ControlNet++ reward models."""
from __future__ import annotations

import dataclasses

import bench.metrics  # noqa: F401  (registers the metrics)
import numpy as np
import pytest
import torch
from bench.datasets.conditions import (
    MAX_OBJECTS,
    depth_from_scene,
    to_uint8,
)
from bench.datasets.shapes import ShapeObject, ShapesWorld, condition_from_scene, render
from bench.metrics.consistency import DepthRMSE, SegMIoU
from safetensors.torch import save_file

from bench.api.types import Batch, collate
from bench.core.registry import CONDITIONS, METRICS, UnknownNameError
from bench.proxy.analyzers import (
    DEPTHNET,
    REWARD_DEPTHNET,
    REWARD_SEGNET,
    SEGNET,
    analyzer_metadata,
    render_split,
)
from bench.proxy.rewards import DEFAULT_REWARD, REWARDS, canny_magnitude, reward_for

DEPTHNET_RMSE_BOUND = 32.0  # shipped depthnet: 27.0 on these 64 scenes, 27.2 on 256 (order-blind floor 23.7)


@pytest.fixture(scope="module")
def scenes() -> Batch:
    world = ShapesWorld("eval", 64, conditions=("canny", "depth"))
    return collate([world[i] for i in range(len(world))])


def _batch_like(images: torch.Tensor, **conditions: torch.Tensor) -> Batch:
    return Batch(ids=[str(i) for i in range(len(images))], image=images, prompts=[""] * len(images),
                 conditions=conditions)


# ------------------------------------------------------------------------- depth condition
def test_depth_condition_from_z_order_respects_occlusion() -> None:
    bottom = ShapeObject("square", "red", cx=13, cy=13, r=7, angle=0)
    top = ShapeObject("circle", "blue", cx=19, cy=19, r=7, angle=0)
    scene = render((bottom, top), 32)
    below, above = (render((o,), 32).instance > 0 for o in (bottom, top))
    assert (below & above).any() and (below & ~above).any()  # they overlap, and the bottom one still shows
    expected = np.where(above, 170, np.where(below, 85, 0))
    assert MAX_OBJECTS == 3 and np.array_equal(depth_from_scene(scene), expected)
    cond = condition_from_scene("depth", scene)
    assert cond.shape == (3, 32, 32) and cond.dtype == torch.float32
    assert (to_uint8(cond[None])[0] == expected[..., None]).all()  # exact at uint8, on all 3 channels
    with pytest.raises(TypeError, match="depth_rmse"):
        CONDITIONS.get("depth")(cond[None])


# ------------------------------------------------------------------------------ depth_rmse
def test_depth_rmse_matches_hand_computation_over_updates() -> None:
    g = torch.Generator().manual_seed(0)
    m, errors = DepthRMSE(estimator=lambda images: images[:, 0] * 255), []
    for b in (3, 5):
        images = torch.rand(b, 3, 8, 8, generator=g)
        cond = torch.randint(0, 4, (b, 1, 8, 8), generator=g).float().mul(85 / 255).expand(-1, 3, -1, -1)
        m.update(images, _batch_like(images, depth=cond))
        errors.append((images[:, 0].numpy().astype(np.float64) * 255 - cond[:, 0].numpy() * 255).ravel())
    assert m.compute().item() == pytest.approx(np.sqrt(np.mean(np.concatenate(errors) ** 2)), rel=1e-5)
    perfect = DepthRMSE(estimator=lambda images: images[:, :1] * 255)  # [B,1,H,W] is accepted too
    perfect.update(cond, _batch_like(cond, depth=cond))
    assert perfect.compute().item() == pytest.approx(0.0, abs=1e-4)
    assert DepthRMSE.higher_is_better is False and DepthRMSE.condition == "depth"
    assert DEPTHNET.config_hash() in DepthRMSE.version


def test_shipped_depthnet_on_real_eval_scenes(scenes: Batch) -> None:
    meta = analyzer_metadata(DEPTHNET.path)
    assert meta["config_hash"] == DEPTHNET.config_hash() and float(meta["eval_rmse"]) < DEPTHNET_RMSE_BOUND
    m = DepthRMSE()
    m.update(scenes.image, scenes)
    rmse = m.compute().item()
    blank = DepthRMSE()
    blank.update(torch.full_like(scenes.image, 245 / 255), scenes)
    assert rmse < DEPTHNET_RMSE_BOUND and blank.compute().item() > 2 * rmse


# --------------------------------------------------------------------------------- rewards
@pytest.fixture(scope="module")
def reward_batch(scenes: Batch) -> Batch:
    _, semantic = render_split("eval", 64)
    return dataclasses.replace(scenes, refs={**scenes.refs, "semantic": semantic})


@pytest.mark.parametrize("name", sorted(REWARDS.names()))
def test_reward_is_differentiable_and_prefers_the_true_image(name: str, reward_batch: Batch) -> None:
    reward = reward_for(name)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    # away from the true image: at it, a reward that compares against its own extraction (canny) is 0 with 0 gradient
    images = reward_batch.image.roll(1, 0).clone().requires_grad_(True)
    loss = reward.loss(images, reward_batch)
    assert loss.shape == (len(reward_batch),)
    loss.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with torch.no_grad():
        true = reward.loss(reward_batch.image, reward_batch)
        shuffled = reward.loss(reward_batch.image.roll(1, 0), reward_batch)
        blank = reward.loss(torch.full_like(reward_batch.image, 245 / 255), reward_batch)
    assert true.mean() < 0.5 * shuffled.mean() and true.mean() < 0.5 * blank.mean()
    assert (true < shuffled).float().mean() > 0.9


def test_canny_magnitude_ridges_agree_with_cv2_canny(scenes: Batch) -> None:
    pred = canny_magnitude(scenes.image)[:, 0] > 0.1  # the official's low threshold
    target = scenes.conditions["canny"][:, 0] > 0.5
    assert 2 * (pred & target).sum() / (pred.sum() + target.sum()) > 0.85  # measured 0.91


def test_reward_ids_never_equal_evaluator_ids_except_eval_wrappers() -> None:
    evaluator_ids = {i for name in METRICS.names() for i in METRICS.get(name).evaluator_ids}
    assert {"cv2-canny-60-120", SEGNET.model_id, DEPTHNET.model_id} <= evaluator_ids
    assert SegMIoU.evaluator_ids == (f"segnet-{SEGNET.config_hash()}",)
    ids = {name: reward_for(name).model_id for name in REWARDS.names()}
    assert len(set(ids.values())) == len(ids)
    for name, model_id in ids.items():
        assert (model_id in evaluator_ids) == name.endswith("_eval"), name
    for condition, name in DEFAULT_REWARD.items():
        assert reward_for(name).condition == condition


@pytest.mark.parametrize("reward, evaluator", [(REWARD_SEGNET, SEGNET), (REWARD_DEPTHNET, DEPTHNET)])
def test_reward_nets_differ_from_evaluators(reward, evaluator) -> None:
    assert reward.arch != evaluator.arch and reward.recipe["seed"] != evaluator.recipe["seed"]
    r, e = reward.load(), evaluator.load()
    assert r.head.weight.shape != e.head.weight.shape and r.mid[0].dilation != e.mid[0].dilation
    images, _ = render_split("eval", 8)
    assert not torch.allclose(r(images), e(images), atol=1e-2)
    meta = analyzer_metadata(reward.path)
    quality = float(meta.get("eval_miou", 0)) > 0.85 or float(meta.get("eval_rmse", 1e9)) < DEPTHNET_RMSE_BOUND
    assert meta["config_hash"] == reward.config_hash() and quality, meta


def test_wrong_config_hash_names_the_pretrain_command(tmp_path) -> None:
    with pytest.raises(ValueError, match="bench pretrain --analyzers") as err:
        SEGNET.load(REWARD_SEGNET.path)  # another analyzer's weights
    assert "\n" not in str(err.value)
    stale = tmp_path / "stale.safetensors"
    save_file({"w": torch.zeros(1)}, str(stale), metadata={"config_hash": "0" * 16})
    with pytest.raises(ValueError, match=r"config_hash 0{16}.*bench pretrain --analyzers"):
        REWARD_DEPTHNET.load(stale)


def test_training_round_trip_with_tiny_recipe(tmp_path) -> None:
    tiny = dataclasses.replace(DEPTHNET, recipe={**DEPTHNET.recipe, "steps": 3, "train_scenes": 16})
    path = tiny.train(tmp_path / "depthnet.safetensors")
    meta = analyzer_metadata(path)
    assert meta["config_hash"] == tiny.config_hash() != DEPTHNET.config_hash() and "eval_rmse" in meta
    assert tiny.load(path).depth(torch.rand(2, 3, 32, 32)).shape == (2, 32, 32)
    with pytest.raises(ValueError, match="bench pretrain --analyzers"):
        DEPTHNET.load(path)


def test_unknown_reward_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError, match="did you mean 'reward_segnet'"):
        reward_for("reward_segnt")
