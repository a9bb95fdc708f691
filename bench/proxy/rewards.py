"""Reward models for reward-guided training (ControlNet++): differentiable per-sample losses
between generated images and the input condition.

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

from bench.proxy.analyzers import DEPTHNET, REWARD_DEPTHNET, REWARD_SEGNET, SEGNET, Analyzer
from bench.registry import Registry
from bench.types import Batch

REWARDS: Registry = Registry("reward model")
DEFAULT_REWARD = {"canny": "soft_edges", "seg": "reward_segnet", "depth": "reward_depthnet"}


class RewardModel(nn.Module):
    """`loss(images, batch)`: images float [B,3,H,W] in [0,1] (gradients flow back to them)
    -> per-sample loss [B], lower = more consistent with the batch's condition."""

    model_id: str  # compared against metrics' evaluator_ids; must differ from them
    condition: str  # "canny" | "seg" | "depth"

    def loss(self, images: Tensor, batch: Batch) -> Tensor:
        raise NotImplementedError


def _need(mapping: dict, key: str, where: str) -> Tensor:
    if key not in mapping:
        raise KeyError(f"this reward needs batch.{where}[{key!r}]; the batch has {sorted(mapping)}")
    return mapping[key]


class SoftEdges(RewardModel):
    """Differentiable Canny-like edges: Sobel magnitude of the grayscale image (0-255 scale),
    a soft threshold times a soft non-maximum suppression along the gradient direction, scored
    by binary cross-entropy against the canny map. Without the suppression Sobel edges are two
    pixels wide and the loss prefers blurred images to the true one."""

    model_id = "sobel-soft-edges-v1"
    condition = "canny"
    _NEIGHBOURS = ((0, 1), (1, 1), (1, 0), (1, -1))  # (dy, dx) for gradient angles 0, 45, 90, 135 degrees

    def __init__(self, threshold: float = 90.0, temperature: float = 20.0, nms_temperature: float = 10.0):
        super().__init__()
        self.threshold, self.temperature, self.nms_temperature = threshold, temperature, nms_temperature
        kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
        self.register_buffer("sobel", torch.stack([kx, kx.T])[:, None], persistent=False)
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1), persistent=False)

    def edge_log_prob(self, images: Tensor) -> Tensor:
        """log P(edge) [B,H,W]."""
        gray = (images.to(self.luma) * self.luma).sum(1, keepdim=True) * 255
        grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), self.sobel)
        mag = grad.square().sum(1).add(1e-6).sqrt()
        direction = (torch.atan2(grad[:, 1], grad[:, 0]) / (math.pi / 4)).round().long() % 4
        h, w = mag.shape[-2:]
        p = F.pad(mag[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]
        neighbour_max = torch.stack([torch.maximum(p[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w],
                                                   p[:, 1 - dy:1 - dy + h, 1 - dx:1 - dx + w])
                                     for dy, dx in self._NEIGHBOURS], 1).gather(1, direction[:, None])[:, 0]
        return (F.logsigmoid((mag - self.threshold) / self.temperature)
                + F.logsigmoid((mag - neighbour_max) / self.nms_temperature))

    def loss(self, images: Tensor, batch: Batch) -> Tensor:
        target = _need(batch.conditions, "canny", "conditions")[:, 0].to(self.luma)
        log_p = self.edge_log_prob(images)
        log_not_p = torch.log(-torch.expm1(log_p.clamp(max=-1e-6)))
        return -(target * log_p + (1 - target) * log_not_p).mean((1, 2))


class AnalyzerReward(RewardModel):
    """A shipped learned analyzer's per-sample loss: cross-entropy vs batch.refs['semantic']
    for seg, L1 on depth/255 vs batch.conditions['depth'] for depth."""

    def __init__(self, analyzer: Analyzer):
        super().__init__()
        self.net = analyzer.load()  # GroupNorm and no dropout: a parent's train() changes nothing
        self.model_id, self.condition = analyzer.model_id, analyzer.task

    def loss(self, images: Tensor, batch: Batch) -> Tensor:
        out = self.net(images)
        if self.condition == "depth":
            target = _need(batch.conditions, "depth", "conditions")[:, 0].to(out)
            return (out[:, 0] - target).abs().mean((1, 2))
        target = _need(batch.refs, "semantic", "refs").to(out.device).long()
        return F.cross_entropy(out, target, reduction="none").mean((1, 2))


def _frozen(build, *args) -> RewardModel:
    return build(*args).eval().requires_grad_(False)


REWARDS.register("soft_edges")(partial(_frozen, SoftEdges))
for _name, _analyzer in (("reward_segnet", REWARD_SEGNET), ("reward_depthnet", REWARD_DEPTHNET),
                         ("segnet_eval", SEGNET), ("depthnet_eval", DEPTHNET)):
    REWARDS.register(_name)(partial(_frozen, AnalyzerReward, _analyzer))


def reward_for(name: str) -> RewardModel:
    """A frozen reward model by name (did-you-mean on unknown names)."""
    return REWARDS.get(name)()
