"""Forward and backward through the frozen UNet, updating nothing of it: the second reading of
ControlNet's "compared to optimizing SD without ControlNet" (the backward a control branch
forces through the locked UNet). One trainable scalar on the UNet input gives the backward a
leaf to reach, through every UNet layer."""
from __future__ import annotations

import torch
from torch import nn

from bench.api.method import Method
from bench.core.registry import METHODS


@METHODS.register("frozen")
class FrozenBackward(Method):
    version = "frozen-v2"  # v2: the base recipe's optimizer (ControlNet's: weight decay 1e-2)
    no_checkpoint = "a profiling reference (bench profile, the ControlNet claims), not a method anyone deploys"

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.input_gain = nn.Parameter(torch.ones(()))

    def denoise(self, x, t, embeds, state):
        return super().denoise(x * self.input_gain, t, embeds, state)

    def inference_parameters(self) -> int:
        return 0  # a profiling reference, not a method to deploy
