"""ControlNet++'s official reward losses and recipe (liming-ai/ControlNet_Plus_Plus @ 9ffe264):
each loss against a hand-computed case, per-condition weights, prompt dropout by phase."""
from __future__ import annotations

import dataclasses
import math

import bench.methods  # noqa: F401  (registers the methods)
import pytest
import torch
from bench.datasets.shapes import ShapesWorld
from bench.methods.controlnet_pp import OFFICIAL_REWARD_WEIGHT

from bench.api.types import Batch, collate
from bench.core.errors import ConfigError
from bench.core.registry import METHODS
from bench.proxy.rewards import (
    DEFAULT_REWARD,
    CannyMagnitude,
    canny_magnitude,
    depth_reward_loss,
    reward_for,
    seg_reward_loss,
)


def _batch(n: int, conditions=("canny",)) -> Batch:
    world = ShapesWorld("train", n, 32, seed=0, conditions=conditions)
    return collate([world[i] for i in range(n)])


# ------------------------------------------------------------------------------------ canny
def _profile(values: list[float], rows: int = 5) -> torch.Tensor:
    return torch.tensor(values).expand(rows, -1)[None, None].clone()  # [1,1,rows,W], constant along y


def test_canny_magnitude_by_hand_without_blur():
    # Rows 0 0 0 1 3 3 3 3: unnormalised Sobel (replicate border) gx = 4 * (v[x+1] - v[x-1]) =
    # 0 0 4 12 8 0 0 0, gy = 0; only x=3 beats both x-neighbours (12 > 4, 12 > 8). Flat pixels tie
    # at sqrt(eps) and the strict comparison drops them, the border too (zero padding < sqrt(eps) is
    # beaten, but its inner neighbour ties).
    mag = canny_magnitude(_profile([0, 0, 0, 1, 3, 3, 3, 3]), kernel_size=1)
    expected = torch.zeros(1, 1, 5, 8)
    expected[..., 3] = math.sqrt(144 + 1e-6)
    torch.testing.assert_close(mag, expected)
    flipped = canny_magnitude(_profile([3, 3, 3, 3, 1, 0, 0, 0]), kernel_size=1)  # angle 180: same neighbours
    torch.testing.assert_close(flipped, expected.flip(-1))


def test_canny_magnitude_matches_kornia_canny_on_tie_free_images():
    # kornia's canny() differs from the official copy only on exact ties and flat borders,
    # which random images do not have; it blurs with the same (5, 5), sigma 1 defaults.
    from kornia.filters import canny

    images = torch.rand(3, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    ours = canny_magnitude(images)
    assert (ours > 0).float().mean() > 0.2
    torch.testing.assert_close(ours, canny(images, 0.1, 0.2, hysteresis=False)[0], rtol=0, atol=0)


def test_canny_reward_is_mse_against_the_ground_truth_images_magnitude():
    g = torch.Generator().manual_seed(1)
    generated, truth = torch.rand(2, 3, 16, 16, generator=g), torch.rand(2, 3, 16, 16, generator=g)
    batch = Batch(ids=["a", "b"], image=truth, prompts=["", ""],
                  conditions={"canny": torch.ones(2, 3, 16, 16)})  # the condition map is not read
    loss = CannyMagnitude().loss(generated, batch)
    expected = [((canny_magnitude(generated[i:i + 1]) - canny_magnitude(truth[i:i + 1])) ** 2).mean() for i in range(2)]
    torch.testing.assert_close(loss, torch.stack(expected))
    assert CannyMagnitude().loss(truth, batch).abs().max() == 0


# -------------------------------------------------------------------------------- seg, depth
def test_seg_loss_is_cross_entropy_over_the_pixels_not_ignored():
    logits = torch.zeros(2, 2, 1, 3)
    logits[0, 1, 0, 0] = math.log(3)  # pixel 0: p(class 0) = 1/4
    logits[0, :, 0, 2] = torch.tensor([5.0, -5.0])  # ignored pixel: would cost ~10
    labels = torch.tensor([[[0, 1, 255]], [[255, 255, 255]]])
    loss = seg_reward_loss(logits, labels)
    torch.testing.assert_close(loss, torch.tensor([(math.log(4) + math.log(2)) / 2, 0.0]))


def test_depth_loss_is_mse_of_max_normalised_maps():
    pred = torch.tensor([[[2.0, 4.0]], [[-1.0, 2.0]], [[1.0, 1.0]]])  # [B=3,H=1,W=2]
    label = torch.zeros(3, 3, 1, 2)
    label[0, :, 0, 0] = torch.tensor([0.3, 0.3, 0.0])  # channel mean 0.2
    label[0, :, 0, 1] = 0.1
    label[1, :, 0, 1] = 0.5  # -> [0, 1]; pred clamps to [0, 2] -> [0, 1]
    loss = depth_reward_loss(pred, label)  # sample 2: an object-free label, all 0
    torch.testing.assert_close(loss, torch.tensor([(0.5 ** 2 + 0.5 ** 2) / 2, 0.0, 1.0]))


def test_depth_reward_runs_the_net_then_the_normalised_mse():
    batch = _batch(3, conditions=("depth",))
    reward = reward_for(DEFAULT_REWARD["depth"])
    with torch.no_grad():
        expected = depth_reward_loss(reward.net(batch.image)[:, 0], batch.conditions["depth"])
        torch.testing.assert_close(reward.loss(batch.image, batch), expected)


# ---------------------------------------------------------------------------------- recipe
def test_reward_weight_defaults_to_the_conditions_official_weight(proxy, smoke_budget):
    assert OFFICIAL_REWARD_WEIGHT == {"canny": 1.0, "depth": 1.0, "hed": 1.0, "lineart": 0.5, "seg": 0.2}
    cls = METHODS.get("controlnet_pp")
    assert cls.make_recipe({}).reward_weight is None and cls.make_recipe({}).reward_t_max == 200
    for condition, weight in (("canny", 1.0), ("seg", 0.2), ("depth", 1.0)):
        assert cls(proxy, condition, smoke_budget, {}).reward_weight == weight
    assert cls(proxy, "seg", smoke_budget, {"reward_weight": 0.7}).reward_weight == 0.7
    with pytest.raises(ConfigError, match="reward_empty_prompt_prob"):
        cls.make_recipe({"reward_empty_prompt_prob": 1.5})


def test_training_loss_adds_the_weighted_reward(proxy, smoke_budget):
    method = METHODS.get("controlnet_pp")(proxy, "canny", smoke_budget, {"reward_start": 0.0, "reward_t_max": 1000})
    batch = _batch(2)

    def seeded(fn):
        torch.manual_seed(3)
        with torch.no_grad():
            return fn()

    n = seeded(lambda: method.noised_prediction(batch))
    reward = method.reward_loss(n, batch).detach()
    assert reward > 0
    official = seeded(lambda: method.training_loss(batch))  # canny: weight 1.0
    method.recipe = dataclasses.replace(method.recipe, reward_weight=3.0)
    tripled = seeded(lambda: method.training_loss(batch))
    torch.testing.assert_close(official, method.diffusion_loss(n) + reward)
    torch.testing.assert_close(tripled - official, 2 * reward)


@pytest.mark.parametrize("reward_start, expected", [(0.5, 0.5), (0.0, 0.0)])
def test_prompt_dropout_is_half_before_the_reward_phase_and_zero_in_it(proxy, smoke_budget, reward_start, expected):
    method = METHODS.get("controlnet_pp")(proxy, "canny", smoke_budget, {"reward_start": reward_start})
    assert method.reward_on == (expected == 0.0)  # step 0 of the budget
    torch.manual_seed(0)
    drops = method.draw_drops(4000)
    assert not drops.image.any()
    assert drops.text.float().mean().item() == pytest.approx(expected, abs=0.03)


def test_version_bumped():
    assert METHODS.get("controlnet_pp").version == "controlnet_pp-v3"
