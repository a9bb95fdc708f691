"""T2I-Adapter: condition features computed once and added inside the UNet encoder (diffusers)."""
from __future__ import annotations

from dataclasses import dataclass

from bench.method import Method
from bench.methods.controlnet import IMAGE_CONDITIONS
from bench.registry import METHODS


def adapter_layout(unet_config, scale_factor: int) -> dict:
    """T2IAdapter arguments whose features land on the UNet's intrablock residual positions.

    SD1.5's (cross, cross, cross, plain) pattern takes `full_adapter`: one feature per down block.
    SDXL's and the proxy's (plain, cross, cross|plain) pattern takes `full_adapter_xl`, whose first
    block downsamples; as in the released T2I-Adapter-SDXL (channels 320, 640, 1280, 1280; 79M),
    a last feature at the deepest width feeds the mid block. FullAdapterXL places its one
    downsampling at the third feature, so that fourth feature exists only for SDXL's 3 blocks.
    """
    channels = list(unet_config.block_out_channels)
    xl = unet_config.down_block_types[0] == "DownBlock2D"
    if xl and len(channels) == 3:
        channels.append(channels[-1])
    return dict(in_channels=3, channels=channels, num_res_blocks=2,
                downscale_factor=scale_factor * (2 if xl else 1),
                adapter_type="full_adapter_xl" if xl else "full_adapter")


@METHODS.register("t2i_adapter")
class T2IAdapterMethod(Method):
    version = "t2i_adapter-v2"  # v2: the XL layout also feeds the mid block
    conditions = IMAGE_CONDITIONS

    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        conditioning_scale: float = 1.0  # multiplies every adapter feature (diffusers' adapter_conditioning_scale)
        num_res_blocks: int = 2  # ResNet blocks per adapter stage

    def __init__(self, base, condition, budget, hparams=None):
        from diffusers import T2IAdapter

        super().__init__(base, condition, budget, hparams)
        layout = adapter_layout(base.unet.config, base.scale_factor)
        layout["num_res_blocks"] = self.recipe.num_res_blocks
        self.adapter = T2IAdapter(**layout)
        self.adapter.train()

    def prepare(self, batch, embeds, cfg):
        image = batch.conditions[self.condition].to(self.base.unet.dtype)
        feats = [f * self.recipe.conditioning_scale for f in self.adapter(image)]
        return [f.repeat(2, 1, 1, 1) for f in feats] if cfg else feats

    def unet_kwargs(self, x, t, embeds, state):
        return {"down_intrablock_additional_residuals": [f.clone() for f in state]}  # the UNet pops from it
