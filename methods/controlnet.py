"""ControlNet: a trainable copy of the UNet encoder feeding zero-conv residuals (diffusers)."""
from __future__ import annotations

import math

from dataclasses import dataclass

from bench.method import Method
from bench.registry import METHODS


def make_controlnet(base, conditioning_channels: int = 3):
    """diffusers' ControlNetModel copied from the base UNet's encoder, in train mode."""
    from diffusers import ControlNetModel

    # The condition encoder downsamples pixels to latent size: 8x for SD, none in pixel space.
    levels = int(math.log2(base.scale_factor))
    channels = (16, 32, 96, 256)[: levels + 1]
    net = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=channels,
                                    conditioning_channels=conditioning_channels)
    return net.train()


# Condition kinds drawn as a 3-channel image, which every image-conditioned method accepts:
# the shapes world's own, plus the controlnet-aux and pose extractors used at full scale.
IMAGE_CONDITIONS = ("canny", "seg", "depth", "hed", "pidinet", "lineart", "depth_midas", "openpose", "pose")


@METHODS.register("controlnet")
class ControlNet(Method):
    version = "controlnet-v1"
    conditions = IMAGE_CONDITIONS

    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        conditioning_scale: float = 1.0  # multiplies every residual (diffusers' controlnet_conditioning_scale)

    conditioning_channels = 3  # channels of the conditioning input the ControlNet embeds

    def __init__(self, base, condition, budget, hparams=None):
        super().__init__(base, condition, budget, hparams)
        self.controlnet = make_controlnet(base, self.conditioning_channels)

    def prepare(self, batch, embeds, cfg):
        return self.control_image(batch, cfg)

    def unet_kwargs(self, x, t, embeds, state):
        down, mid = self.controlnet(x, t, **embeds.unet_inputs(), controlnet_cond=state,
                                    conditioning_scale=self.recipe.conditioning_scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
