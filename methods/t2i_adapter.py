"""T2I-Adapter: condition features computed once and added inside the UNet encoder (diffusers).

Checkpoints: a diffusers `T2IAdapter` directory, as TencentARC publishes its adapters on the Hub
(TencentARC/t2i-adapter-*-sdxl-1.0, linked from the T2I-Adapter README; TencentARC/t2iadapter_*_sd15v2
with a diffusion_pytorch_model.bin, which diffusers reads with `torch.load(weights_only=True)`);
ControlNet++'s eval/eval.py loads them with `T2IAdapter.from_pretrained`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, Mapping

import torch
from bench.methods.controlnet import IMAGE_CONDITIONS, load_fitting, save_pretrained

from bench.api.method import Method
from bench.core.registry import METHODS


def adapter_layout(unet_config, scale_factor: int, in_channels: int = 3) -> dict:
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
    return dict(in_channels=in_channels, channels=channels, num_res_blocks=2,
                downscale_factor=scale_factor * (2 if xl else 1),
                adapter_type="full_adapter_xl" if xl else "full_adapter")


# Conditions the released adapters read as one grey channel: canny and sketch (TencentARC/T2I-Adapter
# configs/inference/Adapter-XL-{canny,sketch}.yaml: `cin: 256` = 1 channel x 16x16 pixel-unshuffle;
# SD1.4's t2iadapter_canny/sketch: `cin: 64` = 1 x 8x8).
GREY_CONDITIONS = ("canny", "canny_kornia", "sketch")
LUMA = (0.299, 0.587, 0.114)  # PIL's "L" conversion, which diffusers' adapter pipeline applies to 1-channel input

ADAPTER_LAYOUT = ("a diffusers T2IAdapter directory (config.json + diffusion_pytorch_model.safetensors or .bin); "
                  "in_channels 1 for canny and sketch, 3 for the other conditions")


def adapter_fit(config) -> dict:
    """Every T2IAdapter config field decides where its features land, or what it reads."""
    fit = {k: config[k] for k in ("adapter_type", "in_channels", "num_res_blocks", "downscale_factor")}
    fit["channels"] = tuple(config["channels"])
    return fit


@METHODS.register("t2i_adapter")
class T2IAdapterMethod(Method):
    # v3: the official recipe: cubic timesteps, no prompt dropout, 1-channel canny input. v4: the recipe per base
    # family (SD1.x: uniform timesteps, no clipping; SDXL: cubic, clipping 1.0) and weight decay 1e-2.
    version = "t2i_adapter-v4"
    conditions = IMAGE_CONDITIONS
    weights_layout = ADAPTER_LAYOUT

    # Sources: TencentARC/T2I-Adapter. Its `main` branch is the SDXL code: train_sketch.py there trains
    # Adapter-XL (configs/train/Adapter-XL-sketch.yaml, stable-diffusion-xl-base-1.0 in README L95). The SD1.x
    # code is the `SD` branch: train_sketch.py, configs/stable-diffusion/train_sketch.yaml and
    # ldm/models/diffusion/ddpm.py. The two differ in timestep sampling and clipping: `SDXL` below.
    @dataclass(frozen=True)
    class Recipe(Method.Recipe):
        # SD branch train_sketch.py L328 encodes `data['sentence']` as is; main train_sketch.py L305-309
        # `--proportion_empty_prompts` default 0
        empty_prompt_prob: float = 0.0
        # SD branch: train_sketch.py L335 `model(z, c=c, features_adapter=...)` passes no t, so ddpm.py L824-826
        # `LatentDiffusion.forward` draws `t = torch.randint(0, self.num_timesteps, ...)`: uniform. The paper
        # (Mou et al. 2023, §3.4 "non-uniform time step sampling") describes the cubic schedule, which only the
        # SDXL code implements: SD1.x follows its code, SDXL (below) follows code and paper alike.
        timesteps: str = "uniform"
        conditioning_scale: float = 1.0  # multiplies every adapter feature (diffusers' adapter_conditioning_scale)
        num_res_blocks: int = 2  # ResNet blocks per adapter stage (Adapter-XL configs: `nums_rb: 2`)
        lr_ratio: float = 1.0  # SD branch configs/stable-diffusion/train_sketch.yaml L86 `training: lr: 1e-5`
        weight_decay: float = 1e-2  # SD branch train_sketch.py L284 `torch.optim.AdamW(params, lr=...)`: torch's 1e-2
        grad_clip: float = 0.0  # SD branch train_sketch.py L336-337: backward, then optimizer.step(), no clipping
        SDXL: ClassVar[Mapping[str, Any]] = MappingProxyType({
            "timesteps": "cubic",  # main train_sketch.py L673-676 "Cubic sampling": t = (1 - u**3) * T
            "grad_clip": 1.0,  # main train_sketch.py L254 `--max_grad_norm` 1.0, applied at L716
            # lr: README L95 `--learning_rate=1e-5` (argparse default 5e-6): lr_ratio 1; L252 weight decay 1e-2
        })

    def __init__(self, base, condition, budget, hparams=None):
        from diffusers import T2IAdapter

        super().__init__(base, condition, budget, hparams)
        self.grey = condition in GREY_CONDITIONS
        layout = adapter_layout(base.unet.config, base.scale_factor, in_channels=1 if self.grey else 3)
        layout["num_res_blocks"] = self.recipe.num_res_blocks
        self.adapter = T2IAdapter(**layout)
        self.adapter.train()

    def load_weights(self, path: Path) -> None:
        """num_res_blocks must be the recipe's (hparams.t2i_adapter.num_res_blocks), so that the run
        spec states the architecture that ran."""
        from diffusers import T2IAdapter

        self.adapter = load_fitting(T2IAdapter, Path(path), self.adapter, adapter_fit, ADAPTER_LAYOUT)

    def save_weights(self, directory: Path) -> None:
        save_pretrained(self.adapter, Path(directory))

    def adapter_input(self, batch) -> torch.Tensor:
        image = batch.conditions[self.condition].to(self.base.unet.dtype)
        if self.grey:
            luma = torch.tensor(LUMA, dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
            image = (image * luma).sum(1, keepdim=True)
        return image

    def prepare(self, batch, embeds, cfg):
        image = self.adapter_input(batch)
        feats = [f * self.recipe.conditioning_scale for f in self.adapter(image)]
        return [f.repeat(2, 1, 1, 1) for f in feats] if cfg else feats

    def unet_kwargs(self, x, t, embeds, state):
        return {"down_intrablock_additional_residuals": [f.clone() for f in state]}  # the UNet pops from it
