"""ControlNeXt (Peng et al. 2024): a light conv branch added once inside the UNet encoder.

Instead of ControlNet's encoder copy and zero convs, the branch output is *cross-normalized*
(given the mean and std of the main branch's features, per sample) and added once, to the
output of the UNet's first down block, after that block's skip connections are stored, as the
official SD1.5 code does (dvlab-research/ControlNeXt, ControlNeXt-SD1.5-Training/models/unet.py,
`if down_idx == 0 and conditional_controls is not None`: adaptive-avg-pooled to the block's
output size, cross-normalized, `sample + controls * scale`). The official training also tunes
the UNet's attention output projections (`to_out`) and trains the branch at 10x the learning
rate. Not in diffusers, so written here.

Kept deviation: the branch is this harness's scaled conv stack (stem, ResNet blocks with one 2x
downsampling per power of two between pixel and latent size), not the official
`ControlNeXtModel` layer for layer (3 stride-2 stages to latent size, 128/256 channels), so it
also fits the 32-px pixel-space proxy. Its cost: at SD scale it runs a stem and a ResNet block at
full pixel resolution and widens to 640 channels, about 1.45x finetune's FLOPs per step at SD1.5
512² (`bench profile --estimate`), where the official branch starts with a stride-2 conv; so
ControlNeXt's compute figures at full scale are not the official model's until it is ported. SDXL's official recipe differs: scale 1.0
(`--controlnet_scale_factor 1.0`), tuned pattern `.*attn2.*to_out.*`, prompt dropout 0.2
(ControlNeXt-SDXL-Training/train_controlnext.py and examples/vidit_depth/train.sh); set them
in `hparams.controlnext` for an SDXL base.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import ConfigError
from bench.method import Method, ParamGroup
from bench.methods.controlnet import IMAGE_CONDITIONS
from bench.registry import METHODS


def cross_normalize(control: torch.Tensor, main: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Give `control` the per-sample mean and std (over C,H,W) of `main` (official eps 1e-12)."""
    dims = tuple(range(1, main.ndim))
    c_mean, c_std = control.mean(dims, keepdim=True), control.std(dims, keepdim=True)
    m_mean, m_std = main.mean(dims, keepdim=True), main.std(dims, keepdim=True)
    return (control - c_mean) * (m_std / (c_std + eps)) + m_mean


class ControlBranch(nn.Module):
    """Condition image -> features of the UNet's `conv_in` width at latent resolution.

    A conv stem, one time-conditioned ResNet block and 2x downsampling per power of two between
    pixel and latent size (8x for SD, none in pixel space), widening towards `channels` so the
    full-resolution layers stay narrow, then `blocks` ResNet blocks at latent resolution.
    """

    def __init__(self, out_channels: int, scale_factor: int, channels: int = 32, blocks: int = 2):
        from diffusers.models.embeddings import TimestepEmbedding, Timesteps
        from diffusers.models.resnet import Downsample2D, ResnetBlock2D

        super().__init__()
        temb = channels * 4
        levels = int(math.log2(scale_factor))
        widths = [max(channels >> (levels - i), 8) for i in range(levels + 1)]

        def resnet(cin: int, cout: int) -> nn.Module:
            return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, groups=math.gcd(cin, 8),
                                 groups_out=math.gcd(cout, 8))

        self.time_proj = Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels, temb)
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down_resnets = nn.ModuleList(resnet(widths[i], widths[i + 1]) for i in range(levels))
        self.downs = nn.ModuleList(Downsample2D(widths[i + 1], use_conv=True) for i in range(levels))
        self.resnets = nn.ModuleList(resnet(channels, channels) for _ in range(blocks))
        self.out = nn.Conv2d(channels, out_channels, 1)

    def forward(self, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(-1).expand(cond.shape[0]) if t.numel() in (1, cond.shape[0]) else t
        emb = self.time_embedding(self.time_proj(t).to(cond.dtype))
        h = self.stem(cond)
        for res, down in zip(self.down_resnets, self.downs):
            h = down(res(h, emb))
        for res in self.resnets:
            h = res(h, emb)
        return self.out(h)


@METHODS.register("controlnext")
class ControlNeXt(Method):
    # v3: the official SD1.5 recipe: injected after down_blocks[0] (not conv_in), scale 0.35,
    # `to_out` tuned, branch at 10x lr, no prompt dropout
    version = "controlnext-v3"
    conditions = IMAGE_CONDITIONS

    # Sources: ControlNeXt-SD1.5-Training/{scripts.sh, train_controlnext.py} (dvlab-research/ControlNeXt).
    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        empty_prompt_prob: float = 0.0  # train_controlnext.py `--proportion_empty_prompts` default 0; scripts.sh keeps it
        controlnext_scale: float = 0.35  # scripts.sh `--controlnext_scale 0.35` (training and inference)
        branch_channels: int = 0  # width of the branch at latent resolution; 0: 2x the UNet's conv_in width
        branch_blocks: int = 2  # ResNet blocks at latent resolution
        # train_controlnext.py: `if "to_out" in name: para.requires_grad = True`; "" tunes no UNet weight
        unet_trainable: str = "to_out"
        # train_controlnext.py: the branch's param group has `"lr": args.learning_rate * 10`, the UNet's the base lr
        branch_lr_scale: float = 10.0

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        pattern = self.recipe.unet_trainable
        if pattern:
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"controlnext unet_trainable {pattern!r} is not a valid regex: {e}") from None
            # A private UNet copy: tuning it must never change a base shared with other methods.
            self.base = base.with_unet(copy.deepcopy(base.unet))
            self.tuned = [p for n, p in self.base.unet.named_parameters() if regex.search(n)]
            if not self.tuned:
                raise ConfigError(f"controlnext unet_trainable {pattern!r} matches no UNet parameter")
            for p in self.tuned:
                p.requires_grad_(True)
        else:
            self.tuned = []
        width = base.unet.conv_in.out_channels
        self.branch = ControlBranch(width, base.scale_factor, self.recipe.branch_channels or 2 * width,
                                    self.recipe.branch_blocks)

    def trainable_parameters(self):
        return super().trainable_parameters() + self.tuned

    def param_groups(self):
        return [ParamGroup("branch", list(self.branch.parameters()), self.recipe.branch_lr_scale),
                ParamGroup("unet_tuned", self.tuned, 1.0)]

    def prepare(self, batch, embeds, cfg):
        return self.control_image(batch, cfg)

    def denoise(self, x, t, embeds, state):
        control = self.branch(state, t)
        scale = self.recipe.controlnext_scale

        def inject(module, inputs, output):
            sample, skips = output  # the skips are stored before the control is added
            pooled = F.adaptive_avg_pool2d(control, sample.shape[-2:]).to(sample.dtype)
            return sample + scale * cross_normalize(pooled, sample), skips

        handle = self.base.unet.down_blocks[0].register_forward_hook(inject)
        try:
            return super().denoise(x, t, embeds, state)
        finally:  # the hook lives for this one call, so the base UNet stays untouched
            handle.remove()
