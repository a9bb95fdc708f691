"""Full fine-tuning of the UNet: the cost reference ControlNet's "23% more memory, 34% more
time" is measured against (ControlNet §3.2). Trains a private copy, so a base shared with other
methods never changes."""
from __future__ import annotations

import copy

from bench.api.method import Method
from bench.core.registry import METHODS


@METHODS.register("finetune")
class FineTune(Method):
    version = "finetune-v1"
    no_checkpoint = "a profiling reference (bench profile, the ControlNet claims), not a method anyone deploys"

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.base = base.with_unet(copy.deepcopy(base.unet))
        self.base.unet.requires_grad_(True)  # after with_unet, which freezes the bundle

    def trainable_parameters(self):
        return list(self.base.unet.parameters())
