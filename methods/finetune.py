"""Full fine-tuning of the UNet: the cost reference ControlNet's "23% more memory, 34% more
time" is measured against (ControlNet §3.2). Trains a private copy, so a base shared with other
methods never changes."""
from __future__ import annotations

import copy
from dataclasses import dataclass

from bench.api.method import Method
from bench.core.registry import METHODS


@METHODS.register("finetune")
class FineTune(Method):
    version = "finetune-v2"  # v2: the optimizer of diffusers' full fine-tuning script
    no_checkpoint = "a profiling reference (bench profile, the ControlNet claims), not a method anyone deploys"

    # Source: diffusers examples/text_to_image/train_text_to_image.py, the field's script for fine-tuning SD.
    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        lr_ratio: float = 1.0  # README example `--learning_rate=1e-05`
        weight_decay: float = 1e-2  # `--adam_weight_decay` default 1e-2
        grad_clip: float = 1.0  # `--max_grad_norm` default 1, applied with `accelerate`'s `clip_grad_norm_`

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.base = base.with_unet(copy.deepcopy(base.unet))
        self.base.unet.requires_grad_(True)  # after with_unet, which freezes the bundle

    def trainable_parameters(self):
        return list(self.base.unet.parameters())
