"""Full-scale architectures with random weights, built from configs kept in the repo.

Parameter counts, step time and peak memory do not depend on weight values, so
`base_model=sd15-arch` / `sdxl-arch` profiles SD1.5 / SDXL anywhere, with nothing downloaded. The
tokenizer is the project's locally built BPE, read from the shipped proxy base's tokenizer files
(token ids differ from CLIP's; the shapes of everything do not).
"""
from __future__ import annotations

import json

import torch

from bench.core.bases import ARCHS, PROXY_BASE_DIR
from bench.core.paths import CONFIGS_DIR

ARCH_DIR = CONFIGS_DIR / "arch"


def _config(arch: str, part: str) -> dict:
    raw = json.loads((ARCH_DIR / arch / f"{part}.json").read_text())
    return {k: v for k, v in raw.items() if not k.startswith("_")}  # "_note" records the source


def arch_components(name: str, seed: int = 0) -> dict:
    """The BaseModel parts of a random-weight architecture (`BaseModel.load("sd15-arch")` wraps them)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    arch = ARCHS[name]
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**_config(arch, "text_encoder"))
    # The same vocab.json/merges.txt that bench.proxy.base.write_tokenizer_files writes (a test
    # checks the shipped files against it), read as bench.proxy.base.build_tokenizer reads them.
    tok = PROXY_BASE_DIR / "tokenizer"
    tokenizer = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"),
                              model_max_length=text_config.max_position_embeddings)
    second = {}
    if (ARCH_DIR / arch / "text_encoder_2.json").is_file():  # SDXL's second, projected text tower
        second = dict(tokenizer_2=tokenizer,
                      text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_config(arch, "text_encoder_2"))))
    return dict(unet=UNet2DConditionModel(**_config(arch, "unet")), scheduler=DDIMScheduler(**_config(arch, "scheduler")),
                tokenizer=tokenizer, text_encoder=CLIPTextModel(text_config), vae=AutoencoderKL(**_config(arch, "vae")),
                **second)
