"""Reward models for reward-guided training (ControlNet++): differentiable per-sample losses
between generated images and the batch's ground truth, computed as the official reward script
computes them (liming-ai/ControlNet_Plus_Plus @ 9ffe264, train/reward_control.py, the "Rewarding
ControlNet" block of main(), and train/utils.py get_reward_loss):

- canny: MSE between the NMS'd Canny gradient magnitudes of the generated and the ground-truth
  image (train/canny_tools.py canny(), kornia's canny of the time).
- seg: cross-entropy of the segmenter's logits against the label map, ignore_index=255, averaged
  over the non-ignored pixels.
- depth: MSE between predicted and condition depth, each divided by its per-image maximum.

Each default reward is a different model from the evaluator that scores its condition
(a different algorithm for canny; a different seed AND architecture for seg and depth), so a
method cannot win by exploiting the metric's own model. `segnet_eval` and `depthnet_eval`
wrap the EVALUATOR nets and carry the evaluator's model_id; they exist so a user can
configure them (e.g. to reproduce that failure), and the harness refuses a run whose reward
model_id is among its metrics' `evaluator_ids`.
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.api.types import Batch
from bench.core.registry import Registry
from bench.proxy.analyzers import (
    DEPTHNET,
    REWARD_DEPTHNET,
    REWARD_SEGNET,
    SEGNET,
    Analyzer,
)

REWARDS: Registry = Registry("reward model")
DEFAULT_REWARD = {"canny": "canny_magnitude", "seg": "reward_segnet", "depth": "reward_depthnet"}
IGNORE_INDEX = 255  # train/utils.py get_reward_loss: cross_entropy(..., ignore_index=255)


class RewardModel(nn.Module):
    """`loss(images, batch)`: images float [B,3,H,W] in [0,1] (gradients flow back to them)
    -> per-sample loss [B], lower = more consistent with the batch's ground truth."""

    model_id: str  # compared against metrics' evaluator_ids; must differ from them
    condition: str  # "canny" | "seg" | "depth"

    def loss(self, images: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError


def _need(mapping: dict, key: str, where: str) -> Tensor:
    if key not in mapping:
        raise KeyError(f"this reward needs batch.{where}[{key!r}]; the batch has {sorted(mapping)}")
    return mapping[key]


# ------------------------------------------------------------------------------------ canny
def canny_magnitude(images: Tensor, kernel_size: int = 5, sigma: float = 1.0, eps: float = 1e-6) -> Tensor:
    """[B,3,H,W] in [0,1] -> the NMS'd gradient magnitude [B,1,H,W], differentiable in `images`.

    Official train/canny_tools.py canny(), built from the same kornia calls: grayscale,
    gaussian_blur2d((5, 5), (1, 1)), unnormalised Sobel, magnitude sqrt(gx^2 + gy^2 + eps),
    angle rounded to 45 degrees, and a pixel kept only where it is strictly larger than both
    neighbours along that direction (zero-padded conv with kornia's NMS kernels). The reward
    reads only this magnitude (outputs[0]), so the thresholds and hysteresis play no part.
    kornia >= 0.8's own canny() breaks ties and pads the border differently; we follow the
    official copy."""
    from kornia.color import rgb_to_grayscale
    from kornia.filters import gaussian_blur2d, spatial_gradient
    from kornia.filters.kernels import get_canny_nms_kernel

    gray = rgb_to_grayscale(images) if images.shape[1] == 3 else images
    blurred = gaussian_blur2d(gray, (kernel_size, kernel_size), (sigma, sigma))
    grad = spatial_gradient(blurred, normalized=False)
    gx, gy = grad[:, :, 0], grad[:, :, 1]
    magnitude = torch.sqrt(gx * gx + gy * gy + eps)
    angle = 180.0 * torch.atan2(gy, gx) / math.pi  # the official's operation order, so ties round alike
    direction = torch.round(angle / 45)
    kernels = get_canny_nms_kernel(images.device, magnitude.dtype)
    differences = F.conv2d(magnitude, kernels, padding=kernels.shape[-1] // 2)  # [B,8,H,W]: pixel - neighbour k
    positive = torch.gather(differences, 1, (direction % 8).long())
    negative = torch.gather(differences, 1, ((direction + 4) % 8).long())
    is_max = torch.minimum(positive, negative) > 0.0
    return magnitude * is_max


class CannyMagnitude(RewardModel):
    """Official canny reward: per-sample mean squared difference between the NMS'd Canny
    magnitudes of the generated image and of the ground-truth image `batch.image`
    (reward_control.py: labels = reward_model(denormalised training image)[0]; utils.py:
    mse_loss(reduction="none").mean(2).mean((-1, -2)), i.e. the mean over pixels).
    Not the cv2 canny map the metric reads: the official compares magnitudes, not edges."""

    model_id = "kornia-canny-nms-magnitude-k5s1-v1"
    condition = "canny"

    def loss(self, images: Tensor, batch: Batch) -> Tensor:
        with torch.no_grad():
            target = canny_magnitude(batch.image.to(images.device, images.dtype))
        return (canny_magnitude(images) - target).square().mean((1, 2, 3))


# -------------------------------------------------------------------------------- seg, depth
def seg_reward_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """logits [B,C,H,W], int labels [B,H,W] -> per-sample CE averaged over the pixels whose label
    is not IGNORE_INDEX (reward_control.py: background_mask = labels != 255; sum / (count + 1e-10))."""
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    keep = (labels != IGNORE_INDEX).to(ce.dtype)
    return (ce * keep).sum((1, 2)) / (keep.sum((1, 2)) + 1e-10)


def depth_reward_loss(pred: Tensor, label: Tensor, floor: float = 1e-6) -> Tensor:
    """pred [B,H,W] (the depth head's output), label [B,3,H,W] depth image -> per-sample MSE after
    dividing each by its own maximum (reward_control.py: outputs / amax per image; labels =
    labels.mean(dim=1) / max per image). The prediction is clamped at 0, as DPT's head ends in
    a ReLU (the official reward model is Intel/dpt-hybrid-midas); `floor` keeps an image with no
    object (label all 0) or a blank prediction from dividing by zero, where the official would NaN."""
    pred = pred.clamp_min(0)
    label = label.mean(1)
    pred = pred / pred.flatten(1).amax(1).clamp_min(floor).view(-1, 1, 1)
    label = label / label.flatten(1).amax(1).clamp_min(floor).view(-1, 1, 1)
    return (pred - label).square().mean((1, 2))


class AnalyzerReward(RewardModel):
    """A shipped learned analyzer as the official seg/depth reward: seg reads the label map
    batch.refs['semantic'] (every pixel labelled: background is class 0, scored by seg_miou, so
    no pixel carries the ignore label), depth reads batch.conditions['depth']."""

    def __init__(self, analyzer: Analyzer):
        super().__init__()
        self.net = analyzer.load()  # GroupNorm and no dropout: a parent's train() changes nothing
        self.model_id, self.condition = analyzer.model_id, analyzer.task

    def loss(self, images: Tensor, batch: Batch) -> Tensor:
        out = self.net(images)
        if self.condition == "depth":
            return depth_reward_loss(out[:, 0], _need(batch.conditions, "depth", "conditions").to(out))
        return seg_reward_loss(out, _need(batch.refs, "semantic", "refs").to(out.device).long())


def _frozen(build, *args) -> RewardModel:
    return build(*args).eval().requires_grad_(False)


REWARDS.register("canny_magnitude")(partial(_frozen, CannyMagnitude))
for _name, _analyzer in (("reward_segnet", REWARD_SEGNET), ("reward_depthnet", REWARD_DEPTHNET),
                         ("segnet_eval", SEGNET), ("depthnet_eval", DEPTHNET)):
    REWARDS.register(_name)(partial(_frozen, AnalyzerReward, _analyzer))


def reward_for(name: str) -> RewardModel:
    """A frozen reward model by name (did-you-mean on unknown names)."""
    return REWARDS.get(name)()
